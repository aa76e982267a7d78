"""The scaling pipeline: trace -> analyse (stages, channel groups) -> plan (counts, widths) -> rewrite (depth,
width, resolution) -> verify, from multipliers to a built network.

:func:`build` is what :func:`compscale.scale` runs once the multipliers are known; the planner
(:class:`compscale.Planner`) runs the same plan steps (:func:`~compscale.planning.depth.stage_counts`,
:func:`~compscale.planning.policy.plan_widths`) on a meta-device probe to cost a plan without building it.
:func:`compscale.latency_search.solve_latency` ties the two: it plans on counted metrics and confirms by timing
built candidates.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from compscale.analyse.channels import analyse_channels
from compscale.analyse.levels import find_towers, pyramid_groups
from compscale.analyse.rules import channel_rules
from compscale.analyse.stages import StageTable, find_stages
from compscale.arguments import give_hooks, take_hooks
from compscale.errors import RewriteError
from compscale.layers import copy_module
from compscale.planning.depth import (
    check_evidence,
    dense_costs,
    depth_to_apply,
    stage_counts,
    transition_ratios,
)
from compscale.planning.options import ScaleOptions
from compscale.planning.plan import GroupPlan, Multipliers, ScalingPlan, StagePlan, plan_input_size
from compscale.planning.policy import derive_widths, plan_widths
from compscale.randomness import Draws, drawing_from
from compscale.rewrite.depth import deepen, deepen_tower
from compscale.rewrite.init import InitRules
from compscale.rewrite.metadata import update_metadata
from compscale.rewrite.padding import follow_same_padding
from compscale.rewrite.preserve import Growth, cancel_new_channels
from compscale.rewrite.resolution import adapt_inputs, follow_global_pools
from compscale.rewrite.width import apply_widths
from compscale.trace import trace
from compscale.trace.parts import output_signature
from compscale.trace.tracer import Traced
from compscale.verify.function import output_error

__all__ = ["PRESERVE_TOLERANCE", "build", "preserve_tolerance"]

log = logging.getLogger("compscale")


def build(model: nn.Module, mult: Multipliers, options: ScaleOptions, growth: Growth | None = None,
          seed: int | None = None, base: Traced | None = None) -> nn.Module:
    """A scaled copy of ``model`` by ``mult``, carrying its plan as ``result.scaling``.

    ``growth`` grows the model's weights (``init="preserve"``); ``seed`` seeds every random draw, made from
    generators of this call's own (preserve draws with seed 0 when none is given; fresh weights with one draw of
    torch's global generator as the seed). ``base``: the model's graph, traced symbolically by the planner of a
    target search with these options: it is rebound to the copy instead of tracing it again.
    """
    with _collection_paused():
        return _build(model, mult, options, growth, seed, base)


def _build(model: nn.Module, mult: Multipliers, options: ScaleOptions, growth: Growth | None, seed: int | None,
           base: Traced | None) -> nn.Module:
    with channel_rules(options.rules), _seeded(model, 0 if seed is None and growth is not None else seed):
        work = copy_module(model)
        hooks = take_hooks(work)  # run on proxies by the tracer otherwise; the result gets them back
        kept = {id(p) for p in work.parameters()}
        if growth is not None:
            growth.kept = kept
        if base is not None and base.gm.meta.get("compscale_symbolic"):
            traced = base.rebind(work, base.input_shape)
        else:
            traced = trace(work, options.input_shape, input_size=options.input_size,
                           leaf_modules=options.leaf_modules, autowrap_functions=options.autowrap_functions,
                           extra_inputs=options.extra_inputs)
        base_graph = traced
        table = find_stages(traced, options.stages)
        mult = depth_to_apply(table, mult, options, type(model).__name__)
        size = options.input_size
        plan = ScalingPlan(mult, size, plan_input_size(size, mult.resolution, options.resolution_divisor),
                           options=options.stored())
        init_rules = InitRules(model)
        if options.stages is None:  # stages named by the user are theirs, not a guess
            check_evidence(table, mult.depth, options.strict, type(model).__name__)
        work, plan.stages = _scale_depth(work, traced, table, mult.depth, init_rules, growth, options)
        deepened = any(s.blocks_before != s.blocks_after for s in plan.stages)
        same_graph = not deepened  # the graph traced above is still the network's: verify without re-tracing
        if mult.width != 1.0 or mult.neck_width not in (None, 1.0) or mult.head_layers or mult.neck_layers:
            if deepened:
                traced = traced.retrace(work, traced.input_shape)
            cg = analyse_channels(traced)
            neck = pyramid_groups(traced, cg) if mult.neck_width is not None else set()
            derivations = derive_widths(traced, cg, table if options.stages is None and not deepened else None)
            widths = plan_widths(cg, derivations, mult.width, options,
                                 (neck, mult.neck_width) if mult.neck_width is not None else None)
            # EfficientDet's box/class net and BiFPN depths; towers are found at the base widths (a tower's first
            # conv reads the neck, which may round to another width than the tower's own groups)
            neck_layers = {la.path for la in cg.layers.values() if la.output in neck}
            towers = find_towers(work, neck_layers) if mult.head_layers or mult.neck_layers else []
            changed = apply_widths(work, cg, widths, init_rules, growth)
            for t in towers:
                more = mult.head_layers if t.kind == "head" else mult.neck_layers
                changed += deepen_tower(work, t, more, init_rules, growth)
                c = widths[cg.group_of(next(p for p in neck_layers if p.startswith(t.path + "."))).id]
                plan.stages.append(StagePlan(t.path, t.units, max(1, t.units + more), c, c, 1))
            # numbers the forward reads from the layers (split sizes, a traced-through norm's shape) are baked into
            # the graph; only layers the graph calls as leaves can change without it changing
            leaves = {str(n.target) for n in traced.graph.nodes if n.op == "call_module"}
            same_graph = not (cg.literals or cg.shape_owners) and set(changed) <= leaves
            plan.groups = [GroupPlan(g.id, g.base, widths[g.id], derivations[g.id].rule,
                                     tuple(p for p, _ in g.members)) for g in cg.groups]
        if growth is not None:
            plan.init, plan.init_error = "preserve", output_error(model, work, traced.input_shape,
                                                                  options.extra_inputs)
        # the graph still describes the network: the passes below rebind it instead of tracing again
        current = same_graph and traced.root is work and bool(traced.gm.meta.get("compscale_symbolic"))
        if plan.input_size != plan.base_input_size:
            new_shape = (*traced.input_shape[:2], *plan.input_size)
            follow_same_padding(work, traced, new_shape)
            follow_global_pools(work, traced, new_shape)
            adapt_inputs(work, traced, new_shape, init_rules, notes=growth.inexact if growth is not None else None,
                         current=current)
        result_graph = _verify(work, traced, plan, current)
        _unfreeze_new(work, kept | (growth.grown if growth is not None else set()))
        if growth is not None:
            plan.inexact = dict(growth.inexact)
            _warn_inexact(type(model).__name__, plan, growth.noise, _dtype(model))
        give_hooks(work, hooks)
        work.scaling = plan  # type: ignore[assignment]
    # what the model's library reads back describes the scaled network (it draws nothing: outside the seeded scope,
    # whose torch function mode would see every op of its meta-device forwards)
    update_metadata(work, model, plan, (base_graph, result_graph))
    log.info("scaled %s:\n%s", type(model).__name__, plan)
    return work


@contextlib.contextmanager
def _collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block: a build allocates hundreds of thousands of small
    objects (graph nodes, module copies), and the collections they trigger take a sixth of scaling mobilenet_v2.
    Nothing is freed later than it would be: the collector runs again as usual after the block."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int | None) -> Iterator[Draws]:
    """Within this block, on this thread, random fills draw from generators of compscale's own seeded with ``seed``
    (one per device the model's weights are on), or, without one, with one draw of torch's global generator; the
    global generators are neither reseeded nor drawn from again, and other threads are not touched."""
    with drawing_from(Draws(seed)) as draws:
        yield draws


def _dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (of its first floating parameter; float32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


PRESERVE_TOLERANCE = 1e-4
"""The output difference (relative to the output's largest value) within which ``init="preserve"`` counts as exact in
float32; in a dtype with a coarser epsilon, 8 of its epsilons (float16: 7.8e-3, bfloat16: 6.3e-2), for rounding that
changes with the order of sums. resnet18 grown in float16 and bfloat16 differs by 0.72 epsilon."""


def preserve_tolerance(dtype: torch.dtype) -> float:
    """The output difference beyond which ``init="preserve"`` in ``dtype`` is not exact (:data:`PRESERVE_TOLERANCE`).

    >>> preserve_tolerance(torch.float32), preserve_tolerance(torch.float16)
    (0.0001, 0.0078125)
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(PRESERVE_TOLERANCE, 8 * eps)


def _warn_inexact(name: str, plan: ScalingPlan, noise: float, dtype: torch.dtype = torch.float32) -> None:
    """One warning naming what ``init="preserve"`` could not grow exactly, or a measured difference it cannot
    explain (beyond the tolerance of ``dtype``: :func:`preserve_tolerance`)."""
    err = plan.init_error if plan.init_error is not None else 0.0
    if plan.inexact:
        items = [f"{path} ({why})" for path, why in plan.inexact.items()]
        warnings.warn(
            f"compscale: init='preserve' grew {name} exactly except {len(items)} layers or blocks, so its outputs "
            f"differ by {err:.3g} of their largest value: {'; '.join(items[:6])}{'; ...' if len(items) > 6 else ''}; "
            "they are listed in result.scaling.inexact",
            stacklevel=4,
        )
    elif err > preserve_tolerance(dtype) and not noise:
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


def _scale_depth(work: nn.Module, traced: Traced, table: StageTable, d: float, rules: InitRules,
                 growth: Growth | None, options: ScaleOptions) -> tuple[nn.Module, list[StagePlan]]:
    counts = stage_counts(table, d, dense_costs(traced, table))
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


def _verify(work: nn.Module, traced: Traced, plan: ScalingPlan, same_graph: bool = False) -> Traced:
    """Re-trace the result at its new input size (or, when the rewrite changed only layers the graph calls, run
    the traced graph over them again) and lint the graph; the output keeps its shape. Returns the result's graph."""
    before = [tuple(traced.shape(n)) for n in traced.output_nodes]
    shape = (*traced.input_shape[:2], *plan.input_size)
    after_traced = None
    if same_graph:
        try:
            after_traced = traced.rebind(work, shape)
        except Exception:  # a number the forward read from a layer is baked into the graph: trace it again
            after_traced = None
    if after_traced is None:
        after_traced = traced.retrace(work, shape)
    after_traced.graph.lint()
    after = [tuple(after_traced.shape(n)) for n in after_traced.output_nodes]
    if [output_signature(work, s) for s in after] != [output_signature(work, s) for s in before]:
        raise RewriteError(
            f"the scaled {type(work).__name__} returns {after} where the model returned {before}",
            "report this with the model; meanwhile scale the dimensions one at a time to find the culprit.",
        )
    return after_traced
