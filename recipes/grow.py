"""Warm start: grow a trained model with ``compscale.scale(init="preserve")`` and train on, at equal total steps.

    python recipes/grow.py                                  # tiny ResNet on procedural shapes, 3 seeds, minutes
    python recipes/grow.py --seeds 0 --steps1 40 --steps2 40 --plot grow.png
    python recipes/grow.py --noise 0.05                     # break the symmetry of copied channels (not exact)
    OMP_NUM_THREADS=1 python recipes/grow.py                # on a busy machine: far faster than 2 spinning threads
    torchrun --nproc_per_node=2 recipes/grow.py             # the same on 2 processes (gloo on CPU, nccl on GPU)
    python recipes/grow.py --model mypkg.nets:net --data /path/to/imagefolder --input-size 224 --phi 1

Three arms, each trained ``--steps1 + --steps2`` SGD steps in all, per seed:

- grown: the base trained ``--steps1`` steps (cosine over them) at ``--input-size``, then grown to ``--phi``
  with ``compscale.scale(base, phi, init="preserve", noise=--noise)`` (Net2Net widening, identity new
  blocks: the same function at the base input size) and trained ``--steps2`` steps (a fresh optimizer, a
  new cosine from ``--lr2``, lower than ``--lr``) at the scaled network's own input size,
  ``result.scaling.input_size``;
- scratch: ``compscale.scale(fresh_base, phi)``, trained all the steps (one cosine) at its input size;
- base: the same trained base as the grown arm, trained on ``--steps2`` steps (a fresh optimizer, a new
  cosine from ``--lr2``) without growing, at the base input size.

Right after growing, the grown model is evaluated at the BASE input size next to the base (the same
function there: equal accuracy, logits equal to float error) and at its scaled input size, where it
trains from then on. Every arm is evaluated every ``--eval-every`` steps. Rank 0 prints the checks, a
markdown table of final accuracy (mean, std, min, max over seeds), a table of mean accuracy against
steps, JSON lines with ``--json``, and saves a plot of accuracy against steps (``--plot``, PNG).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python recipes/grow.py` from anywhere

import compscale
from compscale.checkpoint import load_model
from recipes.train import _batches, _distributed, cosine, datasets, evaluate, fit

__all__ = ["ARMS", "main", "parse_args", "run"]

ARMS = ("grown (warm start)", "scratch", "base trained on")
GROWN, SCRATCH, BASE = ARMS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="recipes.models:tiny_resnet", help="torchvision name or module:callable")
    p.add_argument("--data", default="shapes", help="'shapes' (procedural, no download) or an ImageFolder path")
    p.add_argument("--input-size", type=int, default=32, help="the base model's input size")
    p.add_argument("--phi", type=float, default=1.0)
    p.add_argument("--steps1", type=int, default=60, help="steps of the base before growing")
    p.add_argument("--steps2", type=int, default=60, help="steps after growing (the base arm: steps more)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--noise", type=float, default=0.0, help="compscale.scale(noise=): relative std of "
                   "noise on copied channels' incoming weights; 0 keeps the function exact, but copies stay copies")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lr2", type=float, default=0.01, help="peak LR after the grow step (grown and base arms): "
                   "lower than --lr, so that the restart does not wash out what the base learned")
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--plot", default="grow.png")
    p.add_argument("--json", action="store_true", help="also print one JSON line per seed and arm")
    args = p.parse_args(argv)
    if args.steps1 < 1 or args.steps2 < 1 or args.eval_every < 1:
        p.error("--steps1, --steps2 and --eval-every must be positive")
    return args


class _Context:
    """The process group and the data of one seed, at each input size asked for."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.seed = 0
        self._data: dict[int, tuple[Dataset[Any], Dataset[Any]]] = {}

    def for_seed(self, seed: int) -> None:
        self.seed = seed
        self._data.clear()

    def data(self, size: int) -> tuple[Dataset[Any], Dataset[Any]]:
        """(train, eval) at ``size``; the procedural eval set is rendered once, not at every evaluation."""
        if size not in self._data:
            train_set, eval_set = datasets(argparse.Namespace(**{**vars(self.args), "seed": self.seed}), size)
            if self.args.data == "shapes":
                xs, ys = zip(*(eval_set[i] for i in range(len(eval_set))))  # type: ignore[arg-type]
                eval_set = TensorDataset(torch.stack(xs), torch.tensor(ys))
            self._data[size] = train_set, eval_set
        return self._data[size]


def _input_size(model: nn.Module) -> int:
    return int(cast("compscale.ScalingPlan", model.scaling).input_size[0])


def _eval_steps(args: argparse.Namespace) -> list[int]:
    total = args.steps1 + args.steps2
    return sorted({*range(args.eval_every, total + 1, args.eval_every), args.steps1, total})


