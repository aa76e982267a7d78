"""Models by name, for the command line and checkpoints: torchvision names, ``timm/NAME``, ``package.module:callable``.

Example:
    >>> load_model("resnet18").fc.out_features
    1000
    >>> list_models("resnet1*")[:2]
    ['resnet101', 'resnet152']
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any, Literal

from torch import nn

from compscale.errors import CompscaleError

__all__ = ["Library", "list_models", "load_model", "suggest", "torchvision_model"]

Library = Literal["torchvision", "timm"]

TIMM_PREFIX = "timm/"


def _torchvision_names() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models())


def _timm_names() -> list[str]:
    if importlib.util.find_spec("timm") is None:
        return []
    import timm  # type: ignore[import-not-found, unused-ignore]

    return [TIMM_PREFIX + n for n in timm.list_models()]


def list_models(pattern: str | None = None, library: Library | None = None) -> list[str]:
    """Model names the command line accepts: torchvision's, then timm's as ``timm/NAME`` (when timm is installed).

    Args:
        pattern: a shell pattern (``resnet*``), or a plain substring when it has no wildcard.
        library: only this library's names.
    """
    names: list[str] = []
    if library in (None, "torchvision"):
        names += _torchvision_names()
    if library in (None, "timm"):
        names += _timm_names()
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if any(fnmatch.fnmatchcase(m, glob) for m in (n, n.removeprefix(TIMM_PREFIX)))]
    return names


def suggest(spec: str) -> list[str]:
    """Up to three known model names close to ``spec`` (for "did you mean")."""
    names = _timm_names() if spec.startswith(TIMM_PREFIX) else _torchvision_names()
    return difflib.get_close_matches(spec, names, n=3, cutoff=0.6)


def _unknown(spec: str) -> CompscaleError:
    close = suggest(spec)
    did_you_mean = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return CompscaleError(
        f"unknown model {spec!r}{did_you_mean}",
        "`compscale models` lists the names; or give package.module:callable for your own constructor.",
    )


def _import_here(module_name: str) -> Any:
    """Import ``module_name`` as ``python -c`` would: the current folder first (an installed console script does not
    put it on ``sys.path``), for this import only."""
    import os
    import sys

    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    finally:
        if added and here in sys.path:
            sys.path.remove(here)


def load_model(spec: str) -> nn.Module:
    """Build a model with random weights from a torchvision name (``resnet50``), ``timm/NAME``, or
    ``package.module:callable`` returning an ``nn.Module``.

    Raises:
        CompscaleError: the name is unknown (the message suggests close names), or the callable cannot be imported.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory: Callable[[], Any] = getattr(_import_here(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise CompscaleError(f"cannot load {spec!r}: {e}", "give package.module:callable, importable here.") from e
        model = factory()
    elif spec.startswith(TIMM_PREFIX):
        if importlib.util.find_spec("timm") is None:
            raise CompscaleError(f"{spec!r} needs timm, which is not installed", "pip install timm")
        import timm

        if spec not in _timm_names():
            raise _unknown(spec)
        model = timm.create_model(spec.removeprefix(TIMM_PREFIX), pretrained=False)
    else:
        if spec not in _torchvision_names():
            raise _unknown(spec)
        model = torchvision_model(spec)
    if not isinstance(model, nn.Module):
        raise CompscaleError(f"{spec!r} returned {type(model).__name__}, not an nn.Module",
                             "the callable must return a torch.nn.Module.")
    return model


def torchvision_model(name: str) -> nn.Module:
    """torchvision's ``name`` with random weights, its backbone's too (a detector's or segmenter's builder would
    otherwise download the backbone's ImageNet weights)."""
    import inspect

    import torchvision.models

    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    return builder(weights=None, **kwargs)
