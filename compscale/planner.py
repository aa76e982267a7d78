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
import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from compscale.analyse.channels import ChannelGraph, analyse_channels
from compscale.analyse.rules import channel_rules
from compscale.analyse.stages import StageTable, find_stages
from compscale.arguments import check_forward_takes, check_positive_number, check_unwrapped, strip_hooks
from compscale.detection import neck_arguments, plan_detector, refuse_target, with_neck
from compscale.errors import TraceError
from compscale.planning.budget import check_max_params, check_size
from compscale.planning.cost import CostModel, Costs
from compscale.planning.depth import check_evidence, dense_costs, depth_to_apply, stage_counts, transition_ratios
from compscale.planning.options import ScaleOptions
from compscale.planning.plan import (
    GroupPlan,
    Multipliers,
    ScalingPlan,
    StagePlan,
    plan_input_size,
    resolve_multipliers,
)
from compscale.planning.policy import Derivation, derive_widths, plan_widths
from compscale.planning.search import (
    DIMENSIONS,
    TARGET_FORMS,
    Metric,
    check_movable,
    metric_name,
    metric_of,
    pick_target,
    search_phi,
    strategy_of,
)
from compscale.planning.strategy import StrategyLike
from compscale.rewrite.depth import deepen
from compscale.rewrite.resolution import adapt_inputs
from compscale.trace import trace
from compscale.trace.tracer import Traced, check_module, meta_copy

__all__ = ["Planner", "plan"]

@dataclasses.dataclass
class _Probe:
    """A meta-device network that :class:`CostModel` costs: the model with its stages deepened for planning."""

    traced: Traced
    cg: ChannelGraph
    derivations: dict[int, Derivation]
    cost: CostModel


