"""Data for the recipes: a procedurally generated shapes dataset (no download) or an ImageFolder.

``Shapes`` draws one of four shapes (disc, square, triangle, ring) at a random position, size and
colour over a noisy textured background. Images are rendered analytically at any resolution, so a
larger input really shows finer edges (resolution scaling means something), and each index is
deterministic given the seed.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

__all__ = ["CLASSES", "Shapes", "image_folder"]

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


def image_folder(path: str, size: int, train: bool) -> Dataset[tuple[torch.Tensor, int]]:
    """``torchvision.datasets.ImageFolder`` with compscale's transforms for ``size``."""
    from torchvision.datasets import ImageFolder

    from compscale.transforms import eval_transform, train_transform

    return ImageFolder(path, transform=train_transform(size) if train else eval_transform(size))
