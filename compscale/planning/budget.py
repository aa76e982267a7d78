"""The limits of what compscale builds, stated once: how many parameters a scaled network may have before anything is
built (``max_params``, by default half the free memory), the range of phi, the smallest width multiplier and the
largest resolution divisor. ``scale``, every search (``target_macs``, ``target_acts``, ``target_latency``), the planner
and the command line check them here.

``scale(resnet50(), phi=20)`` would allocate 37.5 G parameters (150 GB in float32) and run the machine out of
memory after minutes; the plan knows its size in a second. The default budget is what the model's device has
free, counted in the model's parameter dtype, halved for the copies a rewrite holds at once.

Example:
    >>> import torch
    >>> available_params(torch.device("meta"), torch.float32) is None   # a meta model allocates nothing
    True
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import torch

from compscale.errors import TooLargeError

__all__ = ["MULTIPLIER_LIMIT", "PHI_LIMIT", "WIDTH_FLOOR", "available_bytes", "available_params", "check_divisor",
           "check_max_params", "check_multipliers", "check_phi", "check_size", "check_width", "params_limit",
           "rough_params"]

PHI_LIMIT = 20.0
"""The largest |phi| accepted: compound scaling at phi=20 is 38x deeper, 6.7x wider and 16x the resolution
(resnet50: 37.5 G parameters); searches bracket phi within it."""

MULTIPLIER_LIMIT = 1e9
"""The largest depth, width or resolution multiplier accepted, given or derived from phi (the ``"depth"`` strategy at
phi=20 is 2**20, a million): beyond it block counts, widths and sizes overflow before any size check could refuse
them."""

WIDTH_FLOOR = 8
"""The channels a group keeps at the least (``make_divisible``'s floor). A width multiplier that takes the widest
group below half of it collapses every group to the floor: refused, as no network was asked for."""


def check_phi(phi: float) -> float:
    """``phi``, refused outside ``[-PHI_LIMIT, PHI_LIMIT]`` with a ``ValueError`` naming it."""
    if not -PHI_LIMIT <= phi <= PHI_LIMIT:
        raise ValueError(f"phi={phi:g} is out of range: give a phi between about -{PHI_LIMIT:g} and {PHI_LIMIT:g} "
                         f"(compound scaling at phi={PHI_LIMIT:g} is already {1.2 ** PHI_LIMIT:.0f}x deeper and "
                         f"{1.15 ** PHI_LIMIT:.0f}x the resolution)")
    return phi


def check_multipliers(multipliers: dict[str, float], source: str | None = None) -> None:
    """Refuse a depth, width or resolution multiplier (by name) above :data:`MULTIPLIER_LIMIT`; ``source`` says where
    it came from when not given as itself (``"phi=2 by strategy 'compound'"``)."""
    for name, value in multipliers.items():
        if value > MULTIPLIER_LIMIT:
            what = f"{source} takes {name} to x{value:.3g}," if source else f"{name}={value:g} is"
            raise ValueError(f"{what} more than compscale builds (at most x{MULTIPLIER_LIMIT:.0e} per dimension); "
                             f"give a smaller {name} multiplier{' or phi' if source else ''}")


def check_width(width: float, widest: int, floor: int = WIDTH_FLOOR) -> None:
    """Refuse a ``width`` multiplier that takes the widest of the base's channel groups (``widest`` channels) below
    half the rounding floor: every group would become ``floor`` channels, whatever ``width`` was."""
    if widest and width * widest < floor / 2:
        raise ValueError(
            f"width={width:g} takes the widest channel group ({widest} channels) to {width * widest:.3g} channels: "
            f"every group would be rounded up to the {floor}-channel floor; give a width of at least "
            f"{floor / 2 / widest:.3g}")


def check_divisor(divisor: int, input_size: Sequence[int]) -> None:
    """Refuse a ``resolution_divisor`` larger than the input size (every scaled size would be the divisor)."""
    if input_size and divisor > min(input_size):
        raise ValueError(f"resolution_divisor={divisor} is larger than the input size {tuple(input_size)}: every "
                         f"scaled size would be a multiple of {divisor}; give a divisor of at most {min(input_size)} "
                         "(8 or 32 are usual)")


def check_max_params(max_params: object) -> int | None:
    """``max_params`` as an int (``None``: the default budget); a non-integer or a count below 1 raises."""
    if max_params is None:
        return None
    if isinstance(max_params, bool) or not isinstance(max_params, numbers.Integral):
        raise TypeError(f"max_params must be an int (a parameter count) or None, got {type(max_params).__name__} "
                        f"{max_params!r}")
    if max_params < 1:
        raise ValueError(f"max_params must be at least 1, got {max_params}")
    return int(max_params)


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
        return check_max_params(max_params)
    first = next(model.parameters(), None)
    return available_params(first.device, first.dtype) if first is not None else None


def rough_params(params: int, depth: float, width: float) -> float:
    """A quick over-estimate of the scaled size: every parameter repeated with depth and widened on both sides.

    Only decides whether the exact count (a plan, about a second) is worth computing.
    """
    return params * max(1.0, depth) * max(1.0, width) ** 2


def check_size(name: str, plan: object, max_params: int | None) -> None:
    """Raise ``TooLargeError`` when ``plan`` (a :class:`~compscale.planning.plan.ScalingPlan`) has more than
    ``max_params`` parameters (``None``: no limit: a plan allocates nothing)."""
    params = getattr(plan, "params", None)
    if max_params is None or params is None or params <= max_params:
        return
    m = getattr(plan, "multipliers", None)
    how = f" scaled by depth x{m.depth:.4g}, width x{m.width:.4g}" if m is not None else ""
    raise TooLargeError(f"{name}{how} would have {params / 1e9:.2f} G parameters, more than max_params={max_params:,}",
                        "scale by a smaller phi, target or multipliers; or pass a larger max_params= if the memory "
                        "is there.")
