"""Rounding, as every reference implementation does it (see docs/choosing.md).

Kept in one module so that a research user can read, and swap, every rounding decision.
"""

from __future__ import annotations

import math

__all__ = ["make_divisible", "repeats", "round_resolution"]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never below ``min_value`` nor 10% below ``v``.

    This is the rounding of the TF MobileNet/EfficientNet reference, torchvision's ``_make_divisible``
    and timm's ``make_divisible``.

    >>> make_divisible(32 * 1.4), make_divisible(64 * 1.3), make_divisible(18)
    (48, 80, 24)
    """
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:  # never round down by more than 10%
        new += divisor
    return new


def repeats(n: int, depth: float) -> int:
    """Blocks of a stage of ``n`` blocks at depth multiplier ``depth``: ``ceil(n * depth)``, as the references."""
    return math.ceil(n * depth)


def round_resolution(size: int, multiplier: float, divisor: int = 8) -> int:
    """``size * multiplier`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, round(size * multiplier / divisor) * divisor)
