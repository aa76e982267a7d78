"""``compscale.plan``: what ``scale`` would build and what it would cost, without building weights.

A :class:`Planner` analyses the model once on the meta device (a copy whose parameters hold no
memory) and then answers for any multipliers in milliseconds, so that a table over phi = 0..8 is cheap.

Example:
    >>> from torchvision.models import resnet50
    >>> p = plan(resnet50(), phi=2)
    >>> p.input_size, round(p.macs / p.base_macs, 2)
    ((296, 296), 3.99)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from compscale.analyse.channels import ChannelGraph, analyse_channels
from compscale.analyse.rules import ChannelRules, as_rules, channel_rules
from compscale.analyse.stages import StageFilter, StageTable, find_stages
from compscale.errors import NoStageError
from compscale.planning.cost import CostModel
from compscale.planning.depth import dense_costs, stage_counts, transition_ratios
from compscale.planning.plan import (
    GroupPlan,
    Multipliers,
    ScalingPlan,
    StagePlan,
    as_size,
    plan_input_size,
    resolve_multipliers,
)
from compscale.planning.policy import Derivation, RoundFn, default_independent, derive, resolve_widths
from compscale.planning.rounding import make_divisible
from compscale.trace import trace
from compscale.trace.tracer import Traced, check_module, meta_copy

__all__ = ["Planner", "derive_widths", "meta_copy", "no_stage_error", "plan"]


@dataclasses.dataclass
class _Probe:
    """A meta-device network that :class:`CostModel` costs: the model with its stages deepened for planning."""

    traced: Traced
    cg: ChannelGraph
    derivations: dict[int, Derivation]
    cost: CostModel


class Planner:
    """The analysis of one model, reused for every plan asked of it.

    The probe has one extra block per stage of repeated blocks, costed ``blocks_after - blocks_before`` times.
    A dense stage cannot be costed so: each new layer reads more channels than the one before, and the layers
    after the stage (a DenseNet transition) widen with it. Its layers are built in the probe instead, one probe
    per combination of dense-stage depths a plan asks for (cached; about a second each for DenseNet-121).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int | Sequence[int] = 224,
        resolution_divisor: int = 8,
        round_width: RoundFn = make_divisible,
        stages: StageFilter | None = None,
        leaf_modules: Iterable[type[nn.Module]] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
        rules: Mapping[Any, Callable[..., Any]] | ChannelRules | None = None,
    ) -> None:
        check_module(model, "plan")
        self.rules = as_rules(rules)
        with channel_rules(self.rules):
            self._analyse(model, input_size, resolution_divisor, round_width, stages, leaf_modules, autowrap_functions)

    def _analyse(self, model: nn.Module, input_size: int | Sequence[int], resolution_divisor: int,
                 round_width: RoundFn, stages: StageFilter | None, leaf_modules: Iterable[type[nn.Module]],
                 autowrap_functions: Iterable[Callable[..., Any]]) -> None:
        self.model_name = type(model).__name__
        self.base_size = as_size(input_size)
        self.resolution_divisor = resolution_divisor
        self.round_width = round_width
        self._model = meta_copy(model)
        self._base = trace(meta_copy(self._model), input_size=self.base_size, leaf_modules=leaf_modules,
                           autowrap_functions=autowrap_functions)
        self.table: StageTable = find_stages(self._base, stages)
        self.dense_costs = dense_costs(self._base, self.table)
        self._probes: dict[tuple[int, ...], _Probe] = {}
        probe = self._probe(self._dense_counts({s.index: len(s.blocks) for s in self.table}))
        self.traced, self.cg, self.derivations, self.cost = probe.traced, probe.cg, probe.derivations, probe.cost
        base_widths = {g.id: g.base for g in self.cg.groups}
        self.base_macs, self.base_params = self.cost.cost(base_widths, {}, self.base_size)

    def _dense_counts(self, counts: Mapping[int, int]) -> tuple[int, ...]:
        return tuple(counts[s.index] for s in self.table if s.grows)

    def _probe(self, dense: tuple[int, ...]) -> _Probe:
        """The probe whose dense stages have ``dense`` layers (in stage order), built once."""
        if dense in self._probes:
            return self._probes[dense]
        with channel_rules(self.rules):
            return self._build_probe(dense)

    def _build_probe(self, dense: tuple[int, ...]) -> _Probe:
        from compscale.rewrite.depth import deepen  # the probe is built by the depth pass itself
        from compscale.rewrite.resolution import adapt_inputs

        counts = dict(zip((s.index for s in self.table if s.grows), dense))
        counts.update({s.index: len(s.blocks) + 1 for s in self.table if not s.grows})
        # the first probe deepens the analysed copy itself; later ones a fresh copy of the pristine ``_model``
        base = self._base if not self._probes else self._base.retrace(meta_copy(self._model), self._base.input_shape)
        root, added = deepen(base.root, base, self.table, counts, None)
        if any(s.grows and counts[s.index] != len(s.blocks) for s in self.table):
            adapt_inputs(root, base, base.input_shape, None, warn=False, keep_ratio=transition_ratios(base, self.table))
        traced = base.retrace(root, base.input_shape)
        cg = analyse_channels(traced)
        derivations = derive_widths(traced, cg)
        repeated = {s.index for s in self.table if not s.grows}
        cost = CostModel(traced, cg, {s: tuple(paths) for s, paths in added.items() if s in repeated})
        self._probes[dense] = _Probe(traced, cg, derivations, cost)
        return self._probes[dense]

    def plan(self, phi: float | None = None, *, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
             depth: float | None = None, width: float | None = None,
             resolution: float | None = None) -> ScalingPlan:
        """The plan (and its estimated MACs and params) for these multipliers; see :func:`compscale.scale`."""
        return self.plan_for(resolve_multipliers(phi, alpha, beta, gamma, depth, width, resolution))

    def solve(self, target_macs: float, vary: str = "phi", *, alpha: float = 1.2, beta: float = 1.1,
              gamma: float = 1.15, depth: float | None = None, width: float | None = None,
              resolution: float | None = None) -> ScalingPlan:
        """The plan whose MACs come closest to ``target_macs``, varying phi or one multiplier.

        ``vary="phi"`` searches phi (explicit ``depth``/``width``/``resolution`` stay fixed); ``vary="width"``
        (or ``"depth"``, ``"resolution"``) searches that multiplier with the others fixed (1 unless given).
        MACs are step functions of the multipliers (``ceil``, rounding to 8), so the answer is the closest
        step; check ``plan.macs`` against the target.

        Example: width-only at the cost of compound phi=1::

            planner.solve(planner.plan(1).macs, vary="width")
        """
        if vary not in _DIMENSIONS:
            raise ValueError(f"vary must be one of {_DIMENSIONS}, got {vary!r}")
        if not (isinstance(target_macs, (int, float)) and math.isfinite(target_macs) and target_macs > 0):
            raise ValueError(f"target_macs must be a positive number, got {target_macs!r}")
        fixed = {"depth": depth, "width": width, "resolution": resolution}

        def plan_at(x: float) -> ScalingPlan:
            if vary == "phi":
                return self.plan(x, alpha=alpha, beta=beta, gamma=gamma, **fixed)
            return self.plan(**{**{k: v if v is not None else 1.0 for k, v in fixed.items()}, vary: x})

        def cost(x: float) -> float:
            macs = plan_at(x).macs
            assert macs is not None
            return float(macs)

        lo, hi = (-1.0, 1.0) if vary == "phi" else (0.5, 2.0)
        while cost(hi) < target_macs and hi < 1e3:
            hi = hi * 2 if vary != "phi" else hi + 2
        while cost(lo) > target_macs and (lo > 1e-3 if vary != "phi" else lo > -20):
            lo = lo / 2 if vary != "phi" else lo - 2
        return plan_at(_bisect(cost, target_macs, lo, hi, log=vary != "phi"))

    def plan_for(self, mult: Multipliers) -> ScalingPlan:
        if mult.depth != 1.0 and not len(self.table):
            raise no_stage_error(self.model_name, self.table)
        counts = stage_counts(self.table, mult.depth, self.dense_costs)
        probe = self._probe(self._dense_counts(counts))
        if mult.width == 1.0:
            widths = {g.id: g.base for g in probe.cg.groups}
        else:
            independent = default_independent(mult.width, self.round_width)
            widths = resolve_widths(probe.cg, independent, derivations=probe.derivations)
        size = plan_input_size(self.base_size, mult.resolution, self.resolution_divisor)
        extra = {s.index: counts[s.index] - len(s.blocks) for s in self.table if not s.grows}
        macs, params = probe.cost.cost(widths, extra, size)
        return ScalingPlan(
            mult, self.base_size, size,
            stages=[StagePlan(s.name, len(s.blocks), counts[s.index], s.in_channels, s.out_channels, s.stride)
                    for s in self.table],
            groups=[GroupPlan(g.id, g.base, widths[g.id], probe.derivations[g.id].rule,
                              tuple(p for p, _ in g.members)) for g in probe.cg.groups],
            macs=macs, params=params, base_macs=self.base_macs, base_params=self.base_params,
        )


