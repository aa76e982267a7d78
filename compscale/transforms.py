"""Input transforms for a scaled network's input size, built from ``torchvision.transforms.v2``.

They follow torchvision's ImageNet classification presets: evaluation resizes to ``size / 0.875``
and centre-crops ``size`` (224 <- 256); training takes a ``RandomResizedCrop(size)`` and a horizontal
flip. Both end in a float tensor normalised with the ImageNet mean and std.

Example:
    >>> eval_transform(296)  # doctest: +ELLIPSIS
    Compose(...Resize(size=[338]...CenterCrop(size=(296, 296))...)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from compscale.planning.plan import as_hw

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(
    size: int | Sequence[int],
    crop_ratio: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Resize the shorter side to ``size / crop_ratio``, centre-crop ``size``, normalise."""
    h, w = as_hw(size)
    return v2.Compose([
        v2.ToImage(),
        v2.Resize([round(min(h, w) / crop_ratio)], antialias=True),
        v2.CenterCrop((h, w)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def train_transform(
    size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """``RandomResizedCrop(size)``, horizontal flip, normalise."""
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(as_hw(size), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])
