"""Measured latency of a model, timed by ``torch.utils.benchmark``.

:func:`profile` counts what a model costs; :func:`latency` measures what it takes on the device its
parameters are on, in their dtype: a few warm-up calls, then ``Timer.blocked_autorange`` (which synchronises
an accelerator around each block of calls). The model runs in eval mode under ``torch.no_grad()``; its
train/eval flags are restored afterwards and its weights are not touched.

Example:
    >>> from torchvision.models import resnet18
    >>> lat = latency(resnet18(), (224, 224), min_run_time=1.0, threads=2)
    >>> print(lat)  # doctest: +SKIP
    25.1 ms ± 0.3 ms (IQR, 40 runs), batch 1 at 224x224 on cpu, 2 threads
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.benchmark.utils.common import set_torch_threads

from compscale.planning.plan import as_size, format_size
from compscale.trace.tracer import check_module, eval_mode, input_channels_of

__all__ = ["Latency", "latency"]


@dataclasses.dataclass(frozen=True)
class Latency:
    """Seconds per call of a batch of ``batch_size`` inputs: the median and interquartile range over ``times``
    (each the mean of one block of calls)."""

    median: float
    iqr: float
    times: tuple[float, ...]
    batch_size: int
    input_size: tuple[int, ...]
    device: str
    compiled: bool
    threads: int

    @property
    def per_sample(self) -> float:
        """Seconds per input of the batch (the median over the batch size)."""
        return self.median / self.batch_size

    @property
    def spread(self) -> float:
        """The IQR relative to the median: 0.05 means the middle half of the runs lie within 5% of a median."""
        return self.iqr / self.median if self.median > 0 else math.inf

    def __str__(self) -> str:
        scale, unit = _unit(self.median)
        at = f" at {format_size(self.input_size)}" if self.input_size else ""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        return (f"{self.median * scale:.3g} {unit} ± {self.iqr * scale:.2g} {unit} (IQR, {len(self.times)} runs), "
                f"batch {self.batch_size}{at} on {self.device}, {threads}{', compiled' if self.compiled else ''}")


def _unit(seconds: float) -> tuple[float, str]:
    """The factor and name of the unit that shows ``seconds`` with one to three digits before the point."""
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def latency(
    model: nn.Module,
    input_size: int | Sequence[int] = (224, 224),
    *,
    batch_size: int = 1,
    example_inputs: Sequence[torch.Tensor] = (),
    in_channels: int | None = None,
    compile: bool = False,
    min_run_time: float = 0.5,
    warmup: int = 3,
    threads: int | None = None,
) -> Latency:
    """Time one forward of a batch through ``model`` on its own device and dtype.

    Args:
        model: the network, on the device to time it on (not meta); it is not modified.
        input_size: ``(H, W)``, or one int for a square input; for other ranks every dim after the channels.
        batch_size: inputs per call.
        example_inputs: the inputs of one call, for a forward of several tensors (or to give the first input's
            shape, which then overrides ``input_size`` and ``in_channels``); only shapes and dtypes are used, and
            the first input's batch dim becomes ``batch_size``. Floating inputs take the model's dtype.
        in_channels: input channels; read off the model's first conv when omitted.
        compile: time ``torch.compile(model)`` (compiled during the warm-up, which then runs at least once).
        min_run_time: seconds of timed calls, at least (``Timer.blocked_autorange``).
        warmup: untimed calls before timing.
        threads: CPU threads torch uses meanwhile; by default ``torch.get_num_threads()``.

    Raises:
        ValueError: the model is on the meta device, or an argument is out of range.
        TypeError: ``model`` is not a module, or ``batch_size``/``warmup``/``threads`` not an int.
    """
    check_module(model, "latency")
    _check_args(batch_size, min_run_time, warmup, threads)
    device, dtype = _device_and_dtype(model)
    inputs, size = _make_inputs(model, input_size, batch_size, example_inputs, in_channels, device, dtype)
    num_threads = threads if threads is not None else torch.get_num_threads()
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with eval_mode(model), torch.no_grad(), on_device:
        run: Callable[..., object] = torch.compile(model) if compile else model
        with set_torch_threads(num_threads):
            for _ in range(max(warmup, 1 if compile else 0)):
                run(*inputs)
        timer = Timer("run(*inputs)", globals={"run": run, "inputs": inputs}, num_threads=num_threads,
                      label="compscale.latency", description=type(model).__name__)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return Latency(float(measurement.median), float(measurement.iqr), tuple(float(t) for t in measurement.times),
                   batch_size, size, str(device), compile, num_threads)


def _check_args(batch_size: int, min_run_time: float, warmup: int, threads: int | None) -> None:
    for name, value in (("batch_size", batch_size), ("warmup", warmup), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"compscale.latency(): {name} must be an int, got {type(value).__name__} {value!r}")
    if batch_size < 1:
        raise ValueError(f"compscale.latency(): batch_size must be at least 1, got {batch_size}")
    if warmup < 0:
        raise ValueError(f"compscale.latency(): warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise ValueError(f"compscale.latency(): threads must be at least 1, got {threads}")
    if not isinstance(min_run_time, (int, float)) or isinstance(min_run_time, bool) or not min_run_time > 0:
        raise ValueError(f"compscale.latency(): min_run_time must be a number of seconds above 0, got {min_run_time!r}")


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device of the model's first parameter (or buffer; CPU for a model with neither), and its floating dtype."""
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError(
            f"compscale.latency(): {type(model).__name__} is on the meta device, whose tensors hold no data and "
            "cannot be timed. Hint: materialise it first (model.to_empty(device='cpu') then initialise it), or use "
            "compscale.profile() to count its cost without running it."
        )
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return device, dtype


def _make_inputs(model: nn.Module, input_size: int | Sequence[int], batch_size: int,
                 example_inputs: Sequence[torch.Tensor], in_channels: int | None, device: torch.device,
                 dtype: torch.dtype) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """The inputs of one call (random floats, zeros for integer inputs, from a fixed seed that leaves the global
    generator alone) and the spatial size they have."""
    if example_inputs:
        shapes = [(tuple(t.shape), t.dtype) for t in example_inputs]
        shapes[0] = ((batch_size, *shapes[0][0][1:]), shapes[0][1])
    else:
        channels = in_channels if in_channels is not None else input_channels_of(model)
        shapes = [((batch_size, channels, *as_size(input_size)), dtype)]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=generator).to(device, dtype) if dt.is_floating_point
              else torch.zeros(shape, dtype=dt, device=device) for shape, dt in shapes]
    return inputs, tuple(shapes[0][0][2:])
