"""Scaling strategies at equal MACs: accuracy, activations and measured latency, over several seeds.

    python recipes/strategies.py                      # tiny ResNet, shapes, phi=1, 3 seeds x 30 steps: ~7 min
    python recipes/strategies.py --seeds 0 --steps 20 --plot strategies.png --json
    python recipes/strategies.py --model mypkg.nets:net --data /path/to/imagefolder --input-size 224 --phi 1

Six arms: the base (phi 0), compound scaling at ``--phi``, then Dollar et al.'s fast scaling (``"fast"``, dWr:
width takes most of the budget) and depth, width and resolution alone, each solved to the compound model's MACs
(``compscale.scale(base, strategy=..., target_macs=compound.macs)``). Every arm is trained ``--steps`` SGD steps
by ``recipes/train.py`` for each seed (``--seeds``; a seed draws the weights and the data), then evaluated on
held-out images. Before training, every arm is timed side by side: ``compscale.latency`` on ``--latency-threads``
CPU threads (1 by default) at batch ``--latency-batch`` and the arm's own input size, in ``--latency-rounds``
rounds that visit each arm in turn (so that a burst of load on a shared machine hits all arms), pooled into
a median and interquartile range.

Costs are step functions (whole blocks, channels rounded to ``--width-divisor``, input sizes to multiples of
``--resolution-divisor``), so each arm lands on the step nearest the target; the table's "x compound" column
says how near. The default ``--width-divisor 2`` (the library rounds to 8) gives the tiny network steps fine
enough that every arm lands within 5% of the compound model's MACs.

Prints a markdown table (d, w, r, input size, params, MACs, activations, latency median ± IQR, accuracy
mean ± std over seeds), JSON lines with ``--json``, and saves a plot (``--plot``, PNG): accuracy against latency
and against activations. ``recipes/ablation.py`` runs the same machinery on the paper's Table 3 arms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python recipes/strategies.py` from anywhere

import compscale
from compscale.checkpoint import load_model
from recipes import train

__all__ = ["STRATEGIES", "Arm", "add_arguments", "arms", "main", "measure_latency", "parse_args", "plot", "run",
           "summarise", "table"]

STRATEGIES = ("fast", "depth", "width", "resolution")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row of the comparison: its label and the ``recipes/train.py`` arguments that build its network."""

    label: str
    options: tuple[str, ...]


def add_arguments(p: argparse.ArgumentParser, *, steps: int, width_divisor: int, plot: str) -> None:
    """The options this recipe and ``recipes/ablation.py`` share (the defaults differ)."""
    p.add_argument("--model", default="recipes.models:tiny_resnet", help="torchvision name or module:callable")
    p.add_argument("--data", default="shapes", help="'shapes' (procedural, no download) or an ImageFolder path")
    p.add_argument("--input-size", type=int, default=32, help="the base model's input size")
    p.add_argument("--phi", type=float, default=1.0, help="the compound model's phi; the other arms match its MACs")
    p.add_argument("--steps", type=int, default=steps, help="SGD steps per arm and seed")
    p.add_argument("--seeds", type=parse_seeds, nargs="+", default=None, help="seeds: '0 1 2' or '0,1,2' (default)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--width-divisor", type=int, default=width_divisor, help="channel counts round to multiples "
                   "of this (the library's default: 8)")
    p.add_argument("--resolution-divisor", type=int, default=8, help="input sizes round to multiples of this")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for training (0: torch's default; "
                   "1 is far faster than 2 spinning threads on a busy machine)")
    p.add_argument("--latency-batch", type=int, default=32, help="batch size of the timed forward")
    p.add_argument("--latency-threads", type=int, default=1, help="CPU threads of the timed forward")
    p.add_argument("--latency-time", type=float, default=0.5, help="seconds of timed calls per arm and round")
    p.add_argument("--latency-rounds", type=int, default=3, help="rounds over all arms, pooled")
    p.add_argument("--plot", default=plot, help="where to save the PNG")
    p.add_argument("--json", action="store_true", help="also print one JSON line per seed and arm, and per arm")