def train_curve(model: nn.Module, size: int, start: int, stop: int, ctx: _Context, lr: float | None = None,
                ) -> list[tuple[int, float]]:
    """Train ``model`` at ``size`` from step ``start`` to ``stop`` (a fresh SGD at ``lr``, by default ``--lr``,
    one cosine over the segment), evaluating at each of the recipe's evaluation steps in ``(start, stop]``;
    ``[(step, accuracy)]``."""
    args = ctx.args
    train_set, eval_set = ctx.data(size)
    sampler: DistributedSampler[Any] | None = None
    if ctx.world > 1:
        sampler = DistributedSampler(train_set, ctx.world, ctx.rank, seed=ctx.seed + start)
    loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                        generator=torch.Generator().manual_seed(ctx.seed * 1009 + start))
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr if lr is None else lr, momentum=0.9, weight_decay=5e-4)
    sched = cosine(opt, stop - start)
    batches = _batches(loader, sampler)
    curve, step = [], start
    for at in (s for s in _eval_steps(args) if start < s <= stop):
        fit(net, batches, opt, sched, range(step, at), ctx.device)
        curve.append((at, evaluate(model, eval_set, ctx.device)))
        step = at
    return curve


@torch.no_grad()
def max_logit_gap(a: nn.Module, b: nn.Module, dataset: Dataset[Any], device: torch.device) -> float:
    """max |a(x) - b(x)| over ``dataset``, both in eval mode."""
    a.eval()
    b.eval()
    gap = 0.0
    for x, _ in DataLoader(dataset, batch_size=128):
        x = x.to(device)
        gap = max(gap, float((a(x).float() - b(x).float()).abs().max()))
    a.train()
    b.train()
    return gap


def _changed(noise: float) -> str:
    return f"accuracy changed: --noise {noise:g} is not exact by design" if noise else "ACCURACY CHANGED"


def run_seed(seed: int, ctx: _Context) -> dict[str, Any]:
    """The three arms for one seed: their curves, final accuracies, costs, and the growth check."""
    args = ctx.args
    s1, total = args.steps1, args.steps1 + args.steps2
    ctx.for_seed(seed)
    torch.manual_seed(seed)
    base = load_model(args.model).to(ctx.device)
    base_curve = train_curve(base, args.input_size, 0, s1, ctx)

    grown = compscale.scale(base, args.phi, input_size=args.input_size, init="preserve", noise=args.noise,
                            seed=seed)
    size = _input_size(grown)
    _, base_eval = ctx.data(args.input_size)
    plan = cast("compscale.ScalingPlan", grown.scaling)
    check = {"seed": seed, "step": s1, "input_size": args.input_size, "scaled_input_size": size,
             "init": plan.init, "init_error": plan.init_error,
             "base_accuracy": evaluate(base, base_eval, ctx.device),
             "grown_accuracy": evaluate(grown, base_eval, ctx.device),
             "max_logit_gap": max_logit_gap(base, grown, base_eval, ctx.device),
             "grown_accuracy_scaled": evaluate(grown, ctx.data(size)[1], ctx.device)}
    check["preserved"] = check["base_accuracy"] == check["grown_accuracy"]
    if ctx.rank == 0:
        print(f"seed {seed}: after {s1} steps, at {args.input_size} px: base {check['base_accuracy']:.4f}, "
              f"grown right after growing {check['grown_accuracy']:.4f} "
              f"(init={check['init']!r}, max |logit gap| {check['max_logit_gap']:.2e}: "
              f"{'same accuracy' if check['preserved'] else _changed(args.noise)}); "
              f"grown at its {size} px: {check['grown_accuracy_scaled']:.4f}", flush=True)

    continued = copy.deepcopy(base)
    curves = {GROWN: [*base_curve, (s1, check["grown_accuracy_scaled"]),
                      *train_curve(grown, size, s1, total, ctx, args.lr2)],
              BASE: [*base_curve, *train_curve(continued, args.input_size, s1, total, ctx, args.lr2)]}
    torch.manual_seed(seed + 10_000)
    scratch = compscale.scale(load_model(args.model), args.phi, input_size=args.input_size).to(ctx.device)
    curves[SCRATCH] = train_curve(scratch, _input_size(scratch), 0, total, ctx)

    base_cost = compscale.profile(base, args.input_size)
    big_cost = compscale.profile(grown, size)
    scratch_cost = compscale.profile(scratch, _input_size(scratch))
    # training compute in MACs per training image: forward MACs of each step's network, summed over the steps
    spent = {GROWN: s1 * base_cost.macs + args.steps2 * big_cost.macs, SCRATCH: total * scratch_cost.macs,
             BASE: total * base_cost.macs}
    finite = {GROWN: grown, SCRATCH: scratch, BASE: continued}
    nets = {GROWN: (size, big_cost), SCRATCH: (_input_size(scratch), scratch_cost), BASE: (args.input_size, base_cost)}
    arms = {arm: {"seed": seed, "arm": arm, "input_size": nets[arm][0], "macs": nets[arm][1].macs,
                  "params": nets[arm][1].params, "train_macs": spent[arm], "steps": [s for s, _ in curves[arm]],
                  "accuracy": [a for _, a in curves[arm]], "final": curves[arm][-1][1],
                  "finite_weights": all(bool(t.isfinite().all()) for t in finite[arm].state_dict().values()
                                        if t.is_floating_point())} for arm in ARMS}
    return {"seed": seed, "check": check, "arms": arms}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every seed's result (``run_seed``), on every rank."""
    rank, world, device = _distributed()
    try:
        ctx = _Context(args, rank, world, device)
        results = []
        for seed in args.seeds:
            result = run_seed(seed, ctx)
            results.append(result)
            if rank == 0 and args.json:
                print(json.dumps({"check": result["check"]}))
                for arm in ARMS:
                    print(json.dumps(result["arms"][arm]))
    finally:
        if world > 1:
            dist.destroy_process_group()
    return results


