"""The spread of repeated latency measurements: compscale.latency's procedure against a naive timer.

    python bench/bench_latency.py                 # resnet18 at 224, 10 calls each, torch's thread count
    python bench/bench_latency.py --threads 2 --repeats 10 --min-run-time 0.5

Each of ``--repeats`` repetitions measures resnet18 (fresh weights, batch 1, 224x224) once with
:func:`compscale.latency` (warm-up until settled, at least 5 runs, outliers timed again, threads pinned) and once with a
naive timer (one untimed call, then ``time.perf_counter`` around ``--naive-calls`` calls, their mean), alternating, so
that both see the same disturbances. It prints every figure, then each method's spread over the repetitions: the
ratio of the largest to the smallest, and the relative interquartile range.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models import resnet18

import compscale


def naive(model: torch.nn.Module, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, as a quick script times it: one warm-up call, then the mean of ``calls`` calls."""
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(calls):
            model(x)
        return (time.perf_counter() - start) / calls


def spread(values: list[float]) -> str:
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (f"median {median * 1e3:7.2f} ms, IQR {(q3 - q1) / median:6.1%} of it, "
            f"max/min {max(values) / min(values):5.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's count)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--min-run-time", type=float, default=0.5, help="compscale.latency's min_run_time")
    parser.add_argument("--naive-calls", type=int, default=10)
    args = parser.parse_args(argv)
    model = resnet18().eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    threads = args.threads or torch.get_num_threads()
    procedure, plain = [], []
    print(f"resnet18 at {args.size}x{args.size}, batch 1, {threads} threads, {args.repeats} repetitions")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the naive timer runs with the same count, set by hand
    try:
        for i in range(args.repeats):
            lat = compscale.latency(model, args.size, min_run_time=args.min_run_time, threads=threads)
            procedure.append(lat.median)
            plain.append(naive(model, x, args.naive_calls))
            print(f"{i + 1:>3}  compscale.latency: {lat}\n     naive timer:       {plain[-1] * 1e3:.3g} ms")
    finally:
        torch.set_num_threads(before)
    print(f"\nspread over {args.repeats} repetitions")
    print(f"  compscale.latency: {spread(procedure)}")
    print(f"  naive timer:       {spread(plain)}")


if __name__ == "__main__":
    main()
