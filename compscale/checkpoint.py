"""Save a scaled model as what rebuilds it: the base model's name, the multipliers, the weights.

``load`` rebuilds the architecture with :func:`compscale.scale` on a fresh base model and loads the
weights (a model grown with ``init="preserve"`` has the same architecture as a fresh one; its ``scaling.init`` is
restored), so a checkpoint survives code changes that ``torch.save(model)`` (a pickle of classes) would not.

Example:
    >>> scaled = compscale.scale(torchvision.models.resnet18(), phi=1)   # doctest: +SKIP
    >>> save(scaled, "r18-phi1.pt", model="resnet18")                    # doctest: +SKIP
    >>> load("r18-phi1.pt").scaling.input_size                           # doctest: +SKIP
    (256, 256)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from compscale.errors import CompscaleError
from compscale.models import load_model

__all__ = ["check_architecture", "load", "load_model", "save", "scale_options"]

FORMAT = "compscale/1"


def scale_options(scaled: nn.Module) -> dict[str, Any]:
    """The ``compscale.scale`` keyword arguments that rebuild ``scaled`` from its base model."""
    plan = getattr(scaled, "scaling", None)
    if plan is None:
        raise CompscaleError(f"{type(scaled).__name__} carries no `scaling` plan", "save a model from compscale.scale.")
    m = plan.multipliers
    if isinstance(plan.options, dict):  # a model pickled by compscale before ScaleOptions
        opts = plan.options
        options = {"input_size": list(plan.base_input_size), "resolution_divisor": opts.get("resolution_divisor", 8),
                   "fixed": opts.get("fixed", []), "stages": opts.get("stages")}
    else:
        options = plan.options.checkpoint(type(scaled).__name__)
    return {"depth": m.depth, "width": m.width, "resolution": m.resolution, **options, "init": plan.init}


def save(scaled: nn.Module, path: str | os.PathLike[str], model: str, **extra: Any) -> None:
    """Write ``scaled``'s weights with what rebuilds it (``model`` is the base model's spec for :func:`load_model`)."""
    torch.save({"format": FORMAT, "model": model, "scale": scale_options(scaled), "state_dict": scaled.state_dict(),
                **extra}, path)


def load(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> nn.Module:
    """Rebuild the scaled model saved at ``path`` and load its weights."""
    from compscale.api import scale

    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CompscaleError(f"{path} is not a compscale checkpoint", "write one with compscale.checkpoint.save.")
    options = dict(ckpt["scale"])
    init = options.pop("init", "fresh")  # the weights come from the checkpoint: the architecture is built fresh
    scaled = scale(load_model(ckpt["model"]), **options)
    check_architecture(scaled, ckpt["state_dict"], f"{path} ({ckpt['model']})")
    scaled.load_state_dict(ckpt["state_dict"])
    scaled.scaling.init = init  # type: ignore[union-attr]
    return scaled


def check_architecture(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``CompscaleError`` naming what differs when ``model``'s parameters and buffers are not ``state_dict``'s (their
    names and shapes): the base model's code changed since the checkpoint was written."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, extra = sorted(saved.keys() - have.keys()), sorted(have.keys() - saved.keys())
    shapes = [f"{k} {saved[k]} saved, {have[k]} rebuilt" for k in saved if k in have and saved[k] != have[k]]
    if not (missing or extra or shapes):
        return
    parts = [f"{len(items)} {what}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
             for what, items in (("saved weights the rebuilt model lacks", missing),
                                 ("rebuilt weights the checkpoint lacks", extra), ("shapes that differ", shapes))
             if items]
    raise CompscaleError(
        f"the model rebuilt for {source} is not the one saved: {'; '.join(parts)}",
        "the base model's code changed since the checkpoint was written; rebuild with the code it was saved with, "
        "or load the weights that still fit with model.load_state_dict(torch.load(path)['state_dict'], strict=False).",
    )
