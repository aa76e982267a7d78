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
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from compscale.arguments import as_hw

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "image_processor", "train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(size: int | Sequence[int], crop_ratio: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Resize the shorter side to ``size / crop_ratio``, centre-crop ``size``, normalise."""
    h, w = as_hw(size)
    return _compose([v2.Resize([round(min(h, w) / crop_ratio)], antialias=True), v2.CenterCrop((h, w))], mean, std)


def train_transform(size: int | Sequence[int], mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """``RandomResizedCrop(size)``, horizontal flip, normalise."""
    return _compose([v2.RandomResizedCrop(as_hw(size), antialias=True), v2.RandomHorizontalFlip()], mean, std)


def _compose(steps: list[Any], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """``steps`` on an image, then its conversion to a float tensor, normalised with ``mean`` and ``std``."""
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])


def image_processor(scaled: nn.Module, processor: Any = None) -> Any:
    """The Hugging Face image processor for ``scaled``'s input size: a copy of ``processor`` (by default, the one
    transformers pairs with the model's ``config.model_type``) whose pixels are ``scaled.scaling.input_size``: the
    crop is that size, and the resize keeps its ratio to the crop (or is that size, where the processor does not
    crop).

    Example:
        >>> r = compscale.scale(transformers.ResNetForImageClassification(config), phi=1)   # doctest: +SKIP
        >>> compscale.image_processor(r)(image, return_tensors="pt")["pixel_values"].shape  # doctest: +SKIP
        torch.Size([1, 3, 256, 256])
    """
    from compscale.errors import CompscaleError

    plan = getattr(scaled, "scaling", None)
    if plan is None or len(plan.input_size) != 2:
        raise CompscaleError(f"{type(scaled).__name__} carries no 2-d `scaling` plan",
                             "pass a model returned by compscale.scale for images.")
    if processor is None:
        processor = _default_processor(scaled)
    h, w = plan.input_size
    cfg = processor.to_dict()
    size, crop = dict(cfg.get("size") or {}), dict(cfg.get("crop_size") or {})
    crop = {k: v for k, v in crop.items() if v is not None}
    cropping = bool(crop.get("height")) and cfg.get("do_center_crop", True) is not False  # else size is the input
    if size.get("height") and size.get("width"):
        ratio = (size["height"] / crop["height"], size["width"] / crop["width"]) if cropping else (1, 1)
        size.update(height=round(h * ratio[0]), width=round(w * ratio[1]))
    elif size.get("shortest_edge"):
        ratio_edge = size["shortest_edge"] / min(crop["height"], crop["width"]) if cropping else 1
        size["shortest_edge"] = round(min(h, w) * ratio_edge)
    if crop.get("height"):
        crop.update(height=h, width=w)
    cfg.update(size={k: v for k, v in size.items() if v is not None}, **({"crop_size": crop} if crop else {}))
    for key in ("image_processor_type", "processor_class", "_processor_class"):
        cfg.pop(key, None)
    return type(processor).from_dict(cfg)


def _default_processor(scaled: nn.Module) -> Any:
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    from compscale.errors import CompscaleError

    model_type = getattr(getattr(scaled, "config", None), "model_type", None)
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) if model_type else None
    if not names:
        raise CompscaleError(f"{type(scaled).__name__} is no Hugging Face model with an image processor",
                             "pass processor=, or use scaled.scaling.eval_transform() (torchvision).")
    import transformers

    name = names.get("torchvision") or next(iter(names.values())) if isinstance(names, dict) else names
    return getattr(transformers, name)()
