"""The width pass: rebuild every conv/norm/linear whose channel groups change width.

It takes the channel graph and a new width per group (the plan's decision) and never sees the
multiplier. Unchanged layers keep their weights; changed ones are freshly initialised as the model's
constructor would (:mod:`compscale.rewrite.init`).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from compscale.analyse.channels import ChannelGraph
from compscale.rewrite.init import InitRules, reinit
from compscale.rewrite.modules import resize, set_submodule

__all__ = ["apply_widths"]


def apply_widths(root: nn.Module, cg: ChannelGraph, widths: Mapping[int, int], rules: InitRules | None) -> list[str]:
    """Resize the layers of ``root`` to ``widths`` (group id -> channels); returns the paths changed."""
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
        if _channels(module) == (new_in, new_out):
            continue
        new = resize(module, new_in, new_out, depthwise)
        reinit(new, rules, template=module)
        set_submodule(root, path, new)
        changed.append(path)
    return changed


def _channels(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, m.num_channels
    if isinstance(m, nn.LayerNorm):
        return m.normalized_shape[0], m.normalized_shape[0]
    assert isinstance(m, nn.modules.batchnorm._NormBase), type(m)
    return m.num_features, m.num_features
