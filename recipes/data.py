"""Data for the recipes: procedurally generated shapes datasets (no download) or an ImageFolder.

``Shapes`` draws one of four shapes (disc, square, triangle, ring) at a random position, size and
colour over a noisy textured background. Images are rendered analytically at any resolution, so a
larger input really shows finer edges (resolution scaling means something), and each index is
deterministic given the seed.

``ShapeBoxes`` is its detection variant: one to three shapes per image, each with its box and label, in the
``(image, target)`` form torchvision's detectors take (``collate`` batches them as lists).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

__all__ = ["CLASSES", "ShapeBoxes", "Shapes", "collate", "image_folder"]

CLASSES = ("disc", "square", "triangle", "ring")


class Shapes(Dataset[tuple[torch.Tensor, int]]):
    """``n`` images of ``size`` x ``size`` pixels, labels in ``range(4)``, deterministic by ``seed``."""

    def __init__(self, n: int = 2048, size: int = 64, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(len(CLASSES), (1,), generator=g))
        u = torch.rand(6, generator=g)
        cx, cy, r = 0.3 + 0.4 * u[0], 0.3 + 0.4 * u[1], 0.12 + 0.13 * u[2]
        ys, xs = torch.meshgrid(torch.linspace(0, 1, self.size), torch.linspace(0, 1, self.size), indexing="ij")
        dx, dy = xs - cx, ys - cy
        mask = _shape(label, dx, dy, r, angle=float(u[3]) * 2 * math.pi)
        colour = torch.rand(3, 1, 1, generator=g) * 0.6 + 0.4
        texture = 0.15 * torch.sin(xs * (8 + 8 * u[4]) * math.pi) * torch.cos(ys * (8 + 8 * u[5]) * math.pi)
        noise = 0.1 * torch.randn(3, self.size, self.size, generator=g)
        image = 0.3 + texture + noise + mask * (colour - 0.3)
        return ((image - 0.45) / 0.25).float(), label


def _shape(label: int, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor, angle: float) -> torch.Tensor:
    dist = (dx**2 + dy**2).sqrt()
    if label == 0:
        return (dist < r).float()
    c, s = math.cos(angle), math.sin(angle)
    rx, ry = c * dx - s * dy, s * dx + c * dy
    if label == 1:
        return ((rx.abs() < r * 0.8) & (ry.abs() < r * 0.8)).float()
    if label == 2:
        return ((ry < r * 0.5) & (ry > -r + 1.7 * rx.abs())).float()
    return ((dist < r) & (dist > r * 0.6)).float()


class ShapeBoxes(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """``n`` images of ``size`` x ``size`` pixels, each with one to three shapes and their boxes, deterministic by
    ``seed``: ``(image, {"boxes": boxes, "labels": labels})`` as torchvision's detectors take them.

    The image is ``[3, size, size]`` in ``[0, 1]`` (a detector normalises it itself). ``boxes`` is ``[K, 4]``
    float, ``(x0, y0, x1, y1)`` in pixels: the tight box of the pixels the shape draws, pixel ``i`` spanning
    ``[i, i + 1)``. ``labels`` is ``[K]`` int64, ``1 + CLASSES.index(shape)``: 0 is the detectors' background.
    Shapes do not overlap (their enclosing circles are apart), so each one is drawn whole. A scene is drawn in
    unit coordinates before any pixel is, so an index is the same scene at every ``size``; below about 48 pixels
    a thin ring can miss every pixel centre, and a shape that draws no pixel has no box.
    """

    def __init__(self, n: int = 512, size: int = 128, seed: int = 0) -> None:
        self.n, self.size, self.seed = n, size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, masks, labels = self.render(index)
        drawn = masks.flatten(1).any(1)
        return image, {"boxes": _boxes(masks[drawn]), "labels": labels[drawn]}

    def render(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image, masks, labels)``: the image, each shape's pixels (``[K, size, size]`` bool) and label."""
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + index)  # not the streams of Shapes(seed)
        placed = _place(g, int(torch.randint(1, MAX_SHAPES + 1, (1,), generator=g)))
        colours = torch.rand(len(placed), 3, 1, 1, generator=g) * 0.6 + 0.4
        u = torch.rand(2, generator=g)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, self.size), torch.linspace(0, 1, self.size), indexing="ij")
        masks = torch.stack([_shape(label - 1, xs - cx, ys - cy, r, angle) > 0 for label, cx, cy, r, angle in placed])
        texture = 0.15 * torch.sin(xs * (8 + 8 * u[0]) * math.pi) * torch.cos(ys * (8 + 8 * u[1]) * math.pi)
        noise = 0.1 * torch.randn(3, self.size, self.size, generator=g)  # last: the only draw that depends on size
        image = 0.3 + texture + noise + (masks[:, None] * (colours - 0.3)).sum(0)
        labels = torch.tensor([label for label, *_ in placed], dtype=torch.int64)
        return image.clamp(0, 1).float(), masks, labels


MAX_SHAPES = 3


def _place(g: torch.Generator, count: int) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Up to ``count`` shapes ``(label, cx, cy, r, angle)`` whose enclosing circles (radius 1.15 r: the square's
    corners reach 1.13 r) lie inside the unit square and keep apart; a shape that finds no room in 100 draws is
    left out (rare: three circles of radius at most 0.21 in the unit square)."""
    placed: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
    for _ in range(count):
        label = 1 + int(torch.randint(len(CLASSES), (1,), generator=g))
        for _try in range(100):
            u = torch.rand(4, generator=g)
            r = 0.08 + 0.1 * u[0]
            reach = 1.15 * r
            cx, cy = reach + (1 - 2 * reach) * u[1], reach + (1 - 2 * reach) * u[2]
            if all(((cx - x) ** 2 + (cy - y) ** 2).sqrt() > 1.15 * (r + s) + 0.02 for _, x, y, s, _ in placed):
                placed.append((label, cx, cy, r, float(u[3]) * 2 * math.pi))
                break
    return placed


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """The tight ``(x0, y0, x1, y1)`` pixel box of each non-empty ``[K, H, W]`` mask."""
    boxes = torch.zeros(len(masks), 4)
    for box, mask in zip(boxes, masks):
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        box[:] = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
    return boxes


def collate(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
            ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``DataLoader(..., collate_fn=collate)`` for ``ShapeBoxes``: images and targets as lists, as detectors take
    them (images of one batch may differ in size, and each has its own number of boxes)."""
    return [image for image, _ in batch], [target for _, target in batch]


def image_folder(path: str, size: int, train: bool) -> Dataset[tuple[torch.Tensor, int]]:
    """``torchvision.datasets.ImageFolder`` with compscale's transforms for ``size``."""
    from torchvision.datasets import ImageFolder

    from compscale.transforms import eval_transform, train_transform

    return ImageFolder(path, transform=train_transform(size) if train else eval_transform(size))
