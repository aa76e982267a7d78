"""The width pass: rebuild every conv/norm/linear whose channel groups change width.

It takes the channel graph and a new width per group (the plan's decision) and never sees the
multiplier. Unchanged layers keep their weights; changed ones are freshly initialised as the model's
constructor would (:mod:`compscale.rewrite.init`), or, given a :class:`~compscale.rewrite.preserve.Growth`, grown
from their trained values so that the network computes what it did (Net2Net, :mod:`compscale.rewrite.preserve`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.fx as fx
from torch import nn

from compscale.analyse.channels import ChannelGraph, SizeLiteral, attributes_holding
from compscale.errors import RewriteError
from compscale.rewrite.init import InitRules, reinit
from compscale.rewrite.modules import channels, resize, resize_param, set_submodule
from compscale.rewrite.preserve import Growth, layer_maps, source_maps, transplant, transplant_param

__all__ = ["apply_widths"]


def apply_widths(root: nn.Module, cg: ChannelGraph, widths: Mapping[int, int], rules: InitRules | None,
                 growth: Growth | None = None) -> list[str]:
    """Resize the layers of ``root`` to ``widths`` (group id -> channels); returns the paths changed.

    With ``growth``, the resized layers copy their trained values along each group's source map.
    """
    maps = _growth_maps(root, cg, widths, growth) if growth is not None else {}
    changes: dict[str, tuple[int, int, bool]] = {}
    for path, layer in cg.layers.items():
        new_in = sum(widths[g] * f for g, f in layer.inputs)
        changes[path] = (new_in, widths[layer.output], False)
    for path, gs in cg.depthwise.items():
        w = sum(widths[g] for g in gs)
        changes[path] = (w, w, True)
    for path, gs in cg.norms.items():
        w = sum(widths[g] for g in gs)
        changes[path] = (w, w, False)
    changed = []
    for path, (new_in, new_out, depthwise) in changes.items():
        module = root.get_submodule(path)
        if channels(module) == (new_in, new_out):
            continue
        new = resize(module, new_in, new_out, depthwise)
        reinit(new, rules, template=module)
        if growth is not None:
            transplant(new, module, *maps[path], growth, path)
        set_submodule(root, path, new)
        changed.append(path)
    for target, (dim, gs) in cg.params.items():
        owner_path, _, name = target.rpartition(".")
        owner = root.get_submodule(owner_path) if owner_path else root
        old = getattr(owner, name)
        if resize_param(root, target, dim, sum(widths[g] for g in gs)):
            if growth is not None:
                transplant_param(getattr(owner, name), old, dim, maps[target][0])
                if id(old) in growth.kept:
                    growth.grown.add(id(getattr(owner, name)))
            changed.append(target)
    for path, gs in cg.shape_owners.items():  # a hand-written LayerNorm's normalized_shape = (channels,)
        module = root.get_submodule(path) if path else root
        before, after = sum(cg.groups[g].base for g in gs), sum(widths[g] for g in gs)
        if before == after:
            continue
        names = [n for n, v in vars(module).items() if isinstance(v, (tuple, list)) and list(v) == [before]]
        if len(names) != 1:
            raise RewriteError(
                f"{path or type(root).__name__} calls layer_norm over {before} channels, a shape compscale cannot "
                f"update: it is {'not' if not names else 'not only'} one tuple attribute ({names or 'none'})",
                "keep the normalized shape in one attribute, as nn.LayerNorm's `normalized_shape = (dim,)`, or "
                "compute it in forward from the input (`x.shape[-1:]`).",
            )
        setattr(module, names[0], type(getattr(module, names[0]))([after]))
    _write_literals(root, cg, widths)
    return changed


def _growth_maps(root: nn.Module, cg: ChannelGraph, widths: Mapping[int, int], growth: Growth,
                 ) -> dict[str, tuple[Any, Any]]:
    """Each layer's ``(out_map, in_map)``; a group that shrinks is noted (its layers keep their first channels)."""
    old = {g.id: g.base for g in cg.groups}
    for path in cg.sliding:
        growth.note(path, "slides along the channels (ECA): copied channels change the neighbours it mixes")
    for g in cg.groups:
        if widths[g.id] < g.base:
            growth.note(g.members[0][0] if g.members else f"group {g.id}",
                        f"narrower ({g.base} -> {widths[g.id]} channels): keeps its first channels")
    return layer_maps(cg, source_maps(root, cg, old, widths, growth), old)