class Planner:
    """The analysis of one model, reused for every plan asked of it.

    Where every stage ends in a block that new blocks copy, the model's own graph is costed, that block counted once
    more per block added. Otherwise a probe is traced: the model with one extra block per stage of repeated blocks
    (a one-block stage's repeat is synthesized), costed ``blocks_after - blocks_before`` times.
    A dense stage cannot be costed so: each new layer reads more channels than the one before, and the layers
    after the stage (a DenseNet transition) widen with it. Its layers are built in the probe instead, one probe
    per combination of dense-stage depths a plan asks for (cached; about a second each for DenseNet-121).
    """

    def __init__(self, model: nn.Module, options: ScaleOptions | None = None, **kwargs: Any) -> None:
        """Analyse ``model`` with ``options`` (or :meth:`ScaleOptions.make`'s keyword arguments: ``input_size``,
        ``example_inputs``, ``resolution_divisor``, ``round_width``, ``stages``, ``fixed``, ``leaf_modules``,
        ``autowrap_functions``, ``rules``)."""
        check_unwrapped(model, "plan")
        check_module(model, "plan")
        if options is not None and kwargs:
            raise TypeError(f"give Planner either options= or keyword arguments, not both ({', '.join(kwargs)})")
        if options is not None and not isinstance(options, ScaleOptions):
            raise TypeError(f"options must be a ScaleOptions, got {type(options).__name__}")
        self.options = options if options is not None else ScaleOptions.make(**kwargs)
        check_forward_takes(model, 1 + len(self.options.extra_inputs))
        self.model = model  # never modified: measured metrics build from it
        with channel_rules(self.options.rules):
            self._analyse(model)

    @property
    def rules(self) -> Any:
        return self.options.rules

    @property
    def base(self) -> Traced:
        """The model's graph (of a meta-device copy), as the planner traced it."""
        return self._base

    def _analyse(self, model: nn.Module) -> None:
        opts = self.options
        self.model_name = type(model).__name__
        self.base_size = opts.input_size
        self._model = strip_hooks(meta_copy(model))  # the model's forward hooks would run on proxies
        self._base = trace(meta_copy(self._model), opts.input_shape, input_size=self.base_size,
                           leaf_modules=opts.leaf_modules, autowrap_functions=opts.autowrap_functions,
                           extra_inputs=opts.extra_inputs)
        self.table: StageTable = find_stages(self._base, opts.stages)
        self.dense_costs = dense_costs(self._base, self.table)
        self._probes: dict[tuple[int, ...], _Probe] = {}
        # new blocks copy a block in the graph and change nothing else (a C2f's taps widen the layer after them)
        if all(not s.grows and not s.taps and s.repeat is not None for s in self.table):
            cg = analyse_channels(self._base)
            repeats = {s.index: tuple(s.repeat.layers or (s.repeat.path,)) for s in self.table if s.repeat is not None}
            found = self.table if opts.stages is None else None  # the stages derive_widths would find again
            self._probes[()] = _Probe(self._base, cg, derive_widths(self._base, cg, found),
                                      CostModel(self._base, cg, repeats, in_network=True))
        probe = self._probe(self._dense_counts({s.index: len(s.blocks) for s in self.table}))
        self.traced, self.cg, self.derivations, self.cost = probe.traced, probe.cg, probe.derivations, probe.cost
        self.base_costs: Costs = self.cost.cost({g.id: g.base for g in self.cg.groups}, {}, self.base_size)
        self.base_macs, self.base_params, self.base_acts = self.base_costs

    def _dense_counts(self, counts: Mapping[int, int]) -> tuple[int, ...]:
        return tuple(counts[s.index] for s in self.table if s.grows)

    def _probe(self, dense: tuple[int, ...]) -> _Probe:
        """The probe whose dense stages have ``dense`` layers (in stage order), built once."""
        if dense in self._probes:
            return self._probes[dense]
        with channel_rules(self.rules):
            return self._build_probe(dense)

    def _build_probe(self, dense: tuple[int, ...]) -> _Probe:
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
             depth: float | None = None, width: float | None = None, resolution: float | None = None,
             strategy: StrategyLike | None = None) -> ScalingPlan:
        """The plan (and its MACs, params and activations) for these multipliers; see :func:`compscale.scale`."""
        return self.plan_for(resolve_multipliers(phi, alpha, beta, gamma, depth, width, resolution, strategy,
                                                 rank=len(self.base_size)))

    def solve(self, target: float, metric: Metric = "macs", *, strategy: StrategyLike | None = None,
              vary: str = "phi", alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
              depth: float | None = None, width: float | None = None, resolution: float | None = None,
              max_params: int | None = None, **measure: Any) -> ScalingPlan:
        """The plan whose ``metric`` comes closest to ``target``, searching phi along ``strategy``.

        ``metric`` is ``"macs"``, ``"params"``, ``"acts"`` (counted on the plan, no weights built), ``"latency"``
        (seconds per call, measured: :func:`compscale.latency_search.solve_latency`, ``measure`` goes to
        :func:`compscale.verify.latency.latency`), or any ``metric(plan) -> float`` that grows with phi (a latency
        table). Explicit ``depth``/``width``/``resolution`` stay fixed while phi moves the others. ``vary="width"``
        (or ``"depth"``, ``"resolution"``) is ``strategy="width"``: that multiplier alone, the others as given or 1.
        Costs are step functions of the multipliers (``ceil``, rounding to 8), so the answer is the closest step;
        check the plan's figure against the target. With ``max_params``, a plan with more parameters raises
        ``TooLargeError`` (a latency search builds nothing larger: by default it keeps within half the free memory).

        Example: width-only at the cost of compound phi=1::

            planner.solve(planner.plan(1).macs, strategy="width")
        """
        if isinstance(metric, str) and metric in DIMENSIONS:  # the older solve(target_macs, vary)
            warnings.warn(f"solve(target, {metric!r}) is solve(target, 'macs', vary={metric!r}) (or "
                          f"strategy={metric!r}); the second argument is now the metric", DeprecationWarning,
                          stacklevel=2)
            metric, vary = "macs", metric
        if vary in ("depth", "width", "resolution"):  # vary searches its multiplier, whatever was given for it
            depth, width, resolution = (None if vary == name else v for name, v in
                                        (("depth", depth), ("width", width), ("resolution", resolution)))
        strategy = strategy_of(vary, strategy)
        check_movable(strategy, alpha, beta, gamma, depth, width, resolution)
        max_params = check_max_params(max_params)
        if metric == "latency":
            from compscale.latency_search import solve_latency  # builds and times candidates

            return solve_latency(self, target, strategy=strategy, alpha=alpha, beta=beta, gamma=gamma, depth=depth,
                                 width=width, resolution=resolution, max_params=max_params, **measure)
        if measure:
            raise TypeError(f"solve() got {', '.join(measure)}: only metric='latency' takes measuring options")
        value = metric_of(metric)
        target = check_positive_number(target, f"target_{metric}" if isinstance(metric, str) else "target",
                                       TARGET_FORMS.get(metric) if isinstance(metric, str) else None)

        def plan_at(phi: float) -> ScalingPlan:
            return self.plan(phi, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width,
                             resolution=resolution, strategy=strategy)

        found = plan_at(search_phi(lambda phi: value(plan_at(phi)), target))
        got = value(found)
        if abs(got / target - 1) > 0.05:
            warnings.warn(f"compscale: the plan of {self.model_name} closest to {target:.4g} {metric_name(metric)} "
                          f"along strategy {found.multipliers.strategy or strategy!r} gives {got:.4g} "
                          f"({got / target - 1:+.0%}, phi={found.multipliers.phi:g}): costs move in steps (whole "
                          "blocks, widths and sizes rounded to 8), and a target below the smallest network is out of "
                          "reach", stacklevel=2)
        check_size(self.model_name, found, max_params)
        return found

    def plan_for(self, mult: Multipliers) -> ScalingPlan:
        mult = depth_to_apply(self.table, mult, self.options, self.model_name, warn=False)
        if self.options.strict and self.options.stages is None:
            check_evidence(self.table, mult.depth, True, self.model_name)
        counts = stage_counts(self.table, mult.depth, self.dense_costs)
        probe = self._probe(self._dense_counts(counts))
        widths = plan_widths(probe.cg, probe.derivations, mult.width, self.options)
        size = plan_input_size(self.base_size, mult.resolution, self.options.resolution_divisor)
        extra = {s.index: counts[s.index] - len(s.blocks) for s in self.table if not s.grows}
        costs = probe.cost.cost(widths, extra, size)
        return ScalingPlan(
            mult, self.base_size, size,
            stages=[StagePlan(s.name, len(s.blocks), counts[s.index], s.in_channels, s.out_channels, s.stride)
                    for s in self.table],
            groups=[GroupPlan(g.id, g.base, widths[g.id], probe.derivations[g.id].rule,
                              tuple(p for p, _ in g.members)) for g in probe.cg.groups],
            options=self.options.stored(), macs=costs.macs, params=costs.params, acts=costs.acts,
            base_macs=self.base_macs, base_params=self.base_params, base_acts=self.base_acts,
        )


