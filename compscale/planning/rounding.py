"""Rounding, as every reference implementation does it (see docs/choosing.md).

Kept in one module so that a research user can read, and swap, every rounding decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["dense_repeats", "make_divisible", "repeats", "round_resolution"]


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


def dense_repeats(costs: Sequence[float], depth: float) -> int:
    """Layers of a dense (growing) stage at depth multiplier ``depth``: its cost, not its count, times ``depth``.

    Each layer of a dense block reads every channel before it, so layer ``k`` costs ``costs[0] + k * step``
    and ``ceil(n * depth)`` layers would cost about ``depth**2`` times the stage. The compound rule rests on
    depth multiplying cost by ``depth``; this is the fewest layers whose cost (extrapolated linearly from
    ``costs``, the MACs of the stage's layers) reaches ``depth`` times the stage's: the ``ceil`` of
    :func:`repeats` applied to cost. For layers of equal cost it *is* :func:`repeats`.

    >>> dense_repeats([10, 10, 10], 1.44), dense_repeats([10, 20, 30], 1.44), dense_repeats([10, 20, 30], 0.5)
    (5, 4, 2)
    >>> dense_repeats([30, 20, 10], 3.0), dense_repeats([0, 0], 2.0)  # never cheaper than the last; no cost: count
    (15, 4)
    """
    n = len(costs)
    if sum(costs) <= 0:  # no measured cost (layers compscale does not look into): count layers
        return repeats(n, depth)
    step = max(0.0, (costs[-1] - costs[0]) / (n - 1)) if n > 1 else 0.0  # never extrapolate cheaper layers
    target = depth * sum(costs) * (1 - 1e-9)
    count, total = 0, 0.0
    while total < target or count == 0:
        total += costs[count] if count < n else costs[-1] + (count - n + 1) * step
        count += 1
    return count


def round_resolution(size: int, multiplier: float, divisor: int = 8, fine: bool = False) -> int:
    """``size * multiplier`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``); with ``fine``, a
    smaller one for small sizes.

    Images (``fine=False``) keep the references' rounding at every size (224 x 1.15**2 -> 296). ``fine`` is for
    inputs of another rank (volumes, waveforms), which no reference rounds: from 128 up (16 x the default divisor)
    the divisor is the one given; below, a multiple of 8 is a step of 6-25% of the size, as large as a step of phi
    (x1.098 per side in 3-D), so neighbouring phis would round to one size. There the divisor is halved (while even)
    until it is at most 1/16 of the size. From 16 up, rounding then moves a size by at most 1/32 of it (with the
    default divisor), so two sizes more than 6.5% apart never round to the same one. The result is at least the
    divisor used.

    >>> round_resolution(224, 1.15 ** 2), round_resolution(32, 1.15 ** (2 / 3)), round_resolution(32, 1.15 ** (4 / 3))
    (296, 32, 40)
    >>> round_resolution(32, 1.15 ** (2 / 3), fine=True), round_resolution(32, 1.15 ** (4 / 3), fine=True)
    (36, 38)
    """
    value = size * multiplier
    while fine and value < _SMALL and divisor % 2 == 0 and divisor > value / 16:
        divisor //= 2
    return max(divisor, round(value / divisor) * divisor)


_SMALL = 128  # sizes from here up keep the given divisor (16 x the references' 8)