def parse_seeds(text: str) -> list[int]:
    """``--seeds``' value: integers, comma-separated."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"seeds are integers, got {text!r}") from e


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Flatten ``--seeds`` (0, 1, 2 by default) and refuse values the run cannot use."""
    args.seeds = [0, 1, 2] if args.seeds is None else [s for group in args.seeds for s in group]
    if not args.seeds:
        p.error("give at least one seed")
    if min(args.steps, args.latency_batch, args.latency_threads, args.latency_rounds) < 1:
        p.error("--steps, --latency-batch, --latency-threads and --latency-rounds must be positive")
    if args.threads < 0 or args.latency_time <= 0:
        p.error("--threads must be 0 or more and --latency-time above 0")
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, steps=30, width_divisor=2, plot="strategies.png")
    return check_arguments(p, p.parse_args(argv))


def arms(args: argparse.Namespace, targets: Sequence[str] = STRATEGIES,
         labels: Mapping[str, str] | None = None) -> list[Arm]:
    """The base (phi 0), compound at ``--phi``, then each strategy in ``targets`` at the compound model's MACs.

    Each target is solved once, on the plan (``compscale.plan(base, strategy=s, target_macs=compound.macs)``, no
    weights built); every seed then builds its network at the solved phi along that strategy, which is the same
    network. ``labels`` renames rows (``{"base": "baseline"}``).
    """
    model, options = load_model(args.model), train.scale_options(train.parse_args(_common(args)))
    compound = compscale.plan(model, args.phi, **options)
    solved = [("base", "compound", 0.0), ("compound", "compound", args.phi)]
    for name in targets:
        phi = compscale.plan(model, strategy=name, target_macs=compound.macs, **options).multipliers.phi
        assert phi is not None  # a target is met by searching phi
        solved.append((name, name, phi))
    names = labels or {}
    return [Arm(names.get(key, key), ("--phi", repr(phi), "--strategy", strategy)) for key, strategy, phi in solved]


def _common(args: argparse.Namespace) -> list[str]:
    """``recipes/train.py`` arguments every arm shares."""
    return ["--model", args.model, "--data", args.data, "--input-size", str(args.input_size), "--steps",
            str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--train-images",
            str(args.train_images), "--eval-images", str(args.eval_images), "--width-divisor",
            str(args.width_divisor), "--resolution-divisor", str(args.resolution_divisor), "--quiet"]


def _train_args(args: argparse.Namespace, arm: Arm, seed: int) -> argparse.Namespace:
    return train.parse_args([*_common(args), *arm.options, "--seed", str(seed)])


def measure_latency(args: argparse.Namespace, arm_list: Sequence[Arm]) -> dict[str, compscale.Latency]:
    """Each arm's forward time at batch ``--latency-batch`` and its own input size, in rounds over all arms, pooled:
    the median and IQR of every timed block of every round."""
    models = {arm.label: train.build(_train_args(args, arm, 0)).eval() for arm in arm_list}
    rounds: dict[str, list[compscale.Latency]] = {label: [] for label in models}
    for _ in range(args.latency_rounds):
        for label, model in models.items():
            rounds[label].append(compscale.latency(
                model, model.scaling.input_size, batch_size=args.latency_batch, threads=args.latency_threads,
                min_run_time=args.latency_time))
    return {label: _pool(measured) for label, measured in rounds.items()}


def _pool(measured: list[compscale.Latency]) -> compscale.Latency:
    """One ``Latency`` over the timed blocks of several measurements."""
    times = tuple(t for m in measured for t in m.times)
    q25, median, q75 = _quartiles(times)
    return dataclasses.replace(measured[0], median=median, iqr=q75 - q25, times=times)