def target_planner(model: nn.Module, options: ScaleOptions, metric: str) -> Planner:
    """The planner of a ``target_<metric>=`` search; a detector, which it cannot trace, is refused with a hint."""
    try:
        return Planner(model, options)
    except TraceError as e:
        refuse_target(model, f"target_{metric}", e)
        raise


def plan(model: nn.Module, phi: float | None = None, *, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
         depth: float | None = None, width: float | None = None, resolution: float | None = None,
         strategy: StrategyLike | None = None, target_macs: float | None = None, target_acts: float | None = None,
         target_latency: float | None = None, vary: str = "phi", max_params: int | None = None,
         neck_width: float | None = None, head_depth: int | None = None, **options: Any) -> ScalingPlan:
    """What ``compscale.scale`` would build, with its MACs, params and activations, allocating no weight.

    With ``target_macs`` (or ``target_acts``, ``target_latency``), phi is searched along ``strategy`` to land on it
    (:meth:`Planner.solve`). With ``max_params``, a plan with more parameters raises ``TooLargeError`` (the plan
    allocates nothing; ``scale`` would refuse it). ``options`` are
    :class:`~compscale.planning.options.ScaleOptions`'s (``input_size``,
    ``round_width``, ``stages``, ``fixed``...).
    """
    check_unwrapped(model, "plan")
    check_module(model, "plan")
    opts = ScaleOptions.make(**options)
    max_params = check_max_params(max_params)
    target = pick_target(target_macs, target_acts, target_latency)
    if target is not None:
        if phi is not None:
            raise ValueError(f"target_{target[0]} searches phi: give no phi with it")
        return target_planner(model, opts, target[0]).solve(
            target[1], target[0], strategy=strategy, vary=vary, alpha=alpha, beta=beta, gamma=gamma, depth=depth,
            width=width, resolution=resolution, max_params=max_params)
    strategy = strategy_of(vary, strategy)
    # the arguments checked before the model is traced
    mult = resolve_multipliers(phi, alpha, beta, gamma, depth, width, resolution, strategy, rank=len(opts.input_size))
    plan_input_size(opts.input_size, mult.resolution, opts.resolution_divisor)
    neck = neck_arguments(neck_width, head_depth)
    try:
        planner = Planner(model, opts)
    except TraceError as e:  # a detector: planned by building it
        given = "input_size" in options or "example_inputs" in options
        found = plan_detector(model, with_neck(mult, depth is not None, width is not None, *neck), opts, given, e)
        check_size(type(model).__name__, found, max_params)
        return found
    if neck != (None, None):
        raise ValueError(f"neck_width= and head_depth= scale a detector's feature network and heads; "
                         f"{type(model).__name__} is planned as one network: leave them out")
    found = planner.plan_for(mult)
    check_size(planner.model_name, found, max_params)
    return found


