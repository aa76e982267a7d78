"""The EfficientNet paper's Table 3 for any model: compound scaling against one dimension at equal MACs.

    python recipes/ablation.py                      # tiny ResNet on procedural shapes, phi=1, a few minutes
    python recipes/ablation.py --model mypkg.nets:net --data /path/to/imagefolder --input-size 224 --phi 1

Trains the compound model at ``--phi``, then depth-only, width-only and resolution-only models at the
compound model's MACs (``compscale.scale(target_macs=..., vary=...)``), evaluates each, prints the
table and saves a plot of accuracy against MACs (``--plot``, PNG).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import compscale
from compscale.checkpoint import load_model
from recipes import train

__all__ = ["main"]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    compound = compscale.plan(load_model(args.model), args.phi, input_size=args.input_size)
    common = ["--model", args.model, "--data", args.data, "--input-size", str(args.input_size), "--steps",
              str(args.steps), "--seed", str(args.seed), "--quiet"]
    rows = []
    configs = [("baseline", ["--phi", "0"]), (f"compound phi={args.phi:g}", ["--phi", str(args.phi)])]
    configs += [(f"{dim} only", ["--target-macs", str(compound.macs), "--vary", dim])
                for dim in ("depth", "width", "resolution")]
    for label, extra in configs:
        summary = train.train(train.parse_args(common + extra))
        rows.append({"scaling": label, **summary})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| scaling | d | w | r | input | params (M) | MMACs | accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scaling']} | {r['depth']:.2f} | {r['width']:.2f} | {r['resolution']:.2f} | "
                     f"{r['input_size'][0]} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | {r['accuracy']:.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["macs"] / 1e6, r["accuracy"], label=r["scaling"], s=60)
    ax.set_xlabel("MMACs")
    ax.set_ylabel("accuracy")
    ax.set_title("compound vs single-dimension scaling at equal MACs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="recipes.models:tiny_resnet")
    p.add_argument("--data", default="shapes")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--phi", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="ablation.png")
    args = p.parse_args(argv)
    rows = run(args)
    print(table(rows))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    return rows


if __name__ == "__main__":
    main()
