"""Layer surgery below the pipeline: the channels of a conv/norm/linear, a copy of it with other channels, and a
module put in place at a path.

The shape propagation of :mod:`compscale.trace` (a layer fed another number of channels) and the rewrite
passes both resize layers; this is the one place that knows how.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ELEMENTWISE", "SHAPE_PRESERVING", "STANDARD_TENSORS", "channels", "copy_module", "init_like", "memory_format",
    "resize", "set_submodule",
]


def copy_module(model: nn.Module, memo: dict[int, Any] | None = None) -> Any:
    """``copy.deepcopy(model, memo)``, twice as fast for a network of many small modules: each empty dict, set or
    ``OrderedDict`` a module keeps (the hook dicts, eleven of them per module) becomes a fresh one of its type
    instead of going through deepcopy's generic rebuild; a container shared by several modules stays shared."""
    memo = {} if memo is None else memo
    for m in model.modules():
        memo.update({id(v): type(v)() for v in vars(m).values()
                     if type(v) in (dict, set, OrderedDict) and not v and id(v) not in memo})
    return copy.deepcopy(model, memo)


def _clone_shell(module: nn.Module) -> nn.Module:
    """A shallow copy whose parameter/buffer/module dicts are its own (hooks and attributes shared)."""
    new = copy.copy(module)
    new._parameters = module._parameters.copy()
    new._buffers = module._buffers.copy()
    new._modules = module._modules.copy()
    return new


def _empty(like: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` on ``like``'s device, of its dtype and in its memory format."""
    new = torch.empty(tuple(shape), device=like.device, dtype=like.dtype)
    fmt = memory_format(like)
    return new.contiguous(memory_format=fmt) if fmt is not torch.contiguous_format else new


def memory_format(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` (or ``channels_last_3d``) for a 4-d (5-d) tensor stored so, else contiguous."""
    if t.device.type == "meta" or t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
"""torch's activations and dropouts: each output element from its input element alone (the shape, the channels)."""
SHAPE_PRESERVING = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, *ELEMENTWISE)
"""Layers whose output has their one input's shape: shape propagation makes an empty tensor of it instead of running
them on meta tensors (meta batch_norm is slow)."""
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
"""The norm layers whose channels :func:`channels` and :func:`resize` know."""
CHANNEL_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, *NORMS)
"""Every layer :func:`channels` and :func:`resize` know: convs, linears and norms."""


def channels(m: nn.Module) -> tuple[int, int]:
    """``(in, out)`` channels of a conv, linear or norm layer."""
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


def resize(module: nn.Module, in_ch: int, out_ch: int, depthwise: bool = False) -> nn.Module:
    """A copy of ``module`` (conv, linear or norm) with new channel counts and uninitialised parameters.

    The copy keeps the module's class and every other attribute, so a subclass of ``nn.Conv2d`` stays one.
    """
    new: Any = _clone_shell(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        groups = out_ch if depthwise else module.groups
        new.in_channels, new.out_channels, new.groups = in_ch, out_ch, groups
        _replace_param(new, "weight", (in_ch, out_ch // groups, *module.kernel_size) if module.transposed
                       else (out_ch, in_ch // groups, *module.kernel_size))
        _replace_param(new, "bias", (out_ch,))
    elif isinstance(module, nn.Linear):
        new.in_features, new.out_features = in_ch, out_ch
        _replace_param(new, "weight", (out_ch, in_ch))
        _replace_param(new, "bias", (out_ch,))
    elif isinstance(module, NORMS):
        if isinstance(module, nn.GroupNorm):
            new.num_channels = out_ch
        elif isinstance(module, nn.LayerNorm):
            new.normalized_shape = (out_ch,)
        else:
            new.num_features = out_ch
        for name in ("weight", "bias"):
            _replace_param(new, name, (out_ch,))
        for name in ("running_mean", "running_var"):
            buf = new._buffers.get(name)
            if buf is not None:
                new._buffers[name] = _empty(buf, (out_ch,))
    else:
        raise TypeError(f"cannot resize {type(module).__name__}")
    _resize_extras(new, channels(module)[1], out_ch)
    return new


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` of ``root`` (the parent's forward then calls it)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


@torch.no_grad()
def init_like(old: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A tensor of ``shape`` initialised as ``old`` evidently was: its constant, else a normal of its mean and std."""
    new = _empty(old, shape)
    flat = old.detach().flatten()
    if old.device.type == "meta" or flat.numel() == 0:
        return new
    if bool((flat == flat[0]).all()):
        return new.fill_(flat[0].item())
    return new.normal_(flat.float().mean().item(), flat.float().std().item() if flat.numel() > 1 else 0.0)


def _resize_extras(new: nn.Module, old_out: int, out_ch: int) -> None:
    """Per-output-channel tensors a subclass adds (a ``gain`` of shape ``(out, 1, 1, 1)``) follow ``out_ch``."""
    if old_out == out_ch:
        return
    for name, p in list(new._parameters.items()):
        if name not in STANDARD_TENSORS and p is not None and p.dim() and p.shape[0] == old_out:
            new._parameters[name] = nn.Parameter(init_like(p, (out_ch, *p.shape[1:])), p.requires_grad)
    for name, b in list(new._buffers.items()):
        if name not in STANDARD_TENSORS and b is not None and b.dim() and b.shape[0] == old_out:
            new._buffers[name] = init_like(b, (out_ch, *b.shape[1:]))


STANDARD_TENSORS = frozenset(  # the tensors resize() gives new shapes itself
    {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})


def _replace_param(module: nn.Module, name: str, shape: Sequence[int]) -> None:
    p = module._parameters.get(name)
    if p is not None:
        module._parameters[name] = nn.Parameter(_empty(p, shape), requires_grad=p.requires_grad)
