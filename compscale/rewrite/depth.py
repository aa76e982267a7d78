"""The depth pass: give each stage its planned number of blocks.

New blocks are appended at the stage's end as fresh copies of its repeat block (or of a synthesized one,
:mod:`compscale.rewrite.synth`), initialised as the model's constructor would. Drop-path rates that
are linear in the block index are re-spread over the new number of blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import nn

from compscale.analyse.stages import StageTable
from compscale.errors import RewriteError
from compscale.registry import drop_path_attr
from compscale.rewrite.init import InitRules, reinit
from compscale.rewrite.modules import insert_after, remove_children
from compscale.rewrite.synth import synthesize_repeat
from compscale.trace import Traced

__all__ = ["deepen", "fresh_copy", "respread_drop_path"]


def fresh_copy(template: nn.Module, rules: InitRules | None) -> nn.Module:
    """A deep copy of ``template`` with every parameter drawn anew."""
    new = copy.deepcopy(template)
    for (_, m), (_, t) in zip(new.named_modules(), template.named_modules()):
        if any(True for _ in m.parameters(recurse=False)) or list(m.buffers(recurse=False)):
            reinit(m, rules, template=t)
    return new


def deepen(root: nn.Module, traced: Traced, table: StageTable, counts: Mapping[int, int],
           rules: InitRules | None) -> dict[int, list[str]]:
    """Append blocks so that stage ``i`` of ``table`` has ``counts[i]`` blocks; returns the new paths per stage.

    ``root`` is the model being rewritten (``traced`` was traced from it). Stages are handled last to first
    so that renumbering a flat container never moves a stage not yet handled.
    """
    drop_rates = _drop_rates(root)
    added: dict[int, list[nn.Module]] = {}
    for stage in reversed(table.stages):
        extra = counts.get(stage.index, len(stage.blocks)) - len(stage.blocks)
        if extra == 0:
            continue
        parent = root.get_submodule(stage.parent) if stage.parent else root
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            raise RewriteError(
                f"cannot change the depth of stage {stage.name}: its blocks live in {type(parent).__name__} "
                f"{stage.parent or '<root>'!r}, whose forward calls them one by one",
                "keep the stage's blocks in an nn.Sequential, or leave it out with `stages=`.",
            )
        if extra < 0:  # shallower: drop trailing repeats, never the stage's first block
            keep = max(1, len(stage.blocks) + extra)
            remove_children(parent, [b.path.rpartition(".")[2] for b in stage.blocks[keep:]])
            continue
        if stage.repeat is not None:
            template = root.get_submodule(stage.repeat.path)
            new = [fresh_copy(template, rules) for _ in range(extra)]
        else:
            first = synthesize_repeat(traced, stage, table.blocks, rules)
            new = [first] + [fresh_copy(first, rules) for _ in range(extra - 1)]
        insert_after(parent, stage.blocks[-1].path.rpartition(".")[2], new)
        added[stage.index] = new
    respread_drop_path(root, len(drop_rates), drop_rates)
    # paths are read at the end: inserting into a flat container renumbers the stages after it
    paths = {id(m): name for name, m in root.named_modules()}
    return {i: [paths[id(m)] for m in mods] for i, mods in added.items()}


def _drop_rates(root: nn.Module) -> list[float]:
    return [float(getattr(m, attr)) for m in root.modules() if (attr := drop_path_attr(m)) is not None]


def respread_drop_path(root: nn.Module, old_count: int, old_rates: list[float]) -> None:
    """If the old rates were ``c * k`` over the blocks ``k``, set ``c`` anew for the new number of blocks.

    The reference builders use ``p * k / N`` (torchvision) or ``p * k / (N - 1)`` (timm's linspace); the
    hypothesis whose ``p`` is the rounder number wins, and the new rates use the same ``p`` over the new ``N``.
    """
    modules = [(m, attr) for m in root.modules() if (attr := drop_path_attr(m)) is not None]
    if old_count < 2 or len(modules) in (old_count, 1):
        return
    c = old_rates[1]
    if c <= 0 or any(abs(r - c * k) > 1e-6 for k, r in enumerate(old_rates)):
        return  # not linear in the block index: leave the rates as they are
    over_n = _roundness(c * old_count) <= _roundness(c * (old_count - 1))  # torchvision's p*k/N, else timm's
    p = c * old_count if over_n else c * (old_count - 1)
    n = len(modules) if over_n else len(modules) - 1
    for k, (m, attr) in enumerate(modules):
        setattr(m, attr, p * k / n)


def _roundness(p: float) -> float:
    """Distance of ``p`` from the nearest multiple of 0.05: smaller is rounder."""
    return abs(p / 0.05 - round(p / 0.05))
