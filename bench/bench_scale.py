"""Benchmark compscale against building the same network directly; prints ratios measured side by side.

    python bench/bench_scale.py [--repeats 5] [--sections 1,2]

1. ``scale()`` time against the direct constructor of the same network, at 1 and 2 threads (target: <= 1.5x).
2. Forward latency of the scaled model against the hand-built one (target: <= 1.02x: no overhead).
3. Peak memory (RSS) of a process that builds the base model and scales it, against one that builds
   the scaled network directly.
4. ``Planner`` + ``plan`` for resnet152, phi = 0..8 (``compscale table``), with no weight allocated
   (target: <= 2 s).
5. Equal MACs, different strategies: resnet50 at 4x its MACs by compound and by "fast" scaling (Dollar et al.),
   activations counted and forward latency measured side by side (batch 8, eval, no_grad).
Timings are medians of interleaved runs, so that load on this shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torchvision.models import mobilenet_v2, resnet50, resnet152
from torchvision.models.resnet import Bottleneck, ResNet

import compscale

CASES: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.nn.Module], str]] = {
    "mobilenet_v2 width 1.4": (lambda: mobilenet_v2(width_mult=1.4), lambda m: compscale.scale(m, width=1.4),
                               "mobilenet_v2"),
    "resnet50 depth 2": (lambda: ResNet(Bottleneck, [6, 8, 12, 6]), lambda m: compscale.scale(m, depth=2), "resnet50"),
}
BASES = {"mobilenet_v2": mobilenet_v2, "resnet50": resnet50}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_time(a))
        tb.append(_time(b))
    return statistics.median(ta), statistics.median(tb)


def bench_scale_time(repeats: int) -> None:
    print("1. scale() against the direct constructor (base model built beforehand; torch.set_num_threads)")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for name, (direct, scale, base_name) in CASES.items():
                base = BASES[base_name]()
                scale(base)  # warm up (first calls load code)
                t_direct, t_scale = interleaved(direct, lambda s=scale, b=base: s(b), repeats)
                print(f"   {name:<24} {n} thread{'s' if n > 1 else ' '}  direct {t_direct * 1e3:7.0f} ms   "
                      f"scale {t_scale * 1e3:7.0f} ms   ratio {t_scale / t_direct:5.2f}")
    finally:
        torch.set_num_threads(threads)


def bench_forward(repeats: int) -> None:
    print("2. forward latency, scaled against hand-built (batch 8, 224x224, eval, no_grad)")
    x = torch.randn(8, 3, 224, 224)
    for name, (direct, scale, base_name) in CASES.items():
        ref, got = direct().eval(), scale(BASES[base_name]()).eval()
        with torch.no_grad():
            ref(x), got(x)  # warm up
            t_ref, t_got = interleaved(lambda r=ref: r(x), lambda g=got: g(x), repeats * 2)
        print(f"   {name:<24} hand-built {t_ref * 1e3:7.1f} ms   scaled {t_got * 1e3:7.1f} ms   "
              f"ratio {t_got / t_ref:5.3f}")


_PEAK = "import resource,sys; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def _peak_rss_mb(code: str, runs: int = 3) -> float:
    """The smallest peak RSS of ``runs`` fresh processes running ``code`` (one-off start-up peaks vary)."""
    peaks = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", f"{code}\n{_PEAK}"], capture_output=True, text=True, check=True)
        peaks.append(int(out.stdout.strip().splitlines()[-1]) / 1024)
    return min(peaks)


def bench_memory() -> None:
    print("3. peak RSS above a process that only imports (torch's libraries): scale() against direct construction")
    imports = ("import compscale; from torchvision.models import resnet50; "
               "from torchvision.models.resnet import ResNet, Bottleneck")
    direct = f"{imports}; ResNet(Bottleneck, [6, 8, 12, 6])"
    scaled = f"{imports}; compscale.scale(resnet50(), depth=2)"
    base = _peak_rss_mb(imports)
    m_direct, m_scaled = _peak_rss_mb(direct) - base, _peak_rss_mb(scaled) - base
    print(f"   resnet50 depth 2          direct {m_direct:7.0f} MB   scale {m_scaled:7.0f} MB   "
          f"ratio {m_scaled / max(m_direct, 1.0):5.2f}   (imports alone: {base:.0f} MB)")


def bench_table() -> None:
    print("4. compscale table resnet152 --phi 0:8 (Planner on the meta device + 9 plans)")
    base = resnet152()
    start = time.perf_counter()
    planner = compscale.Planner(base)
    plans = [planner.plan(phi) for phi in range(9)]
    elapsed = time.perf_counter() - start
    devices = {t.device.type for t in planner.traced.root.parameters()}
    print(f"   {elapsed:.2f} s for 9 plans; probe parameters on {devices}; "
          f"phi=8: {plans[-1].macs / 1e9:.0f} GMACs at {plans[-1].input_size[0]}")


def bench_strategies(repeats: int) -> None:
    print("5. resnet50 at 4x MACs: compound against fast (batch 8, eval, no_grad, interleaved)")
    base = compscale.profile(resnet50(), 224)
    nets = {s: compscale.scale(resnet50(), target_macs=4 * base.macs, strategy=s).eval() for s in ("compound", "fast")}
    inputs = {s: torch.randn(8, 3, *n.scaling.input_size) for s, n in nets.items()}
    costs = {s: compscale.profile(n, n.scaling.input_size) for s, n in nets.items()}
    with torch.no_grad():
        for s, n in nets.items():
            n(inputs[s])  # warm up
        t_c, t_f = interleaved(lambda: nets["compound"](inputs["compound"]), lambda: nets["fast"](inputs["fast"]),
                               repeats)
    for s, t in (("compound", t_c), ("fast", t_f)):
        c = costs[s]
        print(f"   {s:<9} {c.macs / base.macs:5.2f}x MACs  {c.acts / base.acts:5.2f}x acts  "
              f"input {nets[s].scaling.input_size[0]}  forward {t * 1e3:7.0f} ms")
    print(f"   fast / compound forward time: {t_f / t_c:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sections", default="1,2,3,4,5", help="the sections to run, comma-separated (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sections = {"1": lambda: bench_scale_time(args.repeats), "2": lambda: bench_forward(args.repeats),
                "3": bench_memory, "4": bench_table, "5": lambda: bench_strategies(args.repeats)}
    for key in args.sections.split(","):
        sections[key.strip()]()


if __name__ == "__main__":
    main()
