"""Measured latency of a model, timed by ``torch.utils.benchmark``, by a procedure meant to hold still on a busy
machine.

:func:`profile` counts what a model costs; :func:`latency` measures what it takes on the device its parameters are
on, in their dtype, with ``threads`` CPU threads (restored afterwards):

1. warm-up until the timings settle: at least ``warmup`` calls, then more until three calls in a row agree within
   10% (at most :data:`MAX_WARMUP` calls, and once past ``warmup`` calls, no longer than ``min_run_time``);
2. ``Timer.blocked_autorange`` (which synchronises an accelerator around each block of calls), topped up to at least
   :data:`MIN_RUNS` runs, so that a spread is never quoted from fewer;
3. a run beyond ``Q3 + 3 IQR`` (a disturbance: another process, a page fault) is measured again, once.

The figure is the median over the runs, the noise their interquartile range (``±`` in its ``str``). Points to compare
(a table's rows, a search's candidates) are timed by :func:`compare`: interleaved in rounds, so that a disturbance
hits every point alike rather than deciding one, and a round far from the point's others timed again.

The model runs in eval mode under ``torch.no_grad()``; its train/eval flags are restored afterwards and its weights
are not touched. ``torch.utils.benchmark`` is imported on the first call, without the warning about CUDA its import
prints on a machine without it.

Example:
    >>> from torchvision.models import resnet18
    >>> lat = latency(resnet18(), (224, 224), min_run_time=1.0, threads=2)
    >>> print(lat)  # doctest: +SKIP
    25.1 ms ± 0.3 ms (IQR, 40 runs), batch 1 at 224x224 on cpu, 2 threads
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from compscale.arguments import check_count, check_example_inputs, check_forward_takes, check_number
from compscale.planning.plan import as_size, format_size
from compscale.trace.tracer import check_module, eval_mode, input_channels_of

__all__ = ["MAX_WARMUP", "MIN_RUNS", "Latency", "compare", "latency", "pinned_threads"]

MIN_RUNS = 5
"""The fewest timed runs a median and an interquartile range are quoted from."""

MAX_WARMUP = 50
"""The most warm-up calls before timing, however unsettled the timings still are."""

_SETTLED = 0.10  # three warm-up calls in a row within 10% of each other: the caches and the allocator are warm
_OUTLIER_IQRS = 3.0  # a run beyond Q3 + 3 IQR is a disturbance (Tukey's "far out")


@dataclasses.dataclass(frozen=True)
class Latency:
    """Seconds per call of a batch of ``batch_size`` inputs: the median and interquartile range over ``times``
    (each the mean of one block of calls), after ``warmup_runs`` untimed calls; ``remeasured`` runs (or rounds, for
    :func:`compare`) were timed again as outliers."""

    median: float
    iqr: float
    times: tuple[float, ...]
    batch_size: int
    input_size: tuple[int, ...]
    device: str
    compiled: bool
    threads: int
    warmup_runs: int = 0
    remeasured: int = 0
    rounds: int = 1

    @property
    def per_sample(self) -> float:
        """Seconds per input of the batch (the median over the batch size)."""
        return self.median / self.batch_size

    @property
    def spread(self) -> float:
        """The IQR relative to the median: 0.05 means the middle half of the runs lie within 5% of a median."""
        return self.iqr / self.median if self.median > 0 else math.inf

    noise = spread

    def __str__(self) -> str:
        scale, unit = _unit(self.median)
        at = f" at {format_size(self.input_size)}" if self.input_size else ""
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        rounds = f" in {self.rounds} rounds" if self.rounds > 1 else ""
        return (f"{self.median * scale:.3g} {unit} ± {self.iqr * scale:.2g} {unit} (IQR, {len(self.times)} runs"
                f"{rounds}), batch {self.batch_size}{at} on {self.device}, {threads}"
                f"{', compiled' if self.compiled else ''}")

    def agrees_with(self, seconds: float) -> bool:
        """Whether ``seconds`` lies within this figure's noise: inside its runs' interquartile range, widened to 5% of
        the median at least."""
        return abs(seconds - self.median) <= max(self.iqr, 0.05 * self.median)


def _unit(seconds: float) -> tuple[float, str]:
    """The factor and name of the unit that shows ``seconds`` with one to three digits before the point."""
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


def _quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q2, q3


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """Run with ``threads`` CPU threads (``None``: as many as now), and restore torch's count afterwards."""
    before = torch.get_num_threads()
    n = before if threads is None else threads
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def latency(
    model: nn.Module,
    input_size: int | Sequence[int] = (224, 224),
    *,
    batch_size: int = 1,
    example_inputs: Sequence[torch.Tensor] | None = None,
    in_channels: int | None = None,
    compile: bool = False,
    min_run_time: float = 0.5,
    warmup: int = 3,
    threads: int | None = None,
) -> Latency:
    """Time one forward of a batch through ``model`` on its own device and dtype (see the module's procedure).

    Args:
        model: the network, on the device to time it on (not meta); it is not modified.
        input_size: ``(H, W)``, or one int for a square input; for other ranks every dim after the channels.
        batch_size: inputs per call.
        example_inputs: the inputs of one call, for a forward of several tensors (or to give the first input's
            shape, which then overrides ``input_size`` and ``in_channels``); only shapes and dtypes are used, and
            the first input's batch dim becomes ``batch_size``. Floating inputs take the model's dtype.
        in_channels: input channels; read off the model's first conv when omitted.
        compile: time ``torch.compile(model)`` (compiled during the warm-up, which then runs at least once).
        min_run_time: seconds of timed calls, at least (``Timer.blocked_autorange``); at least :data:`MIN_RUNS`
            runs are timed however long they take.
        warmup: untimed calls before timing, at least; more follow until the timings settle.
        threads: CPU threads torch uses meanwhile (pinned, and shown in the result); by default
            ``torch.get_num_threads()``. Torch's thread count is restored afterwards.

    Raises:
        ValueError: the model is on the meta device, or an argument is out of range.
        TypeError: ``model`` is not a module, or ``batch_size``/``warmup``/``threads`` not an int.
    """
    Timer = _timer_class()
    check_module(model, "latency")
    _check_args(batch_size, min_run_time, warmup, threads, compile)
    example_inputs = check_example_inputs(example_inputs) or ()
    check_forward_takes(model, max(1, len(example_inputs)))
    if in_channels is not None:
        in_channels = check_count(in_channels, "in_channels")
    if not example_inputs:
        input_size = as_size(input_size)
    device, dtype = _device_and_dtype(model)
    inputs, size = _make_inputs(model, input_size, batch_size, example_inputs, in_channels, device, dtype)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with eval_mode(model), torch.no_grad(), on_device, pinned_threads(threads) as num_threads:
        run: Callable[..., object] = torch.compile(model) if compile else model
        warmed = _warm_up(lambda: run(*inputs), max(warmup, 1 if compile else 0), device, min_run_time)
        timer = Timer("run(*inputs)", globals={"run": run, "inputs": inputs}, num_threads=num_threads,
                      label="compscale.latency", description=type(model).__name__)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        number = measurement.number_per_run
        times = [float(t) for t in measurement.times]
        while len(times) < MIN_RUNS:
            times.append(float(timer.timeit(number).times[0]))
        remeasured = _remeasure_outliers(times, lambda: float(timer.timeit(number).times[0]))
    q1, median, q3 = _quartiles(times)
    return Latency(median, q3 - q1, tuple(times), batch_size, size, str(device), compile, num_threads, warmed,
                   remeasured)


