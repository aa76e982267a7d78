"""How many parameters a scaled network may have before ``scale`` refuses to build it.

``scale(resnet50(), phi=20)`` would allocate 37.5 G parameters (150 GB in float32) and run the machine out of
memory after minutes; the plan knows its size in a second. The default budget is what the model's device has
free, counted in the model's parameter dtype, halved for the copies a rewrite holds at once.

Example:
    >>> import torch
    >>> available_params(torch.device("meta"), torch.float32) is None   # a meta model allocates nothing
    True
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_bytes", "available_params", "params_limit", "rough_params"]


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` in bytes (``None`` when unknown or irrelevant, as on the meta device)."""
    if device.type == "meta":
        return None
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def available_params(device: torch.device, dtype: torch.dtype) -> int | None:
    """The default ``max_params``: half the free memory of ``device``, in parameters of ``dtype``."""
    free = available_bytes(device)
    if free is None:
        return None
    return free // (2 * torch.empty((), dtype=dtype).element_size())


def params_limit(model: torch.nn.Module, max_params: int | None = None) -> int | None:
    """The most parameters a network scaled from ``model`` may have: ``max_params`` when given, else
    :func:`available_params` on the model's device in its dtype (``None``: no limit, as for a model without weights
    or on the meta device)."""
    if max_params is not None:
        return int(max_params)
    first = next(model.parameters(), None)
    return available_params(first.device, first.dtype) if first is not None else None


def rough_params(params: int, depth: float, width: float) -> float:
    """A quick over-estimate of the scaled size: every parameter repeated with depth and widened on both sides.

    Only decides whether the exact count (a plan, about a second) is worth computing.
    """
    return params * max(1.0, depth) * max(1.0, width) ** 2
