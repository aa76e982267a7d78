"""Train a (scaled) model: one process on the CPU, or DDP under ``torchrun --nproc_per_node=N``.

    python recipes/train.py --phi 1                         # tiny ResNet scaled by phi=1, procedural shapes
    torchrun --nproc_per_node=2 recipes/train.py --phi 1    # the same on 2 processes (gloo on CPU, nccl on GPU)
    python recipes/train.py --model resnet18 --data /path/to/imagefolder --input-size 224 --phi 1

``--strategy`` picks how phi (or a ``--target-macs``/``--target-acts`` budget) becomes depth, width and resolution
(``compscale.scale(strategy=...)``: compound, fast, depth, width, resolution or a pycls type string such as d1_w8_r1).
``--width-divisor K`` rounds channel counts to multiples of K instead of the library's 8 (finer steps for a tiny
network, so that arms at equal MACs land closer to each other; such a model cannot be checkpointed).

Checkpoints (``--checkpoint PATH``) carry the scaling plan (``compscale.checkpoint``), the optimizer and
the step: rerunning the same command resumes, and ``compscale.checkpoint.load(PATH)`` rebuilds the model.
AMP is used on GPU. Rank 0 prints one JSON line: accuracy, input size, MACs, params, activations, steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python recipes/train.py` from anywhere

import compscale
from compscale.checkpoint import load_model
from compscale.planning.rounding import make_divisible
from recipes.data import Shapes, image_folder

__all__ = ["RoundTo", "cosine", "evaluate", "fit", "main", "scale_options", "train"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="recipes.models:tiny_resnet", help="torchvision name or module:callable")
    p.add_argument("--data", default="shapes", help="'shapes' (procedural, no download) or an ImageFolder path")
    p.add_argument("--input-size", type=int, default=32, help="the base model's input size")
    for name in ("phi", "depth", "width", "resolution", "target_macs", "target_acts"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None)
    p.add_argument("--vary", default="phi")
    p.add_argument("--strategy", default="compound", help="compscale.scale(strategy=): compound, fast, depth, width, "
                   "resolution or a pycls type string (d1_w8_r1)")
    p.add_argument("--width-divisor", type=int, default=8, help="round channel counts to multiples of this "
                   "(the library's default: 8)")
    p.add_argument("--resolution-divisor", type=int, default=8, help="the scaled input size is a multiple of this")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="save here at the end, and resume from it if it exists")
    p.add_argument("--digest", default=None, help="write each rank's weight digest to DIGEST.rank<r>")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.width_divisor < 1 or args.resolution_divisor < 1:
        p.error("--width-divisor and --resolution-divisor must be at least 1")
    if args.checkpoint and args.width_divisor != 8:
        p.error("a checkpoint records the plan, and cannot record --width-divisor (a custom rounding): drop one")
    return args


@dataclasses.dataclass(frozen=True)
class RoundTo:
    """``round_width`` for ``compscale.scale``: channel counts to multiples of ``multiple`` instead of 8.

    A group that a grouped conv or GroupNorm constrains arrives with another divisor than 8; it keeps that one.
    """

    multiple: int

    def __call__(self, channels: float, divisor: int) -> int:
        return make_divisible(channels, self.multiple if divisor == 8 else divisor)


def scale_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``compscale.scale``/``compscale.plan`` that the arguments set besides the multipliers."""
    options: dict[str, Any] = {"input_size": args.input_size, "resolution_divisor": args.resolution_divisor}
    if args.width_divisor != 8:
        options["round_width"] = RoundTo(args.width_divisor)
    return options


def _distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return rank, dist.get_world_size(), torch.device("cuda" if cuda else "cpu")


def build(args: argparse.Namespace) -> nn.Module:
    """The scaled model (or, with --checkpoint present, the saved one)."""
    if args.checkpoint and Path(args.checkpoint).exists():
        return compscale.checkpoint.load(args.checkpoint)
    kwargs = {k: getattr(args, k) for k in ("depth", "width", "resolution", "target_macs", "target_acts")
              if getattr(args, k) is not None}
    if "target_macs" in kwargs or "target_acts" in kwargs:
        kwargs["vary"] = args.vary
    return compscale.scale(load_model(args.model), args.phi, strategy=args.strategy, **kwargs,
                           **scale_options(args))


def datasets(args: argparse.Namespace, size: int) -> tuple[Dataset[Any], Dataset[Any]]:
    if args.data == "shapes":
        return Shapes(args.train_images, size, seed=args.seed), Shapes(args.eval_images, size, seed=args.seed + 1)
    return image_folder(os.path.join(args.data, "train"), size, True), image_folder(
        os.path.join(args.data, "val"), size, False)


def _batches(loader: DataLoader[Any], sampler: DistributedSampler[Any] | None) -> Iterator[Any]:
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train(args: argparse.Namespace) -> dict[str, Any]:
    rank, world, device = _distributed()
    torch.manual_seed(args.seed)
    model = build(args).to(device)
    plan = model.scaling
    size = plan.input_size[0]
    cost = compscale.profile(model, plan.input_size)
    train_set, eval_set = datasets(args, size)
    sampler = DistributedSampler(train_set, world, rank, seed=args.seed) if world > 1 else None
    loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    start = _resume(args, opt)
    sched = cosine(opt, args.steps, start)
    fit(net, _batches(loader, sampler), opt, sched, range(start, args.steps), device,
        progress=not args.quiet and rank == 0)
    summary = {"accuracy": evaluate(model, eval_set, device), "input_size": list(plan.input_size),
               "macs": cost.macs, "params": cost.params, "acts": cost.acts, "steps": args.steps, "world_size": world,
               "depth": plan.depth, "width": plan.width, "resolution": plan.resolution,
               "phi": plan.multipliers.phi, "strategy": plan.multipliers.strategy}
    if args.digest:
        Path(f"{args.digest}.rank{rank}").write_text(_digest(model))
    if rank == 0 and args.checkpoint:
        compscale.checkpoint.save(model, args.checkpoint, model=args.model, optimizer=opt.state_dict(),
                                  step=args.steps)
    if world > 1:
        dist.destroy_process_group()
    return summary


def fit(net: nn.Module, batches: Iterator[Any], opt: torch.optim.Optimizer, sched: Any, steps: range,
        device: torch.device, progress: bool = False) -> None:
    """The training loop: cross-entropy, SGD steps, AMP on GPU."""
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    net.train()
    for _step in _progress(steps, disable=not progress):
        x, y = (t.to(device) for t in next(batches))
        with torch.autocast(device.type, enabled=amp):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()


def cosine(opt: torch.optim.Optimizer, steps: int, start: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay over ``steps``; ``start`` continues a resumed run."""
    for group in opt.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)), last_epoch=start - 1)


def _resume(args: argparse.Namespace, opt: torch.optim.Optimizer) -> int:
    if not (args.checkpoint and Path(args.checkpoint).exists()):
        return 0
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    opt.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"])


def _progress(it: range, disable: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the `recipes` extra; without it, no bar
        return it
    return tqdm(it, disable=disable, desc="train")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset[Any], device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=128):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    model.train()
    return correct / max(1, total)


def _digest(model: nn.Module) -> str:
    """SHA-256 of the parameters (BatchNorm statistics are per rank until DDP broadcasts them next forward)."""
    h = hashlib.sha256()
    for name, t in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    summary = train(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