def _timer_class() -> Any:
    """``torch.utils.benchmark.Timer``, imported on first use without the warning its import logs (through
    ``torch.utils.cpp_extension``) on a machine without a CUDA runtime."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        quiet.setLevel(level)
    return Timer


def _warm_up(call: Callable[[], object], least: int, device: torch.device, budget: float) -> int:
    """Call ``call`` ``least`` times, then until three calls in a row agree within 10% (at most ``MAX_WARMUP``
    calls in all, and no more once ``budget`` seconds have passed); the number of calls made."""
    recent: list[float] = []
    began = time.perf_counter()
    for i in range(MAX_WARMUP):
        if i >= least and time.perf_counter() - began > budget:
            return i
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        recent = [*recent[-2:], time.perf_counter() - start]
        if i + 1 >= least and len(recent) == 3 and max(recent) <= (1 + _SETTLED) * min(recent):
            return i + 1
    return MAX_WARMUP


def _remeasure_outliers(times: list[float], again: Callable[[], float]) -> int:
    """Time again, once, each run beyond ``Q3 + 3 IQR`` of ``times`` (in place); how many were."""
    q1, _, q3 = _quartiles(times)
    fence = q3 + _OUTLIER_IQRS * max(q3 - q1, 0.01 * q3)
    far = [i for i, t in enumerate(times) if t > fence]
    for i in far:
        times[i] = again()
    return len(far)


def compare(measures: Sequence[Callable[[], Latency]], rounds: int = 3) -> list[Latency]:
    """Time several points to be compared, interleaved: ``rounds`` rounds, each timing every point once, in turn
    (``measures[i]()`` times point ``i``, e.g. ``lambda: latency(net, size, min_run_time=0.2)``).

    A disturbance of a few seconds then falls on one round of every point rather than on all of one point's runs.
    A point's round whose median is more than 1.5x (or less than 1/1.5 of) the median of its rounds' medians is
    timed again, once (with three rounds or more). Each point's figure pools the runs of its rounds.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    per_point: list[list[Latency]] = [[] for _ in measures]
    for _ in range(rounds):
        for i, measure in enumerate(measures):
            per_point[i].append(measure())
    out = []
    for i, got in enumerate(per_point):
        redone = 0
        if len(got) >= 3:
            typical = statistics.median(x.median for x in got)
            for r, lat in enumerate(got):
                if not typical / 1.5 <= lat.median <= typical * 1.5:
                    got[r] = measures[i]()
                    redone += 1
        out.append(_pool(got, redone))
    return out


def _pool(rounds: Sequence[Latency], redone: int) -> Latency:
    """One figure from a point's rounds: the median and IQR over all their runs."""
    times = tuple(t for lat in rounds for t in lat.times)
    q1, median, q3 = _quartiles(times)
    first = rounds[0]
    return dataclasses.replace(first, median=median, iqr=q3 - q1, times=times,
                               warmup_runs=sum(lat.warmup_runs for lat in rounds),
                               remeasured=redone + sum(lat.remeasured for lat in rounds), rounds=len(rounds))


def _check_args(batch_size: int, min_run_time: float, warmup: int, threads: int | None, compile: bool) -> None:
    check_count(batch_size, "batch_size")
    check_count(warmup, "warmup", least=0)
    if threads is not None:
        check_count(threads, "threads")
    if check_number(min_run_time, "min_run_time", positive=False) <= 0:
        raise ValueError(f"min_run_time must be a number of seconds above 0, got {min_run_time!r}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {type(compile).__name__}")


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