def _quartiles(times: Sequence[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles, interpolated as ``torch.utils.benchmark``'s ``Measurement`` does."""
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def run(args: argparse.Namespace, arm_list: Sequence[Arm],
        ) -> tuple[list[dict[str, Any]], dict[str, compscale.Latency]]:
    """Time every arm, then train it for every seed; ``(runs, latencies)``, one run per seed and arm."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        latencies = measure_latency(args, arm_list)
        for arm in arm_list:
            print(f"{arm.label}: {latencies[arm.label]}", flush=True)
        runs = []
        for seed in args.seeds:
            for arm in arm_list:
                start = time.perf_counter()
                result = {"arm": arm.label, "seed": seed, **train.train(_train_args(args, arm, seed)),
                          "train_s": time.perf_counter() - start}
                runs.append(result)
                print(f"seed {seed} {arm.label}: accuracy {result['accuracy']:.4f} ({result['train_s']:.0f} s)",
                      flush=True)
                if args.json:
                    print(json.dumps(result))
    finally:
        torch.set_num_threads(threads)
    return runs, latencies


def summarise(runs: list[dict[str, Any]], latencies: dict[str, compscale.Latency], reference: str,
              ) -> list[dict[str, Any]]:
    """One row per arm, in the order the arms ran: costs, latency and accuracy over the seeds;
    ``macs_ratio`` is the arm's MACs over the ``reference`` arm's."""
    labels = list(dict.fromkeys(r["arm"] for r in runs))
    ref = next(r["macs"] for r in runs if r["arm"] == reference)
    rows = []
    for label in labels:
        mine = [r for r in runs if r["arm"] == label]
        accs = [r["accuracy"] for r in mine]
        lat = latencies[label]
        q25, _, q75 = _quartiles(lat.times)
        first = mine[0]
        rows.append({"arm": label, **{k: first[k] for k in ("depth", "width", "resolution", "input_size", "params",
                                                            "macs", "acts", "strategy", "phi")},
                     "macs_ratio": first["macs"] / ref, "seeds": [r["seed"] for r in mine], "accuracies": accs,
                     "accuracy_mean": statistics.fmean(accs),
                     "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "latency_median": lat.median, "latency_iqr": lat.iqr, "latency_p25": q25, "latency_p75": q75,
                     "latency_runs": len(lat.times), "latency_batch": lat.batch_size, "latency_threads": lat.threads})
    return rows


def table(rows: list[dict[str, Any]], first_column: str = "arm") -> str:
    """The summary as markdown: costs, latency (median ± IQR) and accuracy (mean ± sample std over seeds)."""
    batch, threads = rows[0]["latency_batch"], rows[0]["latency_threads"]
    lines = [f"| {first_column} | d | w | r | input | params (M) | MMACs | x compound | acts (M) | "
             f"latency (ms, batch {batch}, {threads} thread{'s' if threads != 1 else ''}) | accuracy | seeds |",
             "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['depth']:.2f} | {r['width']:.2f} | {r['resolution']:.2f} | "
                     f"{r['input_size'][0]} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | "
                     f"{r['macs_ratio']:.3f} | {r['acts'] / 1e6:.3f} | "
                     f"{r['latency_median'] * 1e3:.1f} ± {r['latency_iqr'] * 1e3:.1f} | "
                     f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {len(r['seeds'])} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Accuracy (mean, bars: ± std over seeds) against latency (median, bars: quartiles) and against activations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_acts) = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for i, r in enumerate(rows):
        colour = f"C{i}"
        ms = r["latency_median"] * 1e3
        xerr = [[ms - r["latency_p25"] * 1e3], [r["latency_p75"] * 1e3 - ms]]
        by_time.errorbar(ms, r["accuracy_mean"], xerr=xerr, yerr=r["accuracy_std"], fmt="o", color=colour,
                         capsize=3, label=f"{r['arm']} ({r['input_size'][0]} px)")
        by_acts.errorbar(r["acts"] / 1e6, r["accuracy_mean"], yerr=r["accuracy_std"], fmt="o", color=colour,
                         capsize=3)
        for ax, x in ((by_time, ms), (by_acts, r["acts"] / 1e6)):
            ax.annotate(r["arm"], (x, r["accuracy_mean"]), xytext=(5, 4), textcoords="offset points", fontsize=7)
    batch, threads = rows[0]["latency_batch"], rows[0]["latency_threads"]
    by_time.set_xlabel(f"latency, ms (batch {batch}, {threads} CPU thread{'s' if threads != 1 else ''})")
    by_time.set_ylabel(f"held-out accuracy (mean ± std, {len(rows[0]['seeds'])} seeds)")
    by_acts.set_xlabel("activations, M (conv outputs per image)")
    by_time.legend(fontsize=8)
    for ax in (by_time, by_acts):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(args: argparse.Namespace, rows: list[dict[str, Any]], title: str, first_column: str = "arm") -> None:
    """Print the table (and JSON rows), save the plot."""
    if args.json:
        for row in rows:
            print(json.dumps(row))
    print(table(rows, first_column))
    plot(rows, args.plot, title)
    print(f"plot: {args.plot}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    arm_list = arms(args)
    runs, latencies = run(args, arm_list)
    rows = summarise(runs, latencies, reference="compound")
    report(args, rows, f"scaling strategies at the MACs of compound phi={args.phi:g}")
    return rows


if __name__ == "__main__":
    main()
