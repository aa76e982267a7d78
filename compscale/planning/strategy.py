"""Scaling strategies: how one coefficient ``phi`` becomes depth, width and resolution multipliers.

* :class:`Compound` (``"compound"``, the default): EfficientNet's ``d = alpha**phi``, ``w = beta**phi``,
  ``r = gamma**phi``; with ``alpha * beta**2 * gamma**2 ~ 2``, MACs grow about ``2**phi``.
* :class:`Shares` (``"fast"``, ``"dwr"``, ``"depth"``, ``"width"``, ``"resolution"`` or any pycls type string such as
  ``"d1_w8_r1"``): Dollar et al.'s rule ("Fast and Accurate Model Scaling", 2021, pycls ``scaling_factors``). Of a
  MACs factor ``s = 2**phi``, dimension ``x`` takes the share ``weight(x) / sum(weights)``: ``d = s**share(d)``,
  ``w = s**(share(w) / 2)``, ``r = s**(share(r) / 2)``, so that ``d * w**2 * r**2 == s``. ``"fast"`` is their dWr
  with ``alpha=0.8`` (``d = s**0.1``, ``w = s**0.4``, ``r = s**0.05``): width-dominant, so activations
  (``d * w * r**2``) grow about ``s**0.6`` instead of compound's ``s**0.8`` (``log2(1.2 * 1.1 * 1.15**2)`` per
  phi), and the network runs faster at equal MACs.

So ``phi`` means about ``2**phi`` times the MACs under every strategy, and a table of strategies over one range of
``phi`` compares them at (roughly) equal MACs; ``target_macs=`` lands on a budget exactly. Strategies state ``r`` for
images (two spatial dims); for an input of ``k`` spatial dims :func:`compscale.planning.plan.resolve_multipliers`
makes it ``r ** (2 / k)`` per dim, so the law holds for volumes and waveforms too.

Example:
    >>> fast = get_strategy("fast")
    >>> [round(m, 3) for m in fast.multipliers(2)]
    [1.149, 1.741, 1.072]
    >>> get_strategy("d1_w8_r1") == fast
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Protocol, runtime_checkable

from compscale.arguments import check_number

__all__ = ["Compound", "Shares", "Strategy", "StrategyLike", "check_multiplier", "fast", "get_strategy",
           "list_strategies"]


def check_multiplier(name: str, value: object, *, positive: bool = True) -> float:
    """``value`` as a float; a bool, a non-number, NaN, infinity (or, when ``positive``, a value <= 0) raises
    (:func:`compscale.arguments.check_number`).

    Raises:
        TypeError: not a real number.
        ValueError: not finite, or not > 0.
    """
    return check_number(value, name, positive=positive)


def _power(name: str, base: float, phi: float, exponent: float = 1.0) -> float:
    """``base ** (phi * exponent)``, refused when it overflows to infinity or underflows to zero."""
    try:
        value = base ** (phi * exponent)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value < 1e-12:
        raise ValueError(f"phi={phi:g} takes {name} to {value:g}, which no network can have; "
                         f"give a phi between about -20 and 20")
    return value


@runtime_checkable
class Strategy(Protocol):
    """Maps ``phi`` to ``(depth, width, resolution)`` multipliers; ``name`` is how plans and tables show it."""

    @property
    def name(self) -> str: ...

    def multipliers(self, phi: float) -> tuple[float, float, float]: ...


StrategyLike = str | Strategy


@dataclasses.dataclass(frozen=True)
class Compound:
    """EfficientNet's compound rule: ``d = alpha**phi``, ``w = beta**phi``, ``r = gamma**phi``."""

    alpha: float = 1.2
    beta: float = 1.1
    gamma: float = 1.15

    @property
    def name(self) -> str:
        if (self.alpha, self.beta, self.gamma) == (1.2, 1.1, 1.15):
            return "compound"
        return f"compound(alpha={self.alpha:g}, beta={self.beta:g}, gamma={self.gamma:g})"

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            check_multiplier(name, getattr(self, name))

    def multipliers(self, phi: float) -> tuple[float, float, float]:
        return (_power("depth", self.alpha, phi), _power("width", self.beta, phi),
                _power("resolution", self.gamma, phi))


