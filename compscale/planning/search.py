"""Searching phi for a target: which metric a plan is measured by, the target forms, the bracket-and-bisect search.

Pure functions of plans and costs: :class:`compscale.Planner` (counted metrics) and the latency search
(:mod:`compscale.latency_search`, measured) both search with them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

from compscale.arguments import check_positive_number
from compscale.planning.budget import PHI_LIMIT
from compscale.planning.plan import ScalingPlan, resolve_multipliers
from compscale.planning.strategy import StrategyLike

__all__ = ["DIMENSIONS", "METRICS", "TARGET_FORMS", "Metric", "check_movable", "metric_name", "metric_of",
           "pick_target", "search_phi", "strategy_of"]

Metric = Literal["macs", "params", "acts", "latency"] | Callable[[ScalingPlan], float]
METRICS = ("macs", "params", "acts", "latency")


DIMENSIONS = ("phi", "depth", "width", "resolution")


def metric_name(metric: Metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "of the metric")


def check_movable(strategy: StrategyLike | None, alpha: float, beta: float, gamma: float, depth: float | None,
                   width: float | None, resolution: float | None) -> None:
    """A search needs a dimension that phi moves and no explicit multiplier holds."""
    moved = resolve_multipliers(1.0, alpha, beta, gamma, strategy=strategy)
    free = [name for name, v, given in (("depth", moved.depth, depth), ("width", moved.width, width),
                                        ("resolution", moved.resolution, resolution)) if v != 1.0 and given is None]
    if not free:
        raise ValueError("nothing to search: the strategy moves only dimensions given explicitly "
                         f"(depth={depth}, width={width}, resolution={resolution}); leave one of them out")


def metric_of(metric: Metric) -> Callable[[ScalingPlan], float]:
    """A plan's figure for ``metric``: a counted one by name, or the given function."""
    if callable(metric):
        return metric
    if metric not in ("macs", "params", "acts"):
        raise ValueError(f"metric must be one of {METRICS} or a function of the plan, got {metric!r}")

    def value(plan: ScalingPlan) -> float:
        figure = getattr(plan, metric)
        assert figure is not None  # the planner counts every plan
        return float(figure)

    return value


def strategy_of(vary: str, strategy: StrategyLike | None) -> StrategyLike | None:
    """``vary`` (the older spelling of a single-dimension strategy) and ``strategy``, as one strategy."""
    if vary not in DIMENSIONS:
        raise ValueError(f"vary must be one of {DIMENSIONS}, got {vary!r}")
    if vary == "phi":
        return strategy
    if strategy not in (None, "compound", vary):
        raise ValueError(f"vary={vary!r} is strategy={vary!r}; give one of them, not strategy={strategy!r} too")
    return vary


def search_phi(cost: Callable[[float], float], target: float) -> float:
    """The phi whose (monotone, stepwise) ``cost`` comes closest to ``target``: bracket, then bisect.

    The bracket grows by 2 at a time up to |phi| = :data:`~compscale.planning.budget.PHI_LIMIT`, and stops where
    the multipliers would leave what a network can have (``ValueError`` there).
    """
    cost = functools.cache(cost)  # each plan is costed once: the bracket and the bisection revisit points
    lo, hi = -1.0, 1.0
    while hi < PHI_LIMIT and _within(cost, min(hi + 2, PHI_LIMIT)) and cost(hi) < target:
        hi = min(hi + 2, PHI_LIMIT)
    while lo > -PHI_LIMIT and _within(cost, max(lo - 2, -PHI_LIMIT)) and cost(lo) > target:
        lo = max(lo - 2, -PHI_LIMIT)
    return _bisect(cost, target, lo, hi)


def _within(cost: Callable[[float], float], phi: float) -> bool:
    try:
        cost(phi)
    except ValueError:
        return False
    return True


def _bisect(cost: Callable[[float], float], target: float, lo: float, hi: float) -> float:
    """The argument in [lo, hi] whose (monotone, stepwise) cost is closest to ``target``."""
    best = min((lo, hi), key=lambda x: abs(cost(x) / target - 1))
    for _ in range(40):
        mid = (lo + hi) / 2
        c = cost(mid)
        if abs(c / target - 1) < abs(cost(best) / target - 1):
            best = mid
        if c < target:
            lo = mid
        else:
            hi = mid
    return best


TARGET_FORMS = {"macs": "a positive number of MACs (4.1e9)", "acts": "a positive number of activations",
                "params": "a positive number of parameters", "latency": "a positive number of seconds"}
"""What each target takes, as its errors say."""


def pick_target(macs: float | None, acts: float | None, latency: float | None,
                ) -> tuple[Literal["macs", "acts", "latency"], float] | None:
    """The one target given, as ``(metric, value)``; two of them raise."""
    given = [(name, check_positive_number(v, f"target_{name}", TARGET_FORMS[name]))
             for name, v in (("macs", macs), ("acts", acts), ("latency", latency)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one target, not {' and '.join('target_' + n for n, _ in given)}")
    return given[0] if given else None  # type: ignore[return-value]