_DIMENSIONS = ("phi", "depth", "width", "resolution")


def derive_widths(traced: Traced, cg: ChannelGraph) -> dict[int, Derivation]:
    """How each channel group's width follows from others (:func:`~compscale.planning.policy.derive`), given the
    network's blocks (all of them, whatever ``stages=`` picks).

    A unit of a plain stage hands its output to the next unit as a stage width, which the published plain
    families round on its own (timm's MobileNetV1 at ``channel_multiplier=1.2``: 128 -> 152, not 2 x 80).
    """
    table = find_stages(traced)
    derivations = derive(cg, [b.path for s in table for b in s.blocks])
    for stage in (s for s in table if s.plain):
        for block in stage.blocks:
            for g in cg.node_groups.get(block.exit, ()):
                if derivations[g].rule == "expansion":
                    derivations[g] = Derivation("independent")
    return derivations


def no_stage_error(name: str, table: StageTable) -> NoStageError:
    """The error for a depth multiplier on a model without stages (shared with ``scale``)."""
    seen = [b.path for b in table.blocks if b.path.count(".") <= 1][:3]
    looked = f"; its blocks ({', '.join(repr(p) for p in seen)}, ...) do not" if seen else ""
    return NoStageError(
        f"{name} has no stage to deepen: no block of its graph merges its own input back into its output "
        f"(a residual add, or a concat of a dense layer or channel split, with stride 1), no container holds "
        f"several blocks of one type, and no flat nn.Sequential holds runs of convolutions{looked}",
        "compscale repeats blocks that carry their input through, or the units of a plain network kept in "
        "containers (nn.Sequential, nn.ModuleList); keep the units so, scale width and resolution only (depth=1), "
        "or restrict depth scaling to some blocks with `stages=`.",
    )


