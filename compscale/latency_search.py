"""The latency search: the largest network along a strategy whose measured latency is within a target.

It plans on counted metrics (a :class:`compscale.Planner`) and confirms by timing networks built by
:func:`compscale.pipeline.build`; see :func:`solve_latency`.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from compscale.arguments import check_positive_number
from compscale.errors import TooLargeError
from compscale.pipeline import build
from compscale.planning.budget import PHI_LIMIT, params_limit
from compscale.planning.options import ScaleOptions
from compscale.planning.plan import ScalingPlan
from compscale.planning.search import TARGET_FORMS, search_phi
from compscale.planning.strategy import StrategyLike

if TYPE_CHECKING:
    from compscale.planner import Planner
    from compscale.verify.latency import Latency

__all__ = ["PHI_STEP", "solve_latency"]

log = logging.getLogger("compscale")


def solve_latency(planner: Planner, target: float, *, strategy: StrategyLike | None = None, alpha: float = 1.2,
                  beta: float = 1.1, gamma: float = 1.15, depth: float | None = None, width: float | None = None,
                  resolution: float | None = None, candidates: int = 4, max_params: int | None = None,
                  rounds: int = 3, measure_plan: Callable[[ScalingPlan], Latency] | None = None,
                  **measure: Any) -> ScalingPlan:
    """The largest plan along ``strategy`` whose measured latency is within ``target`` seconds per call.

    Latency is timed on built networks (fresh weights drawn with seed 0, the model's device and dtype), which costs
    seconds each, so the search plans on a counted metric and measures few candidates: the network at phi = 0
    (the base model itself unless explicit multipliers scale it), then up to ``candidates`` networks, each at the
    phi where a line through the two measured ``(phi, log latency)`` points nearest the target meets it (the first
    guess assumes latency grows with activations, Dollar et al.'s finding). Candidates lie on a grid of
    :data:`PHI_STEP` (finer than timing noise can tell apart, so that the same machine gives the same phi), within 2
    of the measured phis, inside the bracket once the target is bracketed, and within the largest phi whose plan has
    at most ``max_params`` parameters (by default half the free memory of the model's device): nothing larger is
    built. When even that network would take less than a quarter of the target by its counted costs, or measures
    below the target beyond its noise, ``TooLargeError`` says so before anything larger than the base is built.

    The measured points nearest the target, on either side, are then timed again, interleaved over ``rounds`` rounds
    (:func:`~compscale.verify.latency.compare`), so that one disturbed measurement cannot decide; the target is a
    budget: the largest network measured within it is returned (the fastest when none is; see :func:`_pick`), with
    its median and IQR in ``plan.latency``/``plan.latency_iqr``. A miss beyond the noise and 5% warns, as the counted
    targets do.

    Args:
        planner: the analysed model (its ``model`` is built and timed; its options decide the build).
        target: seconds per call of the scaled network, at the batch size ``measure`` gives (1 by default).
        candidates: the most scaled networks built and timed while searching.
        max_params: the most parameters a candidate may have (:func:`~compscale.planning.budget.params_limit`).
        rounds: rounds of the final, interleaved timing.
        measure_plan: times a plan instead (``plan -> Latency``): a latency table, or a test's deterministic model.
        measure: :func:`compscale.verify.latency.latency`'s options (``batch_size``, ``min_run_time``, ``threads``...).
    """
    from compscale.verify.latency import compare

    target = check_positive_number(target, "target_latency", TARGET_FORMS["latency"])

    def plan_at(phi: float) -> ScalingPlan:
        return planner.plan(phi, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width,
                            resolution=resolution, strategy=strategy)

    timer = measure_plan if measure_plan is not None else _plan_timer(planner, measure)
    base = plan_at(0.0)
    limit = params_limit(planner.model, max_params)
    if limit is not None and (base.params or 0) > limit:
        raise TooLargeError(f"{planner.model_name} at phi=0 with the given multipliers has {base.params:,} "
                            f"parameters, more than max_params={limit:,}", "give smaller multipliers or max_params=.")
    low, high = _phi_range(plan_at, limit)
    measured = {0.0: timer(base)}
    _check_reachable(planner.model_name, plan_at, base, measured[0.0].median, target, high, limit)
    phi = search_phi(lambda x: float(plan_at(x).acts or 0) / float(base.acts or 1), target / measured[0.0].median)
    for _ in range(2):  # search, confirm; search on from the confirmed figures when they moved
        for _ in range(candidates):
            phi = _unmeasured_in_bracket(phi, {x: t.median for x, t in measured.items()}, target, low, high)
            if phi in measured:
                break
            measured[phi] = timer(plan_at(phi))
            phi = _next_phi({x: t.median for x, t in measured.items()}, target)
        nearest = _nearest(measured, target)
        confirmed = dict(zip(nearest, compare([functools.partial(_time_at, timer, plan_at, x) for x in nearest],
                                              rounds)))
        moved = any(not confirmed[x].agrees_with(measured[x].median) for x in nearest)
        measured.update(confirmed)
        gap = _gap(measured, confirmed, low, high)
        if not moved and not gap:
            break
        for x in gap:  # timed out of order with the confirmed points around it (disturbed): timed again
            measured.pop(x, None)
        phi = _next_phi({x: t.median for x, t in measured.items()}, target)
    if high < PHI_LIMIT and high in measured and measured[high].median < target and not measured[high].agrees_with(
            target):
        raise _too_large(planner.model_name, target, high, measured[high].median, limit)
    best = _pick(confirmed, target)
    result = plan_at(best)
    result.latency, result.latency_iqr = confirmed[best].median, confirmed[best].iqr
    log.info("target latency %.4g s: measured %s; confirmed %s", target,
             {f"{k:g}": f"{v.median:.4g}" for k, v in sorted(measured.items())},
             {f"{k:g}": str(v) for k, v in sorted(confirmed.items())})
    _warn_miss(planner.model_name, target, best, confirmed[best], result)
    return result


def _time_at(timer: Callable[[ScalingPlan], Latency], plan_at: Callable[[float], ScalingPlan], phi: float) -> Latency:
    return timer(plan_at(phi))


PHI_STEP = 0.25
"""The grid of phis a latency search times: a step changes latency by 10-20%, about what timing noise can resolve."""


def _plan_timer(planner: Planner, measure: dict[str, Any]) -> Callable[[ScalingPlan], Latency]:
    """Time a plan: the base model itself at phi=0 without explicit multipliers, else a network built with seed 0."""
    from compscale.verify.latency import latency

    def timer(p: ScalingPlan) -> Latency:
        m = p.multipliers
        plain = (m.depth, m.width, m.resolution) == (1.0, 1.0, 1.0)
        net = planner.model if plain else build(planner.model, m, planner.options, seed=0)
        inputs = _timing_inputs(planner.options, p.input_size)
        return latency(net, p.input_size, example_inputs=inputs, **measure)

    return timer


def _phi_range(plan_at: Callable[[float], ScalingPlan], limit: int | None) -> tuple[float, float]:
    """The grid phis a search may time: the lowest with a plan (a width or size collapses below it), the highest whose
    plan has at most ``limit`` parameters."""

    def valid(phi: float) -> bool:
        try:
            p = plan_at(phi)
        except ValueError:
            return False
        return phi <= 0 or limit is None or (p.params or 0) <= limit

    low, high = -PHI_LIMIT, PHI_LIMIT
    if not valid(low):
        low = _edge(valid, 0.0, low)
    if not valid(high):
        high = _edge(valid, 0.0, high)
    return math.ceil(low / PHI_STEP) * PHI_STEP, math.floor(high / PHI_STEP) * PHI_STEP


def _edge(valid: Callable[[float], bool], good: float, bad: float) -> float:
    """The last valid phi between ``good`` (valid) and ``bad`` (not), to a hundredth of ``PHI_STEP``."""
    while abs(bad - good) > PHI_STEP / 100:
        mid = (good + bad) / 2
        good, bad = (mid, bad) if valid(mid) else (good, mid)
    return good


def _on_grid(phi: float, low: float, high: float) -> float:
    return round(min(high, max(low, round(phi / PHI_STEP) * PHI_STEP)), 6)


def _gap(measured: Mapping[float, Latency], confirmed: Mapping[float, Latency], low: float, high: float
         ) -> list[float]:
    """The grid points between two confirmed phis that bracket the target and are not neighbours, that are untimed or
    were timed out of order with them (a disturbed timing): what the search must still time to return the largest
    network within the target, not one a step or more below it."""
    if len(confirmed) < 2:
        return []
    x0, x1 = sorted(confirmed)[:2]
    t0, t1 = confirmed[x0].median, confirmed[x1].median
    inside = _grid_between(x0, x1, low, high)
    return [x for x in inside if x not in measured or not min(t0, t1) <= measured[x].median <= max(t0, t1)]


def _grid_between(x0: float, x1: float, low: float, high: float) -> list[float]:
    """The grid phis strictly between ``x0`` and ``x1`` (in either order), from ``x0`` on."""
    step = PHI_STEP if x1 > x0 else -PHI_STEP
    return [_on_grid(x0 + k * step, low, high) for k in range(1, round(abs(x1 - x0) / PHI_STEP))]


def _unmeasured_in_bracket(phi: float, measured: Mapping[float, float], target: float, low: float, high: float
                           ) -> float:
    """``phi`` on the grid; when that point is timed already but the tightest bracket of the target still holds an
    untimed grid point, the one of those nearest ``phi`` (else a bracket two steps wide ends the search on whichever
    side the load of the moment put the estimate)."""
    on = _on_grid(phi, low, high)
    if on not in measured:
        return on
    below = [x for x, t in measured.items() if t < target]
    above = [x for x, t in measured.items() if t >= target]
    if not (below and above):
        return on
    x0 = max(below, key=lambda x: measured[x])
    x1 = min(above, key=lambda x: measured[x])
    inside = _grid_between(x0, x1, low, high)
    untimed = [x for x in inside if x not in measured]
    return min(untimed, key=lambda x: abs(x - phi)) if untimed else on


_REACH = 4.0  # latency grows at most about as MACs or activations do; 4x covers a slow layer kind and the noise


def _check_reachable(name: str, plan_at: Callable[[float], ScalingPlan], base: ScalingPlan, first: float,
                     target: float, high: float, limit: int | None) -> None:
    """Refuse, before building anything larger than the base, a target that even the largest network within
    ``limit`` would miss by far: latency, by the counted costs, grows no faster than MACs or activations."""
    if high >= PHI_LIMIT or limit is None:
        return
    top = plan_at(high)
    growth = max((top.macs or 0) / max(base.macs or 1, 1), (top.acts or 0) / max(base.acts or 1, 1), 1.0)
    if first * growth * _REACH < target:
        raise _too_large(name, target, high, first * growth, limit, predicted=True)


def _too_large(name: str, target: float, phi: float, seconds: float, limit: int | None,
               predicted: bool = False) -> TooLargeError:
    how = "would take about" if predicted else "measured"
    return TooLargeError(
        f"target_latency={target:.4g} s needs {name} larger than max_params={limit:,} parameters allow: the largest "
        f"network within it (phi={phi:g}) {how} {seconds:.4g} s",
        "give a smaller target_latency, or a larger max_params= if the memory is there.",
    )


def _nearest(measured: Mapping[float, Latency], target: float) -> list[float]:
    """The measured phis to time again: the nearest below the target and the nearest above it (or the two nearest,
    when all lie on one side)."""
    below = [x for x, t in measured.items() if t.median < target]
    above = [x for x, t in measured.items() if t.median >= target]
    if below and above:
        return sorted({max(below, key=lambda x: measured[x].median), min(above, key=lambda x: measured[x].median)})
    return sorted(sorted(measured, key=lambda x: abs(math.log(measured[x].median / target)))[:2])


def _pick(confirmed: Mapping[float, Latency], target: float) -> float:
    """The confirmed phi to return: a latency target is a budget, so the largest network measured within it, or the
    fastest when none is. Not the closer of the two around the target: on a busy machine a whole run can time 10-15%
    slower or faster than the last, and between two networks a block apart (resnet18 gains a block per stage from
    phi=0 to 0.25: +50% latency) the closer one then changes from run to run (phi 0.25, 0.25, 0 in three runs), while
    the networks on either side of a target stay there unless the target lies within the noise of one of them."""
    within = [x for x, t in confirmed.items() if t.median <= target]
    if within:
        return max(within, key=lambda x: confirmed[x].median)
    return min(confirmed, key=lambda x: confirmed[x].median)


_TOO_NOISY = 0.5  # an IQR above half the median: the timings cannot tell neighbouring phis apart


def _warn_miss(name: str, target: float, phi: float, got: Latency, plan: ScalingPlan) -> None:
    if got.spread > _TOO_NOISY:
        warnings.warn(
            f"compscale: the timings of {name} are too noisy to find {target:.4g} s per call: phi={phi:g} measured "
            f"{got.median:.4g} s ± {got.iqr:.2g} s (IQR {got.spread:.0%} of the median, {len(got.times)} runs); the "
            "machine is busy: time on fewer threads (threads=, --threads) or when it is quieter",
            stacklevel=4,
        )
        return
    miss = got.median / target - 1
    if abs(miss) <= 0.05 or got.agrees_with(target):
        return
    warnings.warn(
        f"compscale: the largest network of {name} within {target:.4g} s per call along strategy "
        f"{plan.multipliers.strategy!r} measured {got.median:.4g} s ± {got.iqr:.2g} s ({miss:+.0%}, phi={phi:g}, "
        f"{len(got.times)} runs): latency moves in steps (phi on a grid of {PHI_STEP}, whole blocks, widths and "
        "sizes rounded to 8), and a target below the smallest network is out of reach",
        stacklevel=4,
    )


def _next_phi(measured: Mapping[float, float], target: float) -> float:
    """The next phi to time: inside the tightest bracket of the target when the measurements have one (regula
    falsi in log latency), else a secant step through the two points nearest the target, kept within 2 of them."""
    pts = sorted((x, math.log(t)) for x, t in measured.items())
    goal = math.log(target)
    below = [p for p in pts if p[1] < goal]
    above = [p for p in pts if p[1] >= goal]
    if below and above:
        (x0, y0), (x1, y1) = max(below), min(above)
        if not math.isfinite(y1) or y1 == y0:
            return (x0 + x1) / 2
        return x0 + (goal - y0) * (x1 - x0) / (y1 - y0)
    near = sorted(pts, key=lambda p: abs(p[1] - goal))[:2]
    if len(near) < 2 or near[0][1] == near[1][1]:
        return near[0][0] + (2.0 if not above else -2.0)
    (x0, y0), (x1, y1) = near
    step = (goal - y0) * (x1 - x0) / (y1 - y0)
    return x0 + max(-2.0, min(2.0, step))


def _timing_inputs(options: ScaleOptions, size: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
    """The example inputs to time with at spatial ``size``, when the options have them (shapes only)."""
    if options.input_shape is None:
        return None
    return (torch.empty((*options.input_shape[:2], *size)), *options.extra_inputs)
