"""``compscale.scale``: trace -> analyse -> plan -> rewrite (depth, width) -> verify."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from compscale.analyse.channels import ChannelGraph, analyse_channels
from compscale.analyse.stages import StageFilter, StageTable, find_stages
from compscale.errors import RewriteError, WidthError
from compscale.planning.depth import dense_costs, stage_counts, transition_ratios
from compscale.planning.plan import (
    GroupPlan,
    ScalingPlan,
    StagePlan,
    as_hw,
    plan_input_size,
    resolve_multipliers,
)
from compscale.planning.planner import Planner, no_stage_error
from compscale.planning.policy import RoundFn, default_independent, derive, resolve_widths
from compscale.planning.rounding import make_divisible
from compscale.rewrite.depth import deepen
from compscale.rewrite.init import InitRules
from compscale.rewrite.resolution import adapt_inputs
from compscale.rewrite.width import apply_widths
from compscale.trace import trace
from compscale.trace.tracer import Traced

__all__ = ["scale"]

log = logging.getLogger("compscale")


def scale(
    model: nn.Module,
    phi: float | None = None,
    *,
    alpha: float = 1.2,
    beta: float = 1.1,
    gamma: float = 1.15,
    depth: float | None = None,
    width: float | None = None,
    resolution: float | None = None,
    input_size: int | Sequence[int] = 224,
    resolution_divisor: int = 8,
    round_width: RoundFn = make_divisible,
    stages: StageFilter | None = None,
    fixed: Sequence[str] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    target_macs: float | None = None,
    vary: str = "phi",
) -> nn.Module:
    """Return ``model`` scaled in depth, width and resolution, as a hand-built variant would be.

    ``d = alpha**phi``, ``w = beta**phi``, ``r = gamma**phi``; ``depth``/``width``/``resolution`` override the
    phi-derived multiplier of their dimension (``scale(m, depth=2)`` deepens only). The caller's model is not
    modified; the result is a new module on the same device and dtype, carrying its plan as
    ``result.scaling`` (``result.scaling.input_size`` is the ``(H, W)`` to run it at).

    Args:
        model: the network to scale.
        phi: compound coefficient.
        alpha, beta, gamma: per-dimension bases of the compound rule.
        depth, width, resolution: explicit multipliers.
        input_size: the base model's input size (``(H, W)`` or one int).
        resolution_divisor: the new input size is a multiple of it.
        round_width: ``round_width(channels, divisor) -> int`` for independent channel groups.
        stages: restrict depth scaling to blocks under these module paths, or to blocks whose path a
            predicate accepts.
        fixed: layers (module paths) whose output width must not change; widths derived from them follow.
        leaf_modules, autowrap_functions: passed to the torch.fx tracer.
        target_macs: scale to about this many MACs instead of a given ``phi``: ``vary`` (``"phi"``, or one of
            ``"depth"``, ``"width"``, ``"resolution"`` with the other multipliers as given, 1 by default) is
            searched on the plan (:meth:`compscale.Planner.solve`; no weights are built while searching).

    Raises:
        TypeError, ValueError: a bad multiplier.
        CompscaleError: the model cannot be scaled (its subclasses say why and give a hint).

    Example:
        >>> from torchvision.models import resnet50
        >>> deeper = scale(resnet50(), depth=2)
        >>> [len(s) for s in (deeper.layer1, deeper.layer2, deeper.layer3, deeper.layer4)]
        [6, 8, 12, 6]
    """
    if target_macs is not None:
        if phi is not None or fixed:
            raise ValueError("target_macs searches phi (or one multiplier): give no phi, and no fixed= with it")
        planner = Planner(model, input_size=input_size, resolution_divisor=resolution_divisor,
                          round_width=round_width, stages=stages, leaf_modules=leaf_modules,
                          autowrap_functions=autowrap_functions)
        solved = planner.solve(target_macs, vary, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width,
                               resolution=resolution)
        phi, depth, width, resolution = solved.multipliers.phi, solved.depth, solved.width, solved.resolution
    mult = resolve_multipliers(phi, alpha, beta, gamma, depth, width, resolution)
    base = as_hw(input_size)
    work = copy.deepcopy(model)
    traced = trace(work, input_size=base, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    plan = ScalingPlan(mult, base, plan_input_size(base, mult.resolution, resolution_divisor))
    plan.options = {"resolution_divisor": resolution_divisor, "fixed": list(fixed),
                    "stages": stages if stages is None or callable(stages) else list(stages),
                    "round_width": round_width, "leaf_modules": tuple(leaf_modules),
                    "autowrap_functions": tuple(autowrap_functions)}
    rules = InitRules(model)
    table = find_stages(traced, stages)
    work, plan.stages = _scale_depth(work, traced, table, mult.depth, rules)
    if mult.width != 1.0:
        if any(s.blocks_before != s.blocks_after for s in plan.stages):
            traced = traced.retrace(work, traced.input_shape)
        cg = analyse_channels(traced)
        derivations = derive(cg, [b.path for s in find_stages(traced) for b in s.blocks])  # all blocks, not stages=
        widths = resolve_widths(cg, default_independent(mult.width, round_width), derivations=derivations,
                                seeds=_fixed_widths(cg, fixed))
        apply_widths(work, cg, widths, rules)
        plan.groups = [GroupPlan(g.id, g.base, widths[g.id], derivations[g.id].rule, tuple(p for p, _ in g.members))
                       for g in cg.groups]
    if plan.input_size != base:
        adapt_inputs(work, traced, (*traced.input_shape[:2], *plan.input_size), rules)
    _verify(work, traced, plan)
    work.scaling = plan  # type: ignore[assignment]
    log.info("scaled %s:\n%s", type(model).__name__, plan)
    return work


def _scale_depth(work: nn.Module, traced: Traced, table: StageTable, d: float,
                 rules: InitRules) -> tuple[nn.Module, list[StagePlan]]:
    counts = stage_counts(table, d, dense_costs(traced, table))
    if d != 1.0 and not len(table):
        raise no_stage_error(type(work).__name__, table)
    work, added = deepen(work, traced, table, counts, rules) if d != 1.0 else (work, {})
    if any(s.grows and counts[s.index] != len(s.blocks) for s in table):  # dense blocks feed more channels on
        adapt_inputs(work, traced, traced.input_shape, rules, warn=False,
                     keep_ratio=transition_ratios(traced, table))
    return work, [StagePlan(s.name, len(s.blocks), counts[s.index], s.in_channels, s.out_channels, s.stride,
                      tuple(added.get(s.index, ()))) for s in table]


def _fixed_widths(cg: ChannelGraph, fixed: Sequence[str]) -> dict[int, int]:
    """Seeds that keep the output group of each layer in ``fixed`` at its width."""
    seeds = {}
    for path in fixed:
        if path not in cg.layers and path not in cg.norms and path not in cg.depthwise:
            raise WidthError(f"fixed={path!r} names no conv, linear or norm layer of the model",
                             "give module paths as in model.named_modules(), e.g. 'layer4.2.conv3'.")
        g = cg.group_of(path)
        seeds[g.id] = g.base
    return seeds


def _verify(work: nn.Module, traced: Traced, plan: ScalingPlan) -> None:
    """Re-trace the result at its new input size and lint the graph; the output keeps its shape."""
    before = tuple(traced.shape(traced.output_node))
    after_traced = traced.retrace(work, (*traced.input_shape[:2], *plan.input_size))
    after_traced.graph.lint()
    after = tuple(after_traced.shape(after_traced.output_node))
    if after[:2] != before[:2]:
        raise RewriteError(
            f"the scaled {type(work).__name__} returns {after} where the model returned {before}",
            "report this with the model; meanwhile scale the dimensions one at a time to find the culprit.",
        )