def _write_literals(root: nn.Module, cg: ChannelGraph, widths: Mapping[int, int]) -> None:
    """Give the numbers a module keeps for its ops (split sizes, slice bounds) their new values."""
    targets = [_literal_target(root, lit) for lit in cg.literals]  # found before any is written
    written: dict[tuple[int, str], Any] = {}
    graphs: dict[int, fx.GraphModule] = {}
    for lit, (module, attr) in zip(cg.literals, targets):
        values = [sum(widths[g] * f for g, f in entry) for entry in lit.entries]
        if isinstance(module, fx.GraphModule) and lit.in_graph:
            _write_in_graph(module, lit.attr, lit.value, values if lit.is_list else values[0])
            graphs[id(module)] = module
            continue
        old = getattr(module, attr)
        new = type(old)(values) if lit.is_list else values[0]
        if written.setdefault((id(module), attr), new) != new:
            raise RewriteError(
                f"{lit.path or type(root).__name__}.{attr} is read by two ops that need different values "
                f"({written[(id(module), attr)]} and {new}) at the new width",
                "keep one attribute per channel count, or register a channel rule for the module.",
            )
        setattr(module, attr, new)
    for gm in graphs.values():
        gm.graph.lint()
        gm.recompile()


def _literal_target(root: nn.Module, lit: SizeLiteral) -> tuple[nn.Module, str]:
    """The module holding ``lit`` and its attribute (for a number in a GraphModule's code: the node's name)."""
    module = root.get_submodule(lit.path) if lit.path else root
    if not lit.in_graph or isinstance(module, fx.GraphModule):
        return module, lit.attr
    # analysed in a GraphModule of the module's code (a block extracted to be repeated): the module's attribute
    names = attributes_holding(module, lit.value, narrow=True)
    if len(names) != 1:
        raise RewriteError(
            f"{lit.path or type(root).__name__} passes the number {lit.value} to an op whose channels change width, "
            f"and {'no' if not names else 'more than one'} attribute of it holds that number ({names or 'none'})",
            "keep the number in one attribute of the module (as Res2Net's `self.width`), or compute it in forward "
            "from the input's shape.")
    return module, names[0]


def _write_in_graph(gm: fx.GraphModule, name: str, old: Any, new: Any) -> None:
    """Replace the number ``old`` (or list of numbers) that node ``name`` of ``gm`` passes to its op by ``new``.

    Only split sizes and slice bounds are rewritten (the numbers in a ``slice``, or a size argument), never a
    ``dim``: the analysis found ``old`` there.
    """
    node = next(n for n in gm.graph.nodes if n.name == name)

    def swap(arg: Any) -> Any:
        if isinstance(arg, slice):
            return slice(*(new if v == old and isinstance(v, int) else v for v in (arg.start, arg.stop, arg.step)))
        if isinstance(arg, (list, tuple)) and not isinstance(old, list):
            return type(arg)(swap(a) for a in arg)
        if isinstance(old, list) and isinstance(arg, (list, tuple)) and list(arg) == old:
            return type(arg)(new)
        return new if type(arg) is int and arg == old and not isinstance(old, list) else arg

    node.args = (node.args[0], *(swap(a) for a in node.args[1:]))
    node.kwargs = {k: (v if k == "dim" else swap(v)) for k, v in node.kwargs.items()}