@dataclasses.dataclass(frozen=True)
class Shares:
    """pycls's rule: of a MACs factor ``s = 2**phi``, depth, width and resolution take shares by weight.

    ``Shares(1, 8, 1)`` is pycls's ``d1_w8_r1`` (the paper's "fast" dWr, alpha = 0.8); ``Shares(1, 0, 0)`` scales
    depth alone. ``label`` names it in plans and tables.
    """

    depth: float
    width: float
    resolution: float
    label: str = ""

    def __post_init__(self) -> None:
        weights = (self.depth, self.width, self.resolution)
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) for w in weights):
            raise TypeError(f"strategy weights must be numbers, got {weights!r}")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"strategy weights must be finite, >= 0 and not all 0, got {weights!r}")

    @property
    def name(self) -> str:
        return self.label or f"d{self.depth:g}_w{self.width:g}_r{self.resolution:g}"

    def exponents(self) -> tuple[float, float, float]:
        """``(e_d, e_w, e_r)`` with ``d = s**e_d`` etc.; ``e_d + 2 e_w + 2 e_r == 1``."""
        total = self.depth + self.width + self.resolution
        return self.depth / total, self.width / total / 2, self.resolution / total / 2

    def multipliers(self, phi: float) -> tuple[float, float, float]:
        e_d, e_w, e_r = self.exponents()
        return (_power("depth", 2.0, phi, e_d), _power("width", 2.0, phi, e_w), _power("resolution", 2.0, phi, e_r))

    def __eq__(self, other: object) -> bool:  # the label is a name, not part of the rule
        return isinstance(other, Shares) and _rounded(self.exponents()) == _rounded(other.exponents())

    def __hash__(self) -> int:
        return hash(_rounded(self.exponents()))


def _rounded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 12) for v in values)


def fast(alpha: float = 0.8) -> Shares:
    """Dollar et al.'s fast compound scaling dWr: width takes ``alpha`` of the MACs factor, depth and resolution
    share the rest (``d = s**((1 - alpha) / 2)``, ``w = s**(alpha / 2)``, ``r = s**((1 - alpha) / 4)``)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"fast(alpha=...) must be a number, got {type(alpha).__name__}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"fast(alpha=...) is width's share of the MACs factor, between 0 and 1; got {alpha!r}")
    label = "fast" if alpha == 0.8 else f"fast(alpha={alpha:g})"
    return Shares((1 - alpha) / 2, alpha, (1 - alpha) / 2, label)


_NAMED: dict[str, Strategy] = {
    "compound": Compound(),
    "fast": fast(),
    "depth": Shares(1, 0, 0, "depth"),
    "width": Shares(0, 1, 0, "width"),
    "resolution": Shares(0, 0, 1, "resolution"),
}
_TYPE = re.compile(r"^(?:[dwr]\d*(?:\.\d+)?)(?:_[dwr]\d*(?:\.\d+)?)*$|^[dwr]+$")


def get_strategy(strategy: StrategyLike) -> Strategy:
    """A strategy by name (:func:`list_strategies`), by pycls type string (``"dwr"``, ``"d1_w8_r1"``), or as given.

    Raises:
        TypeError: neither a string nor a :class:`Strategy`.
        ValueError: a name that is neither.
    """
    if isinstance(strategy, Strategy) and not isinstance(strategy, str):
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a name such as 'compound' or 'fast', or a Strategy; got "
                        f"{type(strategy).__name__}")
    if strategy in _NAMED:
        return _NAMED[strategy]
    if _TYPE.match(strategy):
        return _parse_type(strategy)
    raise ValueError(f"unknown strategy {strategy!r}: give one of {', '.join(_NAMED)}, a pycls type string "
                     "('dwr', 'd1_w8_r1'), or compscale.planning.strategy.Compound(...)/Shares(...)")


def _parse_type(text: str) -> Shares:
    """pycls's type strings: ``"dw"`` weighs d and w equally; ``"d1_w8_r1"`` gives each weight."""
    if "_" not in text and not any(c.isdigit() for c in text):
        weights = {c: 1.0 for c in text}
    else:
        weights = {part[0]: float(part[1:] or 1) for part in text.split("_")}
    return Shares(weights.get("d", 0.0), weights.get("w", 0.0), weights.get("r", 0.0), text)


def list_strategies() -> list[str]:
    """The strategies known by name."""
    return list(_NAMED)
