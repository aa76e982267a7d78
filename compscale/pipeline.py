"""The scaling pipeline: trace -> analyse (stages, channel groups) -> plan (counts, widths) -> rewrite (depth,
width, resolution) -> verify, from multipliers to a built network.

:func:`build` is what :func:`compscale.scale` runs once the multipliers are known; the planner
(:class:`compscale.Planner`) runs the same plan steps (:func:`~compscale.planning.depth.stage_counts`,
:func:`~compscale.planning.planner.plan_widths`) on a meta-device probe to cost a plan without building it.
:func:`solve_latency` ties the two: it plans on counted metrics and confirms by timing built candidates.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compscale.analyse.channels import analyse_channels
from compscale.analyse.rules import channel_rules
from compscale.analyse.stages import StageTable, find_stages
from compscale.errors import RewriteError
from compscale.planning.depth import dense_costs, stage_counts, transition_ratios
from compscale.planning.options import ScaleOptions
from compscale.planning.plan import GroupPlan, Multipliers, ScalingPlan, StagePlan, plan_input_size
from compscale.planning.planner import Planner, derive_widths, no_stage_error, plan_widths, search_phi
from compscale.planning.strategy import StrategyLike
from compscale.rewrite.depth import deepen
from compscale.rewrite.init import InitRules
from compscale.rewrite.padding import follow_same_padding
from compscale.rewrite.preserve import Growth, cancel_new_channels
from compscale.rewrite.resolution import adapt_inputs
from compscale.rewrite.width import apply_widths
from compscale.trace import trace
from compscale.trace.tracer import Traced, graph_module, propagate_shapes
from compscale.verify.function import output_error

__all__ = ["build", "solve_latency"]

log = logging.getLogger("compscale")


def build(model: nn.Module, mult: Multipliers, options: ScaleOptions, growth: Growth | None = None,
          seed: int | None = None) -> nn.Module:
    """A scaled copy of ``model`` by ``mult``, carrying its plan as ``result.scaling``.

    ``growth`` grows the model's weights (``init="preserve"``); ``seed`` seeds every random draw, in a forked
    generator (preserve draws with seed 0 when none is given).
    """
    with channel_rules(options.rules), contextlib.ExitStack() as rng:  # rng: seeded draws, restored even on error
        if seed is not None or growth is not None:
            rng.enter_context(_seeded(model, 0 if seed is None else seed))
        work = copy.deepcopy(model)
        kept = {id(p) for p in work.parameters()}
        if growth is not None:
            growth.kept = kept
        base = options.input_size
        traced = trace(work, options.input_shape, input_size=base, leaf_modules=options.leaf_modules,
                       autowrap_functions=options.autowrap_functions, extra_inputs=options.extra_inputs)
        plan = ScalingPlan(mult, base, plan_input_size(base, mult.resolution, options.resolution_divisor),
                           options=options)
        init_rules = InitRules(model)
        table = find_stages(traced, options.stages)
        work, plan.stages = _scale_depth(work, traced, table, mult.depth, init_rules, growth)
        deepened = any(s.blocks_before != s.blocks_after for s in plan.stages)
        same_graph = not deepened  # the graph traced above is still the network's: verify without re-tracing
        if mult.width != 1.0:
            if deepened:
                traced = traced.retrace(work, traced.input_shape)
            cg = analyse_channels(traced)
            derivations = derive_widths(traced, cg, table if options.stages is None and not deepened else None)
            widths = plan_widths(cg, derivations, mult.width, options)
            changed = apply_widths(work, cg, widths, init_rules, growth)
            # numbers the forward reads from the layers (split sizes, a traced-through norm's shape) are baked into
            # the graph; only layers the graph calls as leaves can change without it changing
            leaves = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
            same_graph = not (cg.literals or cg.shape_owners) and set(changed) <= leaves
            plan.groups = [GroupPlan(g.id, g.base, widths[g.id], derivations[g.id].rule,
                                     tuple(p for p, _ in g.members)) for g in cg.groups]
        rng.close()
        if growth is not None:
            plan.init, plan.init_error = "preserve", output_error(model, work, traced.input_shape,
                                                                  options.extra_inputs)
        if plan.input_size != base:
            same_graph = False
            follow_same_padding(work, traced, (*traced.input_shape[:2], *plan.input_size))
            adapt_inputs(work, traced, (*traced.input_shape[:2], *plan.input_size), init_rules,
                         notes=growth.inexact if growth is not None else None)
        _verify(work, traced, plan, same_graph and traced.root is work)
        _unfreeze_new(work, kept | (growth.grown if growth is not None else set()))
        if growth is not None:
            plan.inexact = dict(growth.inexact)
            _warn_inexact(type(model).__name__, plan, growth.noise)
        work.scaling = plan  # type: ignore[assignment]
        log.info("scaled %s:\n%s", type(model).__name__, plan)
        return work


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Draw from torch's generators seeded with ``seed`` (the model's device's too), then restore their states."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _warn_inexact(name: str, plan: ScalingPlan, noise: float) -> None:
    """One warning naming what ``init="preserve"`` could not grow exactly, or a measured difference it cannot
    explain."""
    err = plan.init_error if plan.init_error is not None else 0.0
    if plan.inexact:
        items = [f"{path} ({why})" for path, why in plan.inexact.items()]
        warnings.warn(
            f"compscale: init='preserve' grew {name} exactly except {len(items)} layers or blocks, so its outputs "
            f"differ by {err:.3g} of their largest value: {'; '.join(items[:6])}{'; ...' if len(items) > 6 else ''}; "
            "they are listed in result.scaling.inexact",
            stacklevel=4,
        )
    elif err > 1e-4 and not noise:
        warnings.warn(
            f"compscale: init='preserve' grew {name}, but its outputs differ by {err:.3g} of their largest value and "
            "compscale cannot tell which layer is to blame; please report this with the model",
            stacklevel=4,
        )


def _unfreeze_new(work: nn.Module, kept: set[int]) -> None:
    """Re-initialised parameters of frozen layers become trainable, with one warning naming them.

    A frozen layer whose weights compscale drew anew (it changed width, or it is a new block) would otherwise
    stay random forever.
    """
    frozen = [name for name, p in work.named_parameters() if id(p) not in kept and not p.requires_grad]
    if not frozen:
        return
    for p in work.parameters():
        if id(p) not in kept:
            p.requires_grad_(True)
    layers = sorted({name.rpartition(".")[0] for name in frozen})
    warnings.warn(
        f"compscale: {len(layers)} layers of {type(work).__name__} were frozen (requires_grad=False) and are "
        f"re-initialised, so they are now trainable: {', '.join(layers[:5])}{', ...' if len(layers) > 5 else ''}; "
        "freeze them again if that is what you want",
        stacklevel=4,
    )


def _scale_depth(work: nn.Module, traced: Traced, table: StageTable, d: float,
                 rules: InitRules, growth: Growth | None) -> tuple[nn.Module, list[StagePlan]]:
    counts = stage_counts(table, d, dense_costs(traced, table))
    if d != 1.0 and not len(table):
        raise no_stage_error(type(work).__name__, table)
    work, added = deepen(work, traced, table, counts, rules, growth) if d != 1.0 else (work, {})
    if any(s.grows and counts[s.index] != len(s.blocks) for s in table):  # dense blocks feed more channels on
        before = dict(work.named_modules()) if growth is not None else {}
        changed = adapt_inputs(work, traced, traced.input_shape, rules, warn=False,
                               keep_ratio=transition_ratios(traced, table))
        if growth is not None:  # the new dense layers' channels are cancelled where the old layers read them
            new_layers = [p for s in table if s.grows for p in added.get(s.index, ())]
            cancel_new_channels(work, analyse_channels(traced.retrace(work, traced.input_shape)), before, changed,
                                new_layers, growth)
    return work, [StagePlan(s.name, len(s.blocks), counts[s.index], s.in_channels, s.out_channels, s.stride,
                      tuple(added.get(s.index, ()))) for s in table]


def _verify(work: nn.Module, traced: Traced, plan: ScalingPlan, same_graph: bool = False) -> None:
    """Re-trace the result at its new input size (or, when the rewrite changed only layers the graph calls, run
    the traced graph over them again) and lint the graph; the output keeps its shape."""
    before = [tuple(traced.shape(n)) for n in traced.output_nodes]
    shape = (*traced.input_shape[:2], *plan.input_size)
    after_traced = _rebind(traced, work, shape) if same_graph else traced.retrace(work, shape)
    after_traced.graph.lint()
    after = [tuple(after_traced.shape(n)) for n in after_traced.output_nodes]
    if [s[:2] for s in after] != [s[:2] for s in before]:
        raise RewriteError(
            f"the scaled {type(work).__name__} returns {after} where the model returned {before}",
            "report this with the model; meanwhile scale the dimensions one at a time to find the culprit.",
        )


def _rebind(traced: Traced, model: nn.Module, input_shape: tuple[int, ...]) -> Traced:
    """``traced``'s graph over ``model``'s current layers, its shapes propagated again at ``input_shape``."""
    gm = graph_module(model, copy.deepcopy(traced.graph), type(model).__name__)
    gm.meta.update(traced.gm.meta)
    new = Traced(model, gm, tuple(input_shape), traced.leaf_modules, traced.autowrap_functions, traced.extra_inputs)
    propagate_shapes(new)
    return new


def solve_latency(planner: Planner, target: float, *, strategy: StrategyLike | None = None, alpha: float = 1.2,
                  beta: float = 1.1, gamma: float = 1.15, depth: float | None = None, width: float | None = None,
                  resolution: float | None = None, candidates: int = 4, **measure: Any) -> ScalingPlan:
    """The plan whose measured latency comes closest to ``target`` seconds per call, along ``strategy``.

    Latency is timed on built networks (fresh weights, the model's device and dtype), which costs seconds each, so
    the search plans on a counted metric and measures few candidates: the base model, then up to ``candidates``
    networks, each at the phi where a line through the measured ``(phi, log latency)`` points meets the target
    (the first guess assumes latency grows with activations, Dollar et al.'s finding). The plan returned carries
    its measured latency in ``plan.latency``.

    Args:
        planner: the analysed model (its ``model`` is built and timed; its options decide the build).
        target: seconds per call of the scaled network, at the batch size ``measure`` gives (1 by default).
        candidates: the most scaled networks built and timed.
        measure: :func:`compscale.verify.latency.latency`'s options (``batch_size``, ``min_run_time``...).
    """
    from compscale.verify.latency import latency

    if not (isinstance(target, (int, float)) and math.isfinite(target) and target > 0):
        raise ValueError(f"target_latency must be a positive number of seconds, got {target!r}")

    def plan_at(phi: float) -> ScalingPlan:
        return planner.plan(phi, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width,
                            resolution=resolution, strategy=strategy)

    def timed(p: ScalingPlan) -> float:
        net = build(planner.model, p.multipliers, planner.options)
        return latency(net, p.input_size, example_inputs=_timing_inputs(planner.options, p.input_size),
                       **measure).median

    base_time = latency(planner.model, planner.base_size,
                        example_inputs=_timing_inputs(planner.options, planner.base_size), **measure).median
    measured: dict[float, float] = {0.0: base_time}
    base_acts = float(plan_at(0.0).acts or 1)
    phi = search_phi(lambda x: float(plan_at(x).acts or 0) / base_acts, target / base_time)  # latency ~ acts
    for _ in range(candidates):
        phi = round(phi, 6)
        if phi in measured:
            break
        measured[phi] = timed(plan_at(phi))
        phi = _next_phi(measured, target)
    best = min(measured, key=lambda x: abs(math.log(measured[x] / target)))
    result = plan_at(best)
    result.latency = measured[best]
    log.info("target latency %.4g s: measured %s", target, {f"{k:g}": f"{v:.4g}" for k, v in sorted(measured.items())})
    return result


def _next_phi(measured: dict[float, float], target: float) -> float:
    """Where the line through the two measured points nearest the target (in log latency) meets it."""
    near = sorted(measured, key=lambda x: abs(math.log(measured[x] / target)))[:2]
    (x0, y0), (x1, y1) = ((x, math.log(measured[x])) for x in near)
    if x0 == x1 or y0 == y1:
        return x0
    return x0 + (math.log(target) - y0) * (x1 - x0) / (y1 - y0)


def _timing_inputs(options: ScaleOptions, size: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs to time with at spatial ``size``, when the options have them (shapes only)."""
    if options.input_shape is None:
        return ()
    return (torch.empty((*options.input_shape[:2], *size)), *options.extra_inputs)
