"""Compound scaling of a detector against depth, width or resolution alone at equal MACs, on ``ShapeBoxes``.

    python recipes/detect.py                      # SSDlite (MobileNetV3), 128 px, phi=1, 2 seeds x 300 steps: 31 min
    python recipes/detect.py --seeds 0 --steps 100 --json
    python recipes/detect.py --model retinanet_resnet50_fpn --input-size 128 --steps 200   # ~10x slower a step

Five arms: the base detector (torchvision's ``--model``, ``weights=None, weights_backbone=None``, 5 classes: the
background and ``ShapeBoxes``' four shapes, its transform set to ``--input-size``), the compound arm
(``compscale.scale(base, phi=--phi)``: backbone by alpha, beta, gamma, feature network and heads 1.35**phi wider and
floor(phi / 3) layers deeper, input size by gamma**phi), then depth, width and resolution alone
(``compscale.scale(base, depth=d)``, ...: ``width=`` alone widens the neck and heads as the backbone), each at
the multiplier whose detector's MACs are nearest the compound arm's: a bisection (``--bisect-steps``) on built
detectors, since costs are step functions (whole blocks, channels rounded to 8, input sizes to multiples of 8).

MACs are those of one image through the detector's convolutional part (:class:`Network`: the backbone with its
FPN or extra layers, and the dense head; a two-stage detector's per-box head is not counted), at the size the
detector runs: ``result.scaling.input_size`` padded, as the detector's transform pads it, to its
``size_divisible`` (32 for RetinaNet, FCOS and Faster R-CNN, 1 for SSD).

Every arm is trained ``--steps`` AdamW steps for each seed (``--seeds``; a seed draws the weights and the training
images, under ``torch.random.fork_rng``: torch's global generator is left as it was), on images rendered at the
arm's own input size, then evaluated on one held-out set (the same scenes for every arm and seed, rendered at the
arm's size). Metrics (:func:`box_metrics`), over the held-out detections scoring at least ``--score-threshold``:
IoU, each ground-truth box's best IoU with a detection of its class (0 if none), averaged over boxes; precision and
recall at IoU ``--iou-threshold`` (0.5), detections matched greedily by score as in PASCAL VOC. Prints a markdown
table (multipliers, the neck and heads' width and added head layers, input size, params, MACs, MACs over the
compound arm's, each metric's mean ± sample std over seeds) and, with ``--json``, one JSON line per seed and arm
and per arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python recipes/detect.py` from anywhere

import compscale
from recipes.data import CLASSES, ShapeBoxes, collate
from recipes.strategies import parse_seeds
from recipes.train import cosine

__all__ = ["DIMENSIONS", "METRICS", "NUM_CLASSES", "Arm", "Network", "arms", "box_metrics", "detector", "evaluate",
           "fit", "input_size", "macs", "macs_at", "main", "match", "parse_args", "run", "run_size", "summarise",
           "table"]

NUM_CLASSES = 1 + len(CLASSES)  # torchvision's detectors count the background as class 0
DIMENSIONS = ("depth", "width", "resolution")
HELD_OUT_SEED = -1  # training sets use the seeds (>= 0): no held-out image is ever trained on
METRICS = ("iou", "precision", "recall")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ssdlite320_mobilenet_v3_large", help="a torchvision detection builder")
    p.add_argument("--input-size", type=int, default=128, help="the base detector's input size (its transform's)")
    p.add_argument("--phi", type=float, default=1.0, help="the compound arm's phi; the other arms match its MACs")
    p.add_argument("--arms", default="base,compound," + ",".join(DIMENSIONS), help="which arms, in order")
    p.add_argument("--steps", type=int, default=300, help="AdamW steps per arm and seed")
    p.add_argument("--seeds", type=parse_seeds, nargs="+", default=None, help="seeds: '0 1' or '0,1' (default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW's peak learning rate (cosine decay)")
    p.add_argument("--train-images", type=int, default=2048)
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--score-threshold", type=float, default=0.3, help="detections scoring less are not counted")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="a detection this close to a box is correct")
    p.add_argument("--bisect-steps", type=int, default=6, help="bisection steps per single-dimension arm")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per seed and arm, and per arm")
    return _check(p, p.parse_args(argv))


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    args.seeds = [0, 1] if args.seeds is None else [s for group in args.seeds for s in group]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not args.seeds or min(args.seeds) < 0:
        p.error("give at least one seed, each 0 or more")
    if unknown := set(args.arms) - {"base", "compound", *DIMENSIONS}:
        p.error(f"unknown arms {sorted(unknown)}: choose from base, compound, {', '.join(DIMENSIONS)}")
    if min(args.steps, args.batch_size, args.train_images, args.eval_images, args.input_size) < 1:
        p.error("--steps, --batch-size, --train-images, --eval-images and --input-size must be positive")
    if args.train_images < args.batch_size:
        p.error("--train-images must be at least --batch-size (batches are whole)")
    if args.bisect_steps < 0 or args.threads < 0:
        p.error("--bisect-steps and --threads must be 0 or more")
    return args


def detector(name: str, size: int) -> nn.Module:
    """torchvision's detector ``name``, untrained (``weights=None, weights_backbone=None``), with ``NUM_CLASSES``
    classes and its transform at ``size`` (square images are neither resized nor, for SSD, stretched).

    The transform takes the size through the constructor's ``min_size``/``max_size``; SSD's builders fix their
    size (``ssdlite320_...``), so theirs is set on the built transform (``fixed_size``), as compscale scales it.
    """
    builder = torchvision.models.get_model_builder(name)
    if not name.startswith("ssd"):
        return builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=size, max_size=size)
    model = builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    model.transform.min_size, model.transform.max_size, model.transform.fixed_size = (size,), size, (size, size)
    return model


def input_size(model: nn.Module) -> tuple[int, int]:
    """``(H, W)`` of the images to feed ``model``: its scaling plan's, else its transform's (square images)."""
    plan = getattr(model, "scaling", None)
    if plan is not None:
        return (int(plan.input_size[0]), int(plan.input_size[-1]))
    transform: Any = model.transform
    if transform.fixed_size is not None:
        return (int(transform.fixed_size[1]), int(transform.fixed_size[0]))  # fixed_size is (W, H)
    return (int(transform.min_size[-1]),) * 2


def run_size(model: nn.Module) -> tuple[int, int]:
    """The size the network sees: ``input_size`` padded to the transform's ``size_divisible``, as it batches."""
    step = int(getattr(model.transform, "size_divisible", 1))
    return tuple(math.ceil(s / step) * step for s in input_size(model))  # type: ignore[return-value]


