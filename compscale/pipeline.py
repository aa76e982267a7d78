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
from compscale.errors import RewriteError, TooLargeError
from compscale.planning.budget import params_limit
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
                           options=options.stored())
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
    after_traced = None
    if same_graph and traced.gm.meta.get("compscale_symbolic"):
        try:
            after_traced = _rebind(traced, work, shape)
        except Exception:  # a number the forward read from a layer is baked into the graph: trace it again
            after_traced = None
    if after_traced is None:
        after_traced = traced.retrace(work, shape)
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

    Latency is timed on built networks (fresh weights drawn with seed 0, the model's device and dtype), which costs
    seconds each, so the search plans on a counted metric and measures few candidates: the network at phi = 0
    (the base model itself unless explicit multipliers scale it), then up to ``candidates`` networks, each at the
    phi where a line through the two measured ``(phi, log latency)`` points nearest the target meets it (the first
    guess assumes latency grows with activations, Dollar et al.'s finding). Steps stay within 2 of the measured
    phis, and inside the bracket once the target is bracketed; a candidate larger than the device's memory allows
    is not built. The plan returned carries its measured latency in ``plan.latency``.

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

    def timed(p: ScalingPlan) -> float | None:
        m = p.multipliers
        if (m.depth, m.width, m.resolution) == (1.0, 1.0, 1.0):
            net = planner.model
        elif not _fits(planner.model, p):
            return None
        else:
            with _seeded(planner.model, 0):
                net = build(planner.model, p.multipliers, planner.options)
        inputs = _timing_inputs(planner.options, p.input_size)
        return latency(net, p.input_size, example_inputs=inputs, **measure).median

    base = plan_at(0.0)
    measured: dict[float, float] = {}
    first = timed(base)
    if first is None:
        raise TooLargeError(f"{planner.model_name} at phi=0 with the given multipliers does not fit in memory",
                            "give smaller multipliers.")
    measured[0.0] = first
    phi = search_phi(lambda x: float(plan_at(x).acts or 0) / float(base.acts or 1), target / first)  # ~ acts
    for _ in range(candidates):
        phi = round(phi, 6)
        if phi in measured:
            break
        got = timed(plan_at(phi))
        if got is None:  # too large to build: the target lies below
            measured[phi] = math.inf
        else:
            measured[phi] = got
        phi = _next_phi(measured, target)
    finite = {x: t for x, t in measured.items() if math.isfinite(t)}
    best = min(finite, key=lambda x: abs(math.log(finite[x] / target)))
    result = plan_at(best)
    result.latency = finite[best]
    log.info("target latency %.4g s: measured %s", target, {f"{k:g}": f"{v:.4g}" for k, v in sorted(measured.items())})
    return result


def _next_phi(measured: dict[float, float], target: float) -> float:
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


def _fits(model: nn.Module, plan: ScalingPlan) -> bool:
    """Whether the planned network fits in half the free memory of the model's device (as ``scale`` checks)."""
    limit = params_limit(model)
    return limit is None or plan.params is None or plan.params <= limit


def _timing_inputs(options: ScaleOptions, size: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs to time with at spatial ``size``, when the options have them (shapes only)."""
    if options.input_shape is None:
        return ()
    return (torch.empty((*options.input_shape[:2], *size)), *options.extra_inputs)
