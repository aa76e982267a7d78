"""TF-"same" paddings baked in at construction follow the new input size.

TensorFlow's "same" padding depends on the input size when the stride is above 1. PyTorch ports of TF models
compute it once, for the image size they are built for: efficientnet-pytorch's ``Conv2dStaticSamePadding``
holds an ``nn.ZeroPad2d`` made for 224 (B0) or 240 (B1). At another size that padding is wrong by a pixel and
the feature maps shrink (7x7 instead of 8x8 at B1's 240). A zero padding whose amounts equal the TF-same
formula for the conv it feeds (its child, or the next node) at the base size is recomputed for the new size.

Example:
    >>> tf_same_padding((224, 224), (3, 3), (2, 2), (1, 1))   # (left, right, top, bottom)
    (0, 1, 0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compscale.rewrite.modules import set_submodule
from compscale.trace import Traced

__all__ = ["follow_same_padding", "tf_same_padding"]


def tf_same_padding(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int]) -> tuple[int, ...]:
    """``nn.ZeroPad2d``-ordered amounts (last dim first: left, right, top, bottom) of TF's "same" padding."""
    amounts: list[int] = []
    for i, k, s, d in reversed(list(zip(size, kernel, stride, dilation))):
        pad = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        amounts += [pad // 2, pad - pad // 2]
    return tuple(amounts)


class DynamicSamePad(nn.Module):
    """Stands in for a static TF-same padding while shapes are propagated at the new size."""

    def __init__(self, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self.kernel, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, tf_same_padding(x.shape[2:], self.kernel, self.stride, self.dilation))


def _zero_pad(m: nn.Module) -> bool:
    return isinstance(m, nn.ConstantPad2d) and float(m.value) == 0.0


def _convs_with_static_pads(root: nn.Module) -> list[tuple[str, str]]:
    """``(conv path, pad child name)`` for every conv holding a zero padding of its own."""
    found = []
    for path, m in root.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and all(p == 0 for p in m.padding):
            found += [(path, name) for name, child in m.named_children() if _zero_pad(child)]
    return found


def _same(conv: nn.Module, size: Sequence[int]) -> tuple[int, ...]:
    assert isinstance(conv, nn.modules.conv._ConvNd)
    return tf_same_padding(size, conv.kernel_size, conv.stride, conv.dilation)


def _conv(root: nn.Module, path: str) -> nn.modules.conv._ConvNd:
    conv = root.get_submodule(path)
    assert isinstance(conv, nn.modules.conv._ConvNd)
    return conv


def _pad(root: nn.Module, path: str) -> nn.ConstantPad2d:
    pad = root.get_submodule(path)
    assert isinstance(pad, nn.ConstantPad2d)
    return pad


def follow_same_padding(root: nn.Module, traced: Traced, input_shape: Sequence[int]) -> list[str]:
    """Recompute, for ``input_shape``, every static TF-same padding of ``root``; returns the paths changed.

    ``traced`` supplies the tracer options; ``root`` is traced afresh at the base size (its blocks may have moved)
    to tell TF-same paddings from other zero paddings, and once at the new size with every such padding computed
    from the size it is actually fed.
    """
    candidates = _convs_with_static_pads(root)
    if not candidates:
        return []
    base = traced.retrace(root, traced.input_shape)
    nodes = {str(n.target): n for n in base.graph.nodes if n.op == "call_module"}
    same: list[tuple[str, str]] = []
    for path, child in candidates:
        node = nodes.get(path)
        if node is None or not node.args or not isinstance(node.args[0], fx.Node) or not base.has_shape(node.args[0]):
            continue
        if tuple(_pad(root, f"{path}.{child}").padding) == _same(_conv(root, path), base.shape(node.args[0])[2:]):
            same.append((path, child))
    if not same:
        return []
    static = {key: _pad(root, f"{key[0]}.{key[1]}") for key in same}
    for path, child in same:
        set_submodule(root, f"{path}.{child}", DynamicSamePad(_conv(root, path)))
    try:
        new = traced.retrace(root, input_shape)
    finally:
        for (path, child), pad in static.items():
            set_submodule(root, f"{path}.{child}", pad)
    nodes = {str(n.target): n for n in new.graph.nodes if n.op == "call_module"}
    changed = []
    for (path, child), pad in static.items():
        arg = nodes[path].args[0]
        assert isinstance(arg, fx.Node)
        amounts = _same(_conv(root, path), new.shape(arg)[2:])
        if tuple(pad.padding) != amounts:
            pad.padding = amounts  # type: ignore[assignment]
            changed.append(f"{path}.{child}")
    return changed
