"""Cost of a model, counted by torch's own ``FlopCounterMode`` on fake or meta tensors.

MACs are FLOPs / 2 (the EfficientNet paper's unit: ResNet-50 at 224 is 4.09 GMACs). Activations are the
output elements of every convolution the forward runs (pycls's count, Dollar et al. 2021: ResNet-50 at 224 has
11.1 M), read off the same forward by a dispatch mode that watches ``aten.convolution``. No real
forward runs and no activation memory is allocated; a model built on the meta device is profiled
without ever allocating its weights. Only a model whose forward branches on tensor values (which fake
tensors cannot run) is counted on a real forward of one all-zero image.

Example:
    >>> from torchvision.models import resnet50
    >>> p = profile(resnet50(), (224, 224))
    >>> round(p.macs / 1e9, 2), p.params, p.acts
    (4.09, 25557032, 11113984)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from compscale.arguments import check_count, check_example_inputs, check_forward_takes, check_unwrapped
from compscale.errors import CompscaleError
from compscale.planning.plan import as_size, format_size
from compscale.trace.parts import network_part
from compscale.trace.tracer import check_module, eval_mode, input_channels_of

__all__ = ["ConvActivations", "Profile", "profile"]


@dataclasses.dataclass(frozen=True)
class Profile:
    """``macs`` (multiply-adds of one image), ``params`` (unique parameters) and ``acts`` (conv output elements)
    at ``input_size``."""

    macs: int
    params: int
    input_size: tuple[int, ...]
    acts: int = 0

    def __str__(self) -> str:
        return (f"{self.params / 1e6:.2f} M params, {self.macs / 1e9:.3f} GMACs, {self.acts / 1e6:.2f} M activations "
                f"at {format_size(self.input_size)}")


class ConvActivations(TorchDispatchMode):
    """Counts the output elements of every ``aten.convolution`` dispatched under it (functional convs included)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution.default:
            self.total += out.numel()
        return out


def profile(model: nn.Module, input_size: int | Sequence[int] = (224, 224), in_channels: int | None = None, *,
            example_inputs: Sequence[torch.Tensor] | None = None) -> Profile:
    """Count the MACs of one ``input_size`` image through ``model`` and its parameters.

    Args:
        model: the network (any device, including meta); it is not modified.
        input_size: ``(H, W)``, or one int for a square input; for other ranks every dim after the channels
            (``(16000,)``, ``(16, 112, 112)``).
        in_channels: input channels; read off the model's first conv when omitted.
        example_inputs: the inputs of one call, for a forward of several tensors (or to give the first input's
            shape, which then overrides ``input_size`` and ``in_channels``); only shapes and dtypes are used. Checked
            as :func:`compscale.scale` checks them.

    A detector (a forward on a list of images that ends in data-dependent code) is counted on its network part
    (:func:`compscale.trace.parts.network_part`: backbone, neck and heads on an ``input_size`` batch).

    Raises:
        TypeError, ValueError: a bad argument (named).
        CompscaleError: a wrapped model (``torch.compile``, scripted, DataParallel): its hint says which to pass.
    """
    check_unwrapped(model, "profile")
    check_module(model, "profile")
    size = as_size(input_size)
    example_inputs = check_example_inputs(example_inputs) or ()
    check_forward_takes(model, max(1, len(example_inputs)))
    if in_channels is not None:
        in_channels = check_count(in_channels, "in_channels")
    channels = in_channels if in_channels is not None else input_channels_of(model)
    params = sum(p.numel() for p in model.parameters())
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    device = torch.device("meta") if on_meta else next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    shapes = [(t.shape, t.dtype) for t in example_inputs[1:]]  # the forward's other inputs keep their shapes
    if example_inputs:
        channels, size = int(example_inputs[0].shape[1]), tuple(example_inputs[0].shape[2:])

    def inputs(make: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        first = make((1, channels, *size), device=device, dtype=dtype)
        return [first, *(make(tuple(shape), device=device, dtype=dt) for shape, dt in shapes)]

    counter, acts = FlopCounterMode(display=False), ConvActivations()
    with eval_mode(model), torch.no_grad():
        if on_meta:
            with counter, acts:
                model(*inputs(torch.empty))
        else:
            try:
                with counter, acts, FakeTensorMode(allow_non_fake_inputs=True):
                    model(*inputs(torch.empty))
            except (DataDependentOutputException, DynamicOutputShapeException):
                counter, acts = FlopCounterMode(display=False), ConvActivations()
                part = _network_part(model)
                if part is not None:  # a detector: its network part, on the batched image of this size
                    with counter, acts, FakeTensorMode(allow_non_fake_inputs=True):
                        part(*inputs(torch.empty))
                else:  # a forward that branches on values cannot run on fake tensors: count a real one, on zeros
                    with counter, acts:
                        model(*inputs(torch.zeros))
    return Profile(counter.get_total_flops() // 2, params, tuple(size), acts.total)


def _network_part(model: nn.Module) -> nn.Module | None:
    """The network part of a model whose forward takes a list of images (a detector), or ``None``."""
    try:
        return network_part(model).gm
    except CompscaleError:
        return None