def _bisect(cost: Callable[[float], float], target: float, lo: float, hi: float, log: bool) -> float:
    """The argument in [lo, hi] whose (monotone, stepwise) cost is closest to ``target``."""
    best = min((lo, hi), key=lambda x: abs(cost(x) / target - 1))
    for _ in range(40):
        mid = math.sqrt(lo * hi) if log else (lo + hi) / 2
        c = cost(mid)
        if abs(c / target - 1) < abs(cost(best) / target - 1):
            best = mid
        if c < target:
            lo = mid
        else:
            hi = mid
    return best


def plan(model: nn.Module, phi: float | None = None, *, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
         depth: float | None = None, width: float | None = None, resolution: float | None = None,
         target_macs: float | None = None, vary: str = "phi", **options: Any) -> ScalingPlan:
    """What ``compscale.scale`` would build, with its MACs and params, allocating no weight.

    With ``target_macs``, ``vary`` (phi or one multiplier) is searched to land on it (:meth:`Planner.solve`).
    ``options`` are :class:`Planner`'s (``input_size``, ``round_width``, ``stages``, ``leaf_modules``...).
    """
    planner = Planner(model, **options)
    if target_macs is not None:
        if phi is not None:
            raise ValueError("target_macs searches phi (or one multiplier): give no phi with it")
        return planner.solve(target_macs, vary, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width,
                             resolution=resolution)
    return planner.plan(phi, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width, resolution=resolution)
