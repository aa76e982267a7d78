"""The scaling plan: what ``scale`` decided, as plain data carried by the result (``result.scaling``).

The rewrite passes consume it (repeats per stage, width per channel group) and never see alpha,
beta, gamma or phi.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

from compscale.planning.rounding import round_resolution

__all__ = ["GroupPlan", "Multipliers", "ScalingPlan", "StagePlan", "as_hw", "as_size", "format_size", "plan_input_size",
           "resolve_multipliers"]


@dataclasses.dataclass(frozen=True)
class Multipliers:
    """``depth``, ``width`` and ``resolution`` multipliers (and the ``phi`` they came from, if any)."""

    depth: float
    width: float
    resolution: float
    phi: float | None = None


@dataclasses.dataclass(frozen=True)
class StagePlan:
    name: str
    blocks_before: int
    blocks_after: int
    in_channels: int
    out_channels: int
    stride: int
    new_blocks: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    id: int
    before: int
    after: int
    rule: str
    members: tuple[str, ...]


@dataclasses.dataclass
class ScalingPlan:
    """What was scaled and how; ``input_size`` is the ``(H, W)`` the scaled network is meant to run at (every
    dim after the channels, for inputs of another rank: ``(L,)``, ``(T, H, W)``)."""

    multipliers: Multipliers
    base_input_size: tuple[int, ...]
    input_size: tuple[int, ...]
    stages: list[StagePlan] = dataclasses.field(default_factory=list)
    groups: list[GroupPlan] = dataclasses.field(default_factory=list)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # scale()'s other arguments, for rebuilding
    macs: int | None = None  # estimated by the planner (compscale.plan); None on a scaled model
    params: int | None = None
    base_macs: int | None = None
    base_params: int | None = None
    init: str = "fresh"  # how resized layers and new blocks were initialised: "fresh" or "preserve"
    init_error: float | None = None  # init="preserve": measured output difference / the output's largest value
    inexact: dict[str, str] = dataclasses.field(default_factory=dict)  # init="preserve": what is not exact, why

    @property
    def depth(self) -> float:
        return self.multipliers.depth

    @property
    def width(self) -> float:
        return self.multipliers.width

    @property
    def resolution(self) -> float:
        return self.multipliers.resolution

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def eval_transform(self, crop_ratio: float = 0.875) -> Any:
        """The evaluation transform for :attr:`input_size` (``torchvision.transforms.v2``, ImageNet preset)."""
        from compscale.transforms import eval_transform

        return eval_transform(self.input_size, crop_ratio)

    def train_transform(self) -> Any:
        """The training transform for :attr:`input_size` (random resized crop, flip, normalise)."""
        from compscale.transforms import train_transform

        return train_transform(self.input_size)

    def __str__(self) -> str:
        m = self.multipliers
        phi = f"phi={m.phi:g}: " if m.phi is not None else ""
        lines = [
            f"{phi}depth x{m.depth:.4g}, width x{m.width:.4g}, resolution x{m.resolution:.4g}",
            f"input size {format_size(self.base_input_size)} -> {format_size(self.input_size)}",
        ]
        if self.init == "preserve":
            err = f", outputs within {self.init_error:.2g} of the base's" if self.init_error is not None else ""
            lines.append(f"init: preserve (grown from the base's weights{err}; "
                         f"{len(self.inexact)} layers or blocks not exact)")
        if self.macs is not None and self.base_macs and self.params is not None and self.base_params:
            lines.append(f"MACs {self.base_macs / 1e9:.3f} G -> {self.macs / 1e9:.3f} G "
                         f"(x{self.macs / self.base_macs:.2f}), params {self.base_params / 1e6:.2f} M -> "
                         f"{self.params / 1e6:.2f} M (x{self.params / self.base_params:.2f})")
        if self.stages:
            lines.append(_table(
                ("stage", "blocks", "in -> out ch (base)", "stride"),
                [(s.name, f"{s.blocks_before} -> {s.blocks_after}", f"{s.in_channels} -> {s.out_channels}",
                  str(s.stride)) for s in self.stages],
            ))
        changed: dict[tuple[int, int, str], list[GroupPlan]] = {}
        for g in self.groups:
            if g.before != g.after:
                changed.setdefault((g.before, g.after, g.rule), []).append(g)
        if changed:
            lines.append(_table(
                ("width", "rule", "groups", "e.g."),
                [(f"{b} -> {a}", rule, str(len(gs)), gs[0].members[0] if gs[0].members else "")
                 for (b, a, rule), gs in sorted(changed.items())],
            ))
            lines.append(_RULES_LEGEND)
        return "\n".join(lines)


_RULES_LEGEND = (
    "rule: how the new width was chosen: independent = make_divisible(width x w); expansion = k x the block's\n"
    "      input width; squeeze = an SE bottleneck keeping its ratio; tied = k x another group's width\n"
    "groups: how many channel groups (channels that residual adds or depthwise convs tie) changed so;\n"
    "e.g.: one layer of them"
)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    all_rows = [header, *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in all_rows)


def _check_multiplier(name: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def _power(name: str, base: float, phi: float) -> float:
    """``base ** phi``, refused when it overflows to infinity or underflows to zero."""
    try:
        value = base**phi
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value <= 0 or value < 1e-12:
        raise ValueError(f"phi={phi:g} takes {name} to {base:g}**{phi:g} = {value:g}, which no network can have; "
                         f"give a phi between about -20 and 20")
    return value


def resolve_multipliers(
    phi: float | None,
    alpha: float,
    beta: float,
    gamma: float,
    depth: float | None,
    width: float | None,
    resolution: float | None,
) -> Multipliers:
    """``d = alpha**phi``, ``w = beta**phi``, ``r = gamma**phi``; explicit ``depth``/``width``/``resolution`` win.

    Raises:
        TypeError: a multiplier that is not a real number.
        ValueError: a multiplier that is zero, negative, NaN or infinite.
    """
    a, b, g = (_check_multiplier(n, v) for n, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)))
    p = None if phi is None else _check_multiplier("phi", phi, positive=False)

    def pick(name: str, explicit: float | None, base: float) -> float:
        if explicit is not None:
            return _check_multiplier(name, explicit)
        return _power(name, base, p) if p is not None else 1.0

    return Multipliers(pick("depth", depth, a), pick("width", width, b), pick("resolution", resolution, g), p)


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from one int (a square) or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def as_size(size: int | Sequence[int], rank: int = 2) -> tuple[int, ...]:
    """The spatial size of an input (every dim after the channels): one int is a square (of ``rank`` dims),
    a sequence is taken as it is (``(16000,)`` for audio, ``(16, 112, 112)`` for video)."""
    if isinstance(size, int):
        return (size,) * rank
    return tuple(int(s) for s in size)


def format_size(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


def plan_input_size(base: tuple[int, ...], resolution: float, divisor: int = 8) -> tuple[int, ...]:
    """The new spatial size: each dim ``base * r`` rounded to a multiple of ``divisor`` (unchanged when r == 1)."""
    if resolution == 1.0:
        return base
    return tuple(round_resolution(s, resolution, divisor) for s in base)
