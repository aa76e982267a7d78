"""Depth policy: how many blocks each stage gets at a depth multiplier.

* A stage of repeated blocks gets ``ceil(n * d)`` blocks (:func:`~compscale.planning.rounding.repeats`),
  the published rule.
* A dense (growing) stage, whose every layer reads all the channels before it, gets the fewest layers
  whose MACs reach ``d`` times the stage's (:func:`~compscale.planning.rounding.dense_repeats`): its layers
  cost more the deeper they sit, so counting layers would multiply its cost by about ``d**2``.
* A stage found on a weaker signal than a repeat of the model's own (``Stage.guessed``) is named in one
  :class:`~compscale.GuessWarning` when it gets blocks (:func:`check_evidence`), or refused with ``strict=True``.
* The convs between a dense stage and the next dense block (DenseNet's transitions) keep the ratio of their
  outputs to their inputs (:func:`transition_ratios`): DenseNet-BC halves every dense block's output
  (``num_features // 2``), so the next block starts wider when the one before it grew.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from compscale.analyse.stages import Block, Evidence, StageFilter, StageTable
from compscale.errors import GuessError, GuessWarning, NoStageError
from compscale.planning.cost import layer_macs
from compscale.planning.rounding import dense_repeats, repeats
from compscale.trace import Traced

if TYPE_CHECKING:
    from compscale.planning.options import ScaleOptions
    from compscale.planning.plan import Multipliers

__all__ = ["block_macs", "check_evidence", "dense_costs", "depth_to_apply", "no_stage_error", "stage_counts",
           "transition_ratios"]

_WHY: dict[Evidence, str] = {
    "place": "a lone block known only by its container's place among the stages",
    "lone": "a lone run of layers that the network repeats nowhere",
    "class": "a lone block of a kind the network repeats elsewhere",
    "repeats": "repeated blocks",
}


def dense_costs(traced: Traced, table: StageTable) -> dict[int, list[int]]:
    """The MACs of each layer of each dense (growing) stage, by stage index: what :func:`stage_counts` needs."""
    return {s.index: [block_macs(traced, b) for b in s.blocks] for s in table if s.grows}


def stage_counts(table: StageTable, depth: float, costs: Mapping[int, Sequence[int]]) -> dict[int, int]:
    """Blocks per stage index of ``table`` at depth multiplier ``depth`` (``costs`` from :func:`dense_costs`)."""
    if depth == 1.0:
        return {s.index: len(s.blocks) for s in table}
    return {s.index: dense_repeats(costs[s.index], depth) if s.grows else repeats(len(s.blocks), depth)
            for s in table}


def check_evidence(table: StageTable, depth: float, strict: bool, name: str, warn: bool = True) -> None:
    """Name the guessed stages (``Stage.guessed``) that depth ``depth`` gives blocks: in one
    :class:`~compscale.GuessWarning` (when ``warn``), or a :class:`~compscale.GuessError` when ``strict``."""
    guessed = [s for s in table if s.guessed and not s.grows and repeats(len(s.blocks), depth) > len(s.blocks)]
    if not guessed:
        return
    items = "; ".join(f"{s.name} ({_WHY[s.evidence]})" for s in guessed)
    if strict:
        raise GuessError(f"{name}: {_stages(len(guessed))} would be deepened on a guess (strict=True): {items}",
                         "name the stages to deepen with `stages=` (compscale.analyse.stages.find_stages shows them), "
                         "or pass strict=False to accept the guess.")
    if warn:
        warnings.warn(f"compscale: {name} was deepened in {_stages(len(guessed))} found on a weaker signal than a "
                      f"repeat of its own: {items}; they are marked in the stage table (evidence), and strict=True "
                      "refuses them; name the stages to deepen with `stages=` to choose", GuessWarning, stacklevel=4)


def depth_to_apply(table: StageTable, mult: Multipliers, options: ScaleOptions, name: str, warn: bool = True
                   ) -> Multipliers:
    """``mult``, or ``mult`` at depth 1 when the model has no stage and the depth came from ``phi``.

    A compound step on a model whose units compscale cannot repeat (two-map octave units, layers called by name)
    still widens and resizes it: the depth is left as it is, in one :class:`~compscale.GuessWarning` (when
    ``warn``) and in the plan's multipliers. An explicit ``depth=``, a ``stages=`` filter or ``strict=True`` raises
    :class:`~compscale.NoStageError` instead.
    """
    if mult.depth == 1.0 or len(table):
        return mult
    if mult.phi is None or mult.depth_given or options.stages is not None or options.strict:
        raise no_stage_error(name, table, options.stages)
    if warn:
        reason = _no_stage_reason(table)
        warnings.warn(f"compscale: {name} was widened and resized but not deepened (depth x{mult.depth:.3g} of "
                      f"phi={mult.phi:g} left at x1): it has no stage to deepen ({reason}); strict=True refuses "
                      "instead", GuessWarning, stacklevel=4)
    return dataclasses.replace(mult, depth=1.0)


def no_stage_error(name: str, table: StageTable, stages: StageFilter | None = None) -> NoStageError:
    """The error for a depth multiplier on a model without stages (shared with ``scale``); with a ``stages=`` filter,
    that it matched no block."""
    if stages is not None:
        shown = "a predicate" if callable(stages) else repr(list(stages))
        return NoStageError(
            f"stages={shown} matched no block of {name} to deepen: depth scaling is restricted to blocks under these "
            "module paths (or that the predicate accepts), and none is a block",
            "name module paths of blocks or of their containers as model.named_modules() gives them (e.g. "
            "stages=['layer3']), or leave stages= out to deepen every stage.",
        )
    return NoStageError(
        f"{name} has no stage to deepen: {_no_stage_reason(table)}",
        "compscale repeats blocks that carry their input through, or the units of a plain network kept in "
        "containers (nn.Sequential, nn.ModuleList); keep the units so, scale width and resolution only (depth=1), "
        "or restrict depth scaling to some blocks with `stages=`.",
    )


def _no_stage_reason(table: StageTable) -> str:
    """Why a model has no stage, naming the blocks looked at: the error's and the warning's words."""
    seen = [b.path for b in table.blocks if b.path.count(".") <= 1][:3]
    looked = f"; its blocks ({', '.join(repr(p) for p in seen)}, ...) do not" if seen else ""
    return ("no block of its graph merges its own input back into its output (a residual add, or a concat of a "
            "dense layer or channel split, with stride 1), no container holds several blocks of one type, and no "
            f"flat nn.Sequential holds runs of convolutions{looked}")


def _stages(n: int) -> str:
    return f"{n} stage" if n == 1 else f"{n} stages"


def transition_ratios(traced: Traced, table: StageTable) -> dict[str, Fraction]:
    """``out / in`` of each conv between a dense stage of ``table`` and the next dense block, by module path.

    The nodes after the stage's output up to the input of the next growing block of the network (a transition:
    norm, conv, pool) must hold no residual block; a stage that other blocks follow has no transition.
    """
    nodes = list(traced.graph.nodes)
    pos = {n.name: i for i, n in enumerate(nodes)}
    dense_starts = sorted(pos[b.entry] for b in table.blocks if b.grows)
    residual_starts = [pos[b.entry] for b in table.blocks if b.residual and not b.grows]
    ratios: dict[str, Fraction] = {}
    for stage in table:
        end = pos[stage.exit]
        start = next((p for p in dense_starts if p >= end), None)
        if not stage.grows or start is None or any(end <= p < start for p in residual_starts):
            continue
        for node in nodes[end + 1:start + 1]:
            module = traced.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1:
                ratios[str(node.target)] = Fraction(module.out_channels, module.in_channels)
    return ratios


def block_macs(traced: Traced, block: Block) -> int:
    """MACs of the convolutions and linear layers inside ``block``, at the traced input size (batch 1)."""
    prefix = block.path + "."
    total = 0
    for node in traced.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(prefix):
            total += _layer_macs(traced, node)
    return total


def _layer_macs(traced: Traced, node: fx.Node) -> int:
    module = traced.gm.get_submodule(str(node.target))
    if not traced.has_shape(node):
        return 0
    out = traced.shape(node)
    per_sample = math.prod(out[1:]) if len(out) > 1 else math.prod(out)
    if isinstance(module, nn.modules.conv._ConvNd):
        return layer_macs(per_sample, module.in_channels, module.groups, math.prod(module.kernel_size), 1)
    if isinstance(module, nn.Linear):
        return layer_macs(per_sample, module.in_features, 1, 1, 1)
    return 0