class Network(nn.Module):
    """A detector's convolutional part, images to head outputs: the backbone (with its FPN or extra layers) and the
    dense head (RetinaNet's, FCOS's, SSD's; a two-stage detector's RPN head, not its per-box head, whose cost
    depends on how many proposals it keeps). It shares the detector's modules: nothing is copied."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        parts: Any = model
        self.backbone: nn.Module = parts.backbone
        self.head: nn.Module = parts.head if hasattr(parts, "head") else parts.rpn.head

    def forward(self, x: torch.Tensor) -> Any:
        features = self.backbone(x)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return self.head(list(features.values()))


def macs(model: nn.Module) -> int:
    """MACs of one image through ``Network(model)`` at ``run_size(model)`` (``compscale.profile``)."""
    return compscale.profile(Network(model), run_size(model), in_channels=3).macs


@dataclasses.dataclass(frozen=True)
class Arm:
    """One row: its label, the ``compscale.scale`` arguments that build it (none for the base) and its MACs."""

    label: str
    options: dict[str, Any]
    macs: int


def match(base: nn.Module, dimension: str, target: int, steps: int) -> tuple[float, int]:
    """``(multiplier, MACs)``: the multiplier of ``dimension`` alone whose scaled detector's MACs are nearest
    ``target``. The bracket doubles (or halves) from 1 until it holds the target (at most x8), then ``steps``
    geometric bisections narrow it; the end nearer the target wins (MACs move in steps, so neither may hit it)."""
    lo = hi = 1.0
    lo_macs = hi_macs = macs(base)
    for _ in range(3):
        if lo_macs <= target <= hi_macs:
            break
        if hi_macs < target:
            lo, lo_macs = hi, hi_macs
            hi, hi_macs = 2 * hi, macs_at(base, dimension, 2 * hi)
        else:
            hi, hi_macs = lo, lo_macs
            lo, lo_macs = lo / 2, macs_at(base, dimension, lo / 2)
    for _ in range(steps):
        if lo_macs == target or hi_macs == target or not lo_macs < target < hi_macs:
            break
        mid = math.sqrt(lo * hi)
        mid_macs = macs_at(base, dimension, mid)
        if mid_macs < target:
            lo, lo_macs = mid, mid_macs
        else:
            hi, hi_macs = mid, mid_macs
    return min((lo, lo_macs), (hi, hi_macs), key=lambda point: abs(point[1] - target))


def macs_at(base: nn.Module, dimension: str, multiplier: float) -> int:
    """``macs`` of ``compscale.scale(base, **{dimension: multiplier})``."""
    options: dict[str, Any] = {dimension: multiplier}
    return macs(compscale.scale(base, **options))


def arms(args: argparse.Namespace) -> list[Arm]:
    """The arms ``--arms`` names: the base, compound at ``--phi``, and each dimension alone at compound's MACs.

    Solved once, on detectors whose weights do not matter (drawn in a forked generator); every seed then
    rebuilds its arm from the solved arguments."""
    with torch.random.fork_rng(devices=[]):
        base = detector(args.model, args.input_size)
        compound = compscale.scale(base, args.phi) if set(args.arms) - {"base"} else base
    target = macs(compound)
    solved = {"base": Arm("base", {}, macs(base)), "compound": Arm("compound", {"phi": args.phi}, target)}
    for dimension in DIMENSIONS:
        if dimension in args.arms:
            with torch.random.fork_rng(devices=[]):
                multiplier, cost = match(base, dimension, target, args.bisect_steps)
            solved[dimension] = Arm(dimension, {dimension: multiplier}, cost)
    return [solved[label] for label in args.arms]


def _build(args: argparse.Namespace, arm: Arm, seed: int) -> nn.Module:
    """The arm's detector: the base's weights drawn from torch's generator, new layers' from ``seed``."""
    base = detector(args.model, args.input_size)
    return compscale.scale(base, **arm.options, seed=seed) if arm.options else base


def _forever(loader: DataLoader[Any]) -> Iterator[Any]:
    while True:
        yield from loader


def fit(model: nn.Module, dataset: Dataset[Any], steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Train ``model`` (a torchvision detector, which returns its losses in train mode) for ``steps`` AdamW steps
    on shuffled batches of ``dataset`` (the order drawn by ``seed``), cosine decay, gradients clipped at norm 10.
    Returns the last step's total loss."""
    loader = DataLoader(dataset, batch_size, shuffle=True, drop_last=True, collate_fn=collate,  # no batch of 1 for
                        generator=torch.Generator().manual_seed(seed))  # BatchNorm over SSD's 1x1 maps
    if len(loader) == 0:
        raise ValueError(f"the training set has fewer images than one batch ({batch_size})")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = cosine(opt, steps)
    batches = _forever(loader)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        images, targets = next(batches)
        loss = sum(model(images, targets).values(), torch.tensor(0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        sched.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset[Any], score_threshold: float = 0.3, iou_threshold: float = 0.5,
             batch_size: int = 16) -> dict[str, float]:
    """:func:`box_metrics` of ``model``'s detections on ``dataset`` (in eval mode, restored after)."""
    was_training = model.training
    model.eval()
    predictions, targets = [], []
    for images, batch_targets in DataLoader(dataset, batch_size, collate_fn=collate):
        predictions += model(images)
        targets += batch_targets
    model.train(was_training)
    return box_metrics(predictions, targets, score_threshold, iou_threshold)


def box_metrics(predictions: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                score_threshold: float = 0.3, iou_threshold: float = 0.5) -> dict[str, float]:
    """Detections against ground truth over a set of images: ``{"iou", "precision", "recall"}``.

    Only detections scoring at least ``score_threshold`` count. ``iou``: each ground-truth box's best IoU with a
    detection of its label (0 without one), averaged over all boxes. Detections are matched as PASCAL VOC does:
    in descending score, each to the box of its label it overlaps most; a match with IoU at least
    ``iou_threshold`` to a box not matched yet is correct. ``precision``: correct detections over detections;
    ``recall``: correct detections over boxes; each 0 when there is nothing to divide by.

    Example:
        >>> truth = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
        >>> found = {"boxes": torch.tensor([[0.0, 0, 10, 5], [0, 0, 10, 10]]), "labels": torch.tensor([1, 1]),
        ...          "scores": torch.tensor([0.9, 0.8])}
        >>> box_metrics([found], [truth])
        {'iou': 1.0, 'precision': 0.5, 'recall': 1.0}
    """
    best: list[torch.Tensor] = []
    correct = detections = 0
    for found, truth in zip(predictions, targets, strict=True):
        keep = found["scores"] >= score_threshold
        boxes, labels, scores = found["boxes"][keep], found["labels"][keep], found["scores"][keep]
        overlap = box_iou(boxes, truth["boxes"]) * (labels[:, None] == truth["labels"][None, :])  # [found, truth]
        best.append(overlap.max(0).values if len(boxes) else torch.zeros(len(truth["boxes"])))
        correct += _correct(overlap[scores.argsort(descending=True)], iou_threshold)
        detections += len(boxes)
    ious = torch.cat(best) if best else torch.zeros(0)
    return {"iou": float(ious.mean()) if len(ious) else 0.0,
            "precision": correct / detections if detections else 0.0,
            "recall": correct / len(ious) if len(ious) else 0.0}


def _correct(overlap: torch.Tensor, iou_threshold: float) -> int:
    """How many rows (detections, best first) of ``overlap`` [found, truth] match a column not matched before."""
    if overlap.shape[1] == 0:
        return 0
    taken = torch.zeros(overlap.shape[1], dtype=torch.bool)
    for row in overlap:
        j = int(row.argmax())
        if row[j] >= iou_threshold and not taken[j]:
            taken[j] = True
    return int(taken.sum())


def run(args: argparse.Namespace, arm_list: Sequence[Arm]) -> list[dict[str, Any]]:
    """Train and evaluate every arm for every seed; one result per seed and arm."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return [_run_one(args, arm, seed) for seed in args.seeds for arm in arm_list]
    finally:
        torch.set_num_threads(threads)


def _run_one(args: argparse.Namespace, arm: Arm, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the weights, and any draw the detector makes in training (an RPN's sampler)
        model = _build(args, arm, seed)
        size = input_size(model)[0]
        loss = fit(model, ShapeBoxes(args.train_images, size, seed=seed), args.steps, args.batch_size, args.lr, seed)
        scores = evaluate(model, ShapeBoxes(args.eval_images, size, seed=HELD_OUT_SEED), args.score_threshold,
                          args.iou_threshold)
    plan = getattr(model, "scaling", None)
    result = {"arm": arm.label, "seed": seed, **_multipliers(arm, plan), "input_size": list(input_size(model)),
              "run_size": list(run_size(model)), "params": sum(p.numel() for p in model.parameters()),
              "macs": arm.macs, "loss": loss, **scores, "train_s": time.perf_counter() - start}
    print(f"seed {seed} {arm.label}: " + ", ".join(f"{k} {scores[k]:.4f}" for k in METRICS)
          + f" ({result['train_s']:.0f} s)", flush=True)
    if args.json:
        print(json.dumps(result))
    return result


def _multipliers(arm: Arm, plan: Any) -> dict[str, Any]:
    """The arm's phi, d, w, r, the neck and heads' width and the layers added to each head tower: the plan's where
    there is one (the base has none: all 1, and no layer added)."""
    mult = getattr(plan, "multipliers", None)
    out: dict[str, Any] = {"phi": arm.options.get("phi")}
    for key in DIMENSIONS:
        out[key] = float(getattr(mult, key, 1.0))
    neck = getattr(mult, "neck_width", None)
    out["neck_width"] = float(out["width"] if neck is None else neck)
    out["head_layers"] = int(getattr(mult, "head_layers", 0))
    return out


def summarise(runs: Sequence[dict[str, Any]], reference: str = "compound") -> list[dict[str, Any]]:
    """One row per arm, in the order the arms ran: its multipliers and costs, each metric's per-seed values, mean
    and sample std; ``macs_ratio`` is the arm's MACs over the ``reference`` arm's (over the first arm's if absent)."""
    labels = list(dict.fromkeys(r["arm"] for r in runs))
    ref = next((r["macs"] for r in runs if r["arm"] == reference), runs[0]["macs"])
    rows = []
    for label in labels:
        mine = [r for r in runs if r["arm"] == label]
        row = {k: v for k, v in mine[0].items() if k not in (*METRICS, "seed", "loss", "train_s")}
        row.update(macs_ratio=mine[0]["macs"] / ref, seeds=[r["seed"] for r in mine])
        for key in METRICS:
            values = [r[key] for r in mine]
            row.update({f"{key}s": values, f"{key}_mean": statistics.fmean(values),
                        f"{key}_std": statistics.stdev(values) if len(values) > 1 else 0.0})
        rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]], iou_threshold: float = 0.5) -> str:
    """The summary as markdown: multipliers, input size, params, MACs, metrics as mean ± sample std over seeds."""
    heads = ["arm", "phi", "d", "w", "r", "neck w", "head +", "input", "params (M)", "MMACs", "x compound", "IoU",
             f"precision@{iou_threshold:g}", f"recall@{iou_threshold:g}", "seeds"]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for r in rows:
        size = f"{r['input_size'][0]}" + (f" ({r['run_size'][0]})" if r["run_size"] != r["input_size"] else "")
        cells = [r["arm"], "-" if r["phi"] is None else f"{r['phi']:g}",
                 *(f"{r[k]:.2f}" for k in (*DIMENSIONS, "neck_width")), f"{r['head_layers']:+d}", size,
                 f"{r['params'] / 1e6:.2f}", f"{r['macs'] / 1e6:.1f}", f"{r['macs_ratio']:.3f}",
                 *(f"{r[f'{k}_mean']:.3f} ± {r[f'{k}_std']:.3f}" for k in METRICS), str(len(r["seeds"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    arm_list = arms(args)
    for arm in arm_list:
        print(f"{arm.label}: {arm.options or 'unscaled'}, {arm.macs / 1e6:.1f} MMACs", flush=True)
    rows = summarise(run(args, arm_list))
    if args.json:
        for row in rows:
            print(json.dumps(row))
    print(table(rows, args.iou_threshold))
    return rows


if __name__ == "__main__":
    main()
