"""The scaling plan: what ``scale`` decided, as plain data carried by the result (``result.scaling``).

The rewrite passes consume it (repeats per stage, width per channel group) and never see alpha,
beta, gamma or phi.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from compscale.arguments import INPUT_LIMIT, check_input_size
from compscale.planning.budget import check_multipliers, check_phi
from compscale.planning.rounding import round_resolution
from compscale.planning.strategy import Compound, StrategyLike, check_multiplier, get_strategy

__all__ = ["GroupPlan", "Multipliers", "ScalingPlan", "StagePlan", "as_size", "format_size", "plan_input_size",
           "resolve_multipliers"]


@dataclasses.dataclass(frozen=True)
class Multipliers:
    """``depth``, ``width`` and ``resolution`` multipliers (and the ``phi`` they came from, if any)."""

    depth: float
    width: float
    resolution: float
    phi: float | None = None
    strategy: str | None = None  # the rule that turned phi into the multipliers (``None``: none did)
    depth_given: bool = dataclasses.field(default=False, compare=False)  # depth= given, not derived from phi
    # a detector's network part (compscale.detection): the width of its neck and heads' channel groups (None: the
    # width), the layers added to each head tower and to each run of repeated neck cells
    neck_width: float | None = None
    head_layers: int = 0
    neck_layers: int = 0


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
    options: Any = None  # the ScaleOptions it was planned or built with (compscale.planning.options)
    macs: int | None = None  # counted by the planner (compscale.plan); None on a scaled model
    params: int | None = None
    acts: int | None = None  # conv output elements for one input (pycls's "activations")
    base_macs: int | None = None
    base_params: int | None = None
    base_acts: int | None = None
    latency: float | None = None  # seconds per call, when a latency target measured it
    latency_iqr: float | None = None  # the interquartile range of its timed runs (the noise of ``latency``)
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
        """The plan as plain data (without its options, which hold functions and types)."""
        return dataclasses.asdict(dataclasses.replace(self, options=None))

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
        rule = f" ({m.strategy})" if m.strategy not in (None, "compound") else ""
        phi = f"phi={m.phi:g}{rule}: " if m.phi is not None else ""
        lines = [
            f"{phi}depth x{m.depth:.4g}, width x{m.width:.4g}, resolution x{m.resolution:.4g}"
            + (f"; neck and heads: width x{m.neck_width:.4g}, {m.head_layers:+d} layers per head tower, "
               f"{m.neck_layers:+d} per run of neck cells" if m.neck_width is not None else ""),
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
        if self.acts is not None and self.base_acts:
            lines.append(f"activations {self.base_acts / 1e6:.2f} M -> {self.acts / 1e6:.2f} M "
                         f"(x{self.acts / self.base_acts:.2f})")
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
    "      input width; squeeze = an SE bottleneck keeping its ratio; tied = k x another group's width;\n"
    "      stage = the block's output width (a basic block's first conv: one width per stage)\n"
    "groups: how many channel groups (channels that residual adds or depthwise convs tie) changed so;\n"
    "e.g.: one layer of them"
)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    all_rows = [header, *rows]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in all_rows)


def resolve_multipliers(phi: float | None, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
                        depth: float | None = None, width: float | None = None, resolution: float | None = None,
                        strategy: StrategyLike | None = None, rank: int = 2) -> Multipliers:
    """The multipliers ``strategy`` gives for ``phi`` (compound by default: ``d = alpha**phi``, ``w = beta**phi``,
    ``r = gamma**phi``); explicit ``depth``/``width``/``resolution`` win. ``alpha``/``beta``/``gamma`` are the
    compound rule's (a strategy given by name or object carries its own).

    ``rank`` is the number of spatial dims of the input. Strategies state resolution for images (MACs grow as
    ``d * w**2 * r**2``); for another rank phi's ``r`` becomes ``r ** (2 / rank)`` per dim, so that ``r**2`` of the
    input's area becomes the same factor of its volume (3-D) or length (1-D) and phi still means about ``2**phi``
    MACs. An explicit ``resolution`` is per dim, as given.

    >>> [round(resolve_multipliers(1, rank=k).resolution, 4) for k in (1, 2, 3)]
    [1.3225, 1.15, 1.0977]

    Raises:
        TypeError: a multiplier that is not a real number.
        ValueError: a multiplier that is zero, negative, NaN or infinite.
    """
    compound = Compound(alpha, beta, gamma)  # checked whatever the strategy
    rule = compound if strategy is None or strategy == "compound" else get_strategy(strategy)
    p = None if phi is None else check_multiplier("phi", phi, positive=False)
    derived = rule.multipliers(p) if p is not None else (1.0, 1.0, 1.0)
    if p is not None:
        check_phi(p)  # after the rule, which names a multiplier that overflows
    explicit, names = (depth, width, resolution), ("depth", "width", "resolution")
    d, w, r = (check_multiplier(name, e) if e is not None else v for name, e, v in zip(names, explicit, derived))
    check_multipliers({name: v for name, v, e in zip(names, (d, w, r), explicit) if e is not None})
    if p is not None:
        check_multipliers({name: v for name, v, e in zip(names, derived, explicit) if e is None},
                          f"phi={p:g} by strategy {rule.name!r}")
    if resolution is None and rank not in (0, 2):  # rank 0: no spatial dims to scale
        r = r ** (2 / rank)
    return Multipliers(d, w, r, p, rule.name if p is not None and None in explicit else None,
                       depth_given=depth is not None)


def as_size(size: object, rank: int = 2, name: str = "input_size") -> tuple[int, ...]:
    """The spatial size of an input (every dim after the channels): one int is a square (of ``rank`` dims),
    a sequence is taken as it is (``(16000,)`` for audio, ``(16, 112, 112)`` for video); checked
    (:func:`compscale.arguments.check_input_size`: a ``TypeError``/``ValueError`` naming ``name``)."""
    return check_input_size(size, name, rank)


def format_size(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


def plan_input_size(base: tuple[int, ...], resolution: float, divisor: int = 8) -> tuple[int, ...]:
    """The new spatial size: each dim ``base * r`` rounded to a multiple of ``divisor`` (unchanged when r == 1); for
    an input that is not an image, to a smaller one at small sizes, so that the steps of phi stay distinct (see
    :func:`~compscale.planning.rounding.round_resolution`)."""
    if resolution == 1.0:
        return base
    size = tuple(round_resolution(s, resolution, divisor, fine=len(base) != 2) for s in base)
    if math.prod(size) > INPUT_LIMIT:
        raise ValueError(f"resolution={resolution:.4g} takes the input size {format_size(base)} past {INPUT_LIMIT:,} "
                         "elements per channel, more than compscale plans for; give a smaller resolution (or phi)")
    return size