def _spread(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sample std (0 for one seed), min, max."""
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, min(values), max(values))


def table(results: list[dict[str, Any]]) -> str:
    """Final accuracy per arm over the seeds, with each arm's network and training compute."""
    scratch_macs = statistics.fmean(r["arms"][SCRATCH]["train_macs"] for r in results)
    lines = ["| arm | input | params (M) | MMACs | train compute (vs scratch) | accuracy mean | std | min | max "
             "| seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        rows = [r["arms"][arm] for r in results]
        mean, std, lo, hi = _spread([row["final"] for row in rows])
        first = rows[0]
        size = f"{results[0]['check']['input_size']} → {first['input_size']}" if arm == GROWN else first["input_size"]
        compute = statistics.fmean(row["train_macs"] for row in rows) / scratch_macs
        lines.append(f"| {arm} | {size} | {first['params'] / 1e6:.3f} | {first['macs'] / 1e6:.1f} | {compute:.2f} | "
                     f"{mean:.4f} | {std:.4f} | {lo:.4f} | {hi:.4f} | {len(rows)} |")
    return "\n".join(lines)


def check_table(results: list[dict[str, Any]]) -> str:
    """The function-preservation check, one row per seed."""
    lines = ["| seed | step | base acc (base px) | grown acc right after growing (base px) | max abs logit gap "
             "| grown acc (scaled px) |", "|---|---|---|---|---|---|"]
    for r in results:
        c = r["check"]
        lines.append(f"| {c['seed']} | {c['step']} | {c['base_accuracy']:.4f} | {c['grown_accuracy']:.4f} | "
                     f"{c['max_logit_gap']:.2e} | {c['grown_accuracy_scaled']:.4f} |")
    return "\n".join(lines)


def curve_table(results: list[dict[str, Any]]) -> str:
    """Mean accuracy over the seeds at each evaluation step, per arm (at the grow step the grown arm shows
    the grown model at its scaled input size, before any step on it)."""
    means = {arm: _mean_curve(results, arm) for arm in ARMS}
    steps = sorted({s for curve in means.values() for s, _ in curve})
    lines = ["| step | " + " | ".join(ARMS) + " |", "|---" * (len(ARMS) + 1) + "|"]
    for step in steps:
        cells = [next((f"{a:.4f}" for s, a in reversed(means[arm]) if s == step), "") for arm in ARMS]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_curve(results: list[dict[str, Any]], arm: str, stat: int = 0) -> list[tuple[int, float]]:
    """(step, statistic over seeds) along an arm's curve; ``stat`` indexes ``_spread``'s (mean, std, min, max)."""
    runs = [r["arms"][arm] for r in results]
    return [(step, _spread([run["accuracy"][i] for run in runs])[stat]) for i, step in enumerate(runs[0]["steps"])]


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    grow_at = results[0]["check"]["step"]
    for arm, colour in zip(ARMS, ("tab:red", "tab:blue", "tab:gray")):
        # before growing, the grown arm is the base arm: drawn from the grow step on (base px, then its own px)
        first = 0 if arm != GROWN else [s for s, _ in _mean_curve(results, arm)].index(grow_at)
        steps = [s for s, _ in _mean_curve(results, arm)][first:]
        mean, lo, hi = ([a for _, a in _mean_curve(results, arm, stat)][first:] for stat in (0, 2, 3))
        ax.plot(steps, mean, marker="o", ms=3, color=colour, label=arm)
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, linewidth=0)
    ax.axvline(grow_at, color="black", linestyle="--", linewidth=0.8)
    ax.annotate(" grow", (grow_at, 0.02), xycoords=("data", "axes fraction"), fontsize=8)
    ax.set_xlabel("SGD steps")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"warm start vs scratch vs base (mean, band: min..max over {len(results)} seeds)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    results = run(args)
    if int(os.environ.get("RANK", 0)) == 0:
        broken = sorted({arm for r in results for arm in ARMS if not r["arms"][arm]["finite_weights"]})
        if broken:
            print(f"warning: NaN or inf in the weights of {', '.join(broken)}")
        print(check_table(results))
        print()
        print(table(results))
        print()
        print(curve_table(results))
        plot(results, args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
