"""The EfficientNet paper's Table 3 for any model: compound scaling against one dimension at equal MACs.

    python recipes/ablation.py                      # tiny ResNet, shapes, phi=1, 3 seeds x 30 steps: ~4 min
    python recipes/ablation.py --seed 0 --steps 150 # one seed, longer (--seed N is --seeds N)
    python recipes/ablation.py --model mypkg.nets:net --data /path/to/imagefolder --input-size 224 --phi 1

Trains the base model, the compound model at ``--phi``, then depth-only, width-only and resolution-only models at
the compound model's MACs (``compscale.scale(strategy=dim, target_macs=...)``), for each of ``--seeds``;
evaluates each, times each side by side (``compscale.latency``, 1 thread, batch 32 by default), prints the table
(costs, activations, latency median ± IQR, accuracy mean ± std over seeds) and saves a plot of accuracy against
latency and against activations (``--plot``, PNG). The machinery is ``recipes/strategies.py``'s, which adds
Dollar et al.'s fast scaling; here channels round to the library's multiple of 8 (``--width-divisor``), so on a
tiny network depth-only and resolution-only land on the step nearest the target (see the "x compound" column).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes import strategies

__all__ = ["main", "parse_args", "run"]

DIMENSIONS = ("depth", "width", "resolution")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    strategies.add_arguments(p, steps=30, width_divisor=8, plot="ablation.png")
    p.add_argument("--seed", type=int, default=None, help="one seed: the same as --seeds SEED")
    args = p.parse_args(argv)
    if args.seed is not None:
        if args.seeds is not None:
            p.error("give --seed or --seeds, not both")
        args.seeds = [[args.seed]]
    return strategies.check_arguments(p, args)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and time every arm for every seed; one summary row per arm (``strategies.summarise``)."""
    labels = {"base": "baseline", "compound": f"compound phi={args.phi:g}", **{d: f"{d} only" for d in DIMENSIONS}}
    arms = strategies.arms(args, DIMENSIONS, labels)
    runs, latencies = strategies.run(args, arms)
    return strategies.summarise(runs, latencies, reference=labels["compound"])


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = run(args)
    strategies.report(args, rows, "compound vs single-dimension scaling at equal MACs", first_column="scaling")
    return rows


if __name__ == "__main__":
    main()
