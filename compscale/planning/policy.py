"""Width policy: how each channel group's new width follows from the multiplier.

Hand-built families derive some widths from others instead of rounding each on its own; the rules
here recover those derivations from the channel-group graph (see docs/choosing.md):

* ``fixed``: the model's input channels and outputs (classes) never change.
* ``tied``: a depthwise conv with a channel multiplier keeps ``out = k * in``.
* ``squeeze``: a group sandwiched between two layers of one group ``P`` (squeeze-excitation) keeps its
  ratio to ``P``: ``floor(new(P) * base / base(P))``, at least 1.
* ``expansion``: a group produced inside a block from a group ``H`` with ``base = k * base(H)``, ``k >= 2``
  an integer, stays ``k * new(H)`` (bottleneck output, inverted-residual hidden width). Stems and heads,
  outside every block, are rounded on their own (MobileNetV2's head is ``make_divisible(1280 * w)``).
* ``stage``: a group made inside a block with the width of the block's output, from a narrower input (a basic
  block's downsampling ``conv1``: ``2 x`` its input), is the block's output width: one width per stage.
* ``independent``, ``never_narrower``: the head, the conv after the last block that widens the final stage into
  the features a global pool hands to the classifier (MobileNetV2's and MNASNet's 1280), is rounded on its own but
  never narrows: ``max(base, round_width(base * w))``, as torchvision's ``make_divisible(1280 * max(1, w))``.
* ``sum``: a group the model cuts in pieces (DPN's ``x[:, :c]`` / ``x[:, c:]`` of one conv's output) is the
  sum of its pieces' widths.
* ``part``: a piece of a split by the model's list of sizes (MixConv) follows its whole, cut as timm's
  ``_split_channels`` cuts it (:func:`partition`).
* ``independent``: everything else: ``round_width(base * w, divisor)`` with ``divisor`` the lcm of 8 and
  the group's grouped-conv / GroupNorm divisors.

Each rule is a small function; :func:`resolve_widths` is the one place that combines them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

from compscale.analyse.channels import ChannelGraph, ChannelGroup
from compscale.analyse.stages import StageTable, find_stages
from compscale.errors import WidthError
from compscale.planning.budget import check_width
from compscale.planning.rounding import make_divisible
from compscale.trace import Traced

if TYPE_CHECKING:
    from compscale.planning.options import ScaleOptions

__all__ = ["Derivation", "RoundFn", "derive", "derive_widths", "fixed_widths", "partition", "plan_widths",
           "resolve_widths"]

RoundFn = Callable[[float, int], int]


@dataclasses.dataclass(frozen=True)
class Derivation:
    """How one group's width follows from another's (``parent`` is ``None`` for independent/fixed groups)."""

    rule: str
    parent: int | None = None
    ratio: Fraction = Fraction(1)
    pieces: tuple[int, ...] = ()
    """``sum``: the groups whose widths add up to this one. ``part``: ``(index, *sizes)``, piece ``index`` of
    ``parent`` cut as ``sizes`` cut its analysed width."""
    never_narrower: bool = False
    """``independent``: the width never drops below the analysed one (a network's head, see :func:`derive`)."""


def derive(cg: ChannelGraph, blocks: Sequence[str] | Mapping[str, Sequence[int]] | None = None
           ) -> dict[int, Derivation]:
    """The derivation of every group of ``cg``.

    Args:
        cg: the channel groups.
        blocks: module paths of the network's blocks; only layers inside one derive an expansion, and layers
            outside all of them may be a head (``None``: ``cg`` is one block, whose outputs are ``cg.outputs``). A
            mapping gives each block's output groups too (the groups of its exit node), for the ``stage`` rule.
    """
    squeezes = _squeezes(cg)
    ties = {out: (src, k) for out, src, k in cg.ties}
    parts = {p.piece: p for p in cg.parts}
    result: dict[int, Derivation] = {}
    for g in cg.groups:
        if g.fixed:
            result[g.id] = Derivation("fixed")
        elif g.id in cg.sums:
            result[g.id] = Derivation("sum", pieces=cg.sums[g.id])
        elif g.id in parts:
            part = parts[g.id]
            result[g.id] = Derivation("part", part.whole, pieces=(part.index, *part.sizes))
        elif g.id in ties:
            src, k = ties[g.id]
            result[g.id] = Derivation("tied", src, k)
        elif g.id in squeezes:
            p = squeezes[g.id]
            result[g.id] = Derivation("squeeze", p, Fraction(g.base, cg.groups[p].base))
    outputs = dict(blocks) if isinstance(blocks, Mapping) else {"": cg.outputs} if blocks is None else {}
    paths = None if blocks is None else tuple(blocks)
    for g in cg.groups:
        if g.id not in result:
            result[g.id] = _expansion(cg, g, result, paths, outputs)
    if paths is not None:
        for g in cg.groups:
            if result[g.id].rule == "independent" and _is_head(cg, g, paths):
                result[g.id] = Derivation("independent", never_narrower=True)
    return result


def _block_of(path: str, blocks: Sequence[str]) -> str | None:
    """The innermost block of ``blocks`` holding the layer ``path``."""
    holding = [b for b in blocks if path.startswith(b + ".")]
    return max(holding, key=len) if holding else None


def _is_head(cg: ChannelGraph, g: ChannelGroup, blocks: Sequence[str]) -> bool:
    """Whether ``g`` is the head of a network: made after the blocks, from a map (not pooled), wider than what it
    reads, by layers outside every block, and pooled straight into the classifier (a layer whose output is fixed).

    MobileNetV2, MNASNet and EfficientNet widen their last stage (320) to 1280 so; MobileNetV3's 960-channel conv
    is not one (a Linear to 1280 comes between its pool and the classifier), nor a ResNet's last stage (in blocks).
    """
    if not g.producers:
        return False
    for path in g.producers:
        layer = cg.layers[path]
        if _block_of(path, blocks) is not None or layer.pooled or len(layer.inputs) != 1:
            return False
        if cg.groups[layer.inputs[0][0]].base >= g.base:
            return False
    return any(layer.pooled and {s for s, _ in layer.inputs} == {g.id} and cg.groups[layer.output].fixed
               for layer in cg.layers.values())


def _squeezes(cg: ChannelGraph) -> dict[int, int]:
    """Groups ``G`` that a layer makes from pooled ``P`` and another layer turns back into ``P`` (SE)."""
    made_from: dict[int, set[int]] = {}
    turned_into: dict[int, set[int]] = {}
    for layer in cg.layers.values():
        if len(layer.inputs) == 1 and layer.pooled:
            made_from.setdefault(layer.output, set()).add(layer.inputs[0][0])
            turned_into.setdefault(layer.inputs[0][0], set()).add(layer.output)
    result = {}
    for g, parents in made_from.items():
        back = parents & turned_into.get(g, set())
        if back and cg.groups[g].base < cg.groups[min(back)].base:
            result[g] = min(back)
    return result


def _expansion(cg: ChannelGraph, g: ChannelGroup, known: Mapping[int, Derivation],
               blocks: Sequence[str] | None, outputs: Mapping[str, Sequence[int]]) -> Derivation:
    """Vote over ``g``'s producers: each says "k x my input group", "my block's output width" or "independent";
    ties go to independent.

    A producer that makes ``k x`` its input inside a block whose output is another group of ``g``'s width (a basic
    block's downsampling ``conv1``, 64 -> 128 in a 128-wide stage) votes for that output: the reference builds
    both from the stage's one width (torchvision's ``BasicBlock(inplanes, planes)``), not from the input.
    The producers of ``g``'s pieces (:class:`~compscale.analyse.channels.Part`: a MixConv's convs) vote for
    ``g``, reading the whole their input is a piece of (timm's MixNet: hidden = ratio x block input).
    """
    votes: Counter[tuple[str, int, int] | None] = Counter()
    whole_of = {p.piece: p.whole for p in cg.parts}
    producers = [*g.producers, *(path for p in cg.parts if p.whole == g.id for path in cg.groups[p.piece].producers)]
    # an expansion a depthwise conv reads is one even outside every block: an inverted residual that a detector's
    # backbone splits in two to tap its expanded map (torchvision's SSDlite) is no block of the graph
    expands = any(g.id in groups for groups in cg.depthwise.values())
    for path in producers:
        layer = cg.layers[path]
        block = "" if blocks is None else _block_of(path, blocks)
        outside = blocks is not None and block is None and not expands
        if outside or len(layer.inputs) != 1 or layer.inputs[0][1] != 1:
            votes[None] += 1
            continue
        h = cg.groups[whole_of.get(layer.inputs[0][0], layer.inputs[0][0]) if path not in g.producers
                      else layer.inputs[0][0]]
        k, rem = divmod(g.base, h.base)
        if rem == 0 and k >= 2 and not h.fixed and h.id != g.id:
            stage = [o for o in outputs.get(block or "", ())
                     if o != g.id and cg.groups[o].base == g.base and not cg.groups[o].fixed]
            votes[("stage", stage[0], 1) if len(stage) == 1 else ("expansion", h.id, k)] += 1
        else:
            votes[None] += 1
    if not votes:
        return Derivation("independent")
    best = max(votes.values())
    winners = [v for v, c in votes.items() if c == best]
    derived = [v for v in winners if v is not None]
    if len(derived) < len(winners):
        return Derivation("independent")
    # prefer a parent that is itself independent (a bottleneck's planes, not the previous stage's output)
    derived.sort(key=lambda v: (known.get(v[1], Derivation("independent")).rule != "independent", v[1], v[0]))
    rule, parent, k = derived[0]
    return Derivation(rule, parent, Fraction(k))


def resolve_widths(
    cg: ChannelGraph,
    independent: Callable[[ChannelGroup, int], int],
    seeds: Mapping[int, int] | None = None,
    derivations: Mapping[int, Derivation] | None = None,
) -> dict[int, int]:
    """New width of every group.

    Args:
        cg: the channel groups.
        independent: ``independent(group, divisor) -> width`` for groups no other group determines.
        seeds: widths forced on some groups (their derived groups follow them).
        derivations: as returned by :func:`derive` (computed when omitted).

    Raises:
        WidthError: a group would be empty or would break a divisor it must keep.
    """
    derivations = derive(cg) if derivations is None else derivations
    seeds = dict(seeds or {})
    widths: dict[int, int] = {}

    def width(gid: int, visiting: frozenset[int] = frozenset()) -> int:
        if gid in widths:
            return widths[gid]
        g, d = cg.groups[gid], derivations[gid]
        if gid in seeds:
            w = seeds[gid]
        elif d.rule == "fixed":
            w = g.base
        elif d.rule == "sum" and not set(d.pieces) & (visiting | {gid}):
            w = sum(width(p, visiting | {gid}) for p in d.pieces)
        elif d.rule == "part" and d.parent is not None and d.parent not in visiting:
            w = partition(width(d.parent, visiting | {gid}), d.pieces[1:])[d.pieces[0]]
        elif d.never_narrower:  # a head: rounded on its own, never narrower than the trained one
            w = max(g.base, independent(g, divisor_of(g)))
        elif d.parent is not None and d.parent not in visiting:
            pw = width(d.parent, visiting | {gid})
            w = max(1, math.floor(pw * d.ratio)) if d.rule == "squeeze" else int(pw * d.ratio)
            if any(w % k for k in g.divisors):  # a derived width a grouped conv cannot take: round instead
                w = independent(g, divisor_of(g))
        else:
            w = independent(g, divisor_of(g))
        widths[gid] = w
        return w

    for gid, w in seeds.items():  # a seeded sum (a dense block's wider input): its last piece takes the change
        d = derivations[gid]
        if d.rule == "sum" and d.pieces and d.pieces[-1] not in seeds:
            rest = sum(width(p, frozenset({gid})) for p in d.pieces[:-1])
            if w - rest >= 1:  # else the pieces keep their own widths (a repeat whose last piece empties)
                widths[d.pieces[-1]] = w - rest
    for g in cg.groups:
        width(g.id)
    _check(cg, widths)
    return widths


def partition(total: int, sizes: Sequence[int]) -> list[int]:
    """Cut ``total`` channels as ``sizes`` cut ``sum(sizes)``.

    Sizes that are equal but for a remainder added to the first (timm's and TF's MixConv ``_split_channels``) are
    cut the same way again; other sizes keep their proportions (rounded at their cumulative bounds, so that the
    pieces add up to ``total``).

    Example:
        >>> partition(100, [22, 21, 21]), partition(48, [16, 48])
        ([34, 33, 33], [12, 36])
    """
    k, base = len(sizes), sum(sizes)
    equal = [base // k] * k
    equal[0] += base - sum(equal)
    if list(sizes) == equal:
        out = [total // k] * k
        out[0] += total - sum(out)
        return out
    bounds, acc = [0], 0
    for s in sizes:
        acc += s
        bounds.append(round(total * acc / base))
    return [b - a for a, b in itertools.pairwise(bounds)]


def divisor_of(g: ChannelGroup, base: int = 8) -> int:
    """The multiple a group's width must round to: lcm of ``base`` and its grouped-conv/GroupNorm divisors."""
    d = base
    for k in g.divisors:
        d = math.lcm(d, k)
    return d


def _check(cg: ChannelGraph, widths: Mapping[int, int]) -> None:
    for g in cg.groups:
        w = widths[g.id]
        where = ", ".join(p for p, _ in g.members[:3]) or "no layer"
        if w < 1:
            raise WidthError(
                f"channel group {g.id} ({g.base} channels: {where}) would have {w} channels",
                "use a larger width multiplier, or keep this group with `fixed=`.",
            )
        for d, why in g.divisors.items():
            if w % d:
                raise WidthError(
                    f"channel group {g.id} ({where}) would have {w} channels, not divisible by {d} as {why} needs",
                    "pick a width multiplier (or rounding) that keeps the divisor.",
                )


def default_independent(multiplier: float, round_width: RoundFn = make_divisible) -> Callable[[ChannelGroup, int], int]:
    """The independent-group rule of the references: ``make_divisible(base * w, divisor)``."""

    def rule(g: ChannelGroup, divisor: int) -> int:
        return _checked_width(round_width, g.base * multiplier, divisor)

    return rule


def _checked_width(round_width: RoundFn, channels: float, divisor: int) -> int:
    """``round_width(channels, divisor)``, which must give a whole number of channels (an int, numpy's included); else a
    ``TypeError`` naming ``round_width``, not torch's when it builds a layer (a width below 1 is a ``WidthError``
    naming the group, later)."""
    got = round_width(channels, divisor)
    try:
        width = operator.index(got) if not isinstance(got, bool) else None
    except TypeError:
        width = None
    if width is None:
        raise TypeError(f"round_width must return an int (a number of channels), but round_width({channels:g}, "
                        f"{divisor}) returned {type(got).__name__} {got!r:.40}")
    return width


def plan_widths(cg: ChannelGraph, derivations: Mapping[int, Derivation], width: float,
                options: ScaleOptions, neck: tuple[set[int], float] | None = None) -> dict[int, int]:
    """The new width of every channel group at width multiplier ``width``: the step ``scale`` and the planner share.
    ``neck``: groups (a detector's neck and heads) that take another multiplier, and that multiplier."""
    seeds = fixed_widths(cg, options.fixed)
    if width < 1.0:
        check_width(width, max((g.base for g in cg.groups if g.fixed is None), default=0))
    if width == 1.0 and not seeds and (neck is None or neck[1] == 1.0 or not neck[0]):
        return {g.id: g.base for g in cg.groups}
    rule = default_independent(width, options.round_width)
    if neck is not None:
        groups, neck_rule = neck[0], default_independent(neck[1], options.round_width)
        trunk_rule = rule

        def rule(g: ChannelGroup, divisor: int) -> int:
            return (neck_rule if g.id in groups else trunk_rule)(g, divisor)

    return resolve_widths(cg, rule, derivations=derivations, seeds=seeds)


def fixed_widths(cg: ChannelGraph, fixed: tuple[str, ...] | list[str]) -> dict[int, int]:
    """Seeds that keep the output group of each layer in ``fixed`` at its width."""
    seeds = {}
    for path in fixed:
        if path not in cg.layers and path not in cg.norms and path not in cg.depthwise:
            raise WidthError(f"fixed={path!r} names no conv, linear or norm layer of the model",
                             "give module paths as in model.named_modules(), e.g. 'layer4.2.conv3'.")
        g = cg.group_of(path)
        seeds[g.id] = g.base
    return seeds


def derive_widths(traced: Traced, cg: ChannelGraph, table: StageTable | None = None) -> dict[int, Derivation]:
    """How each channel group's width follows from others (:func:`~compscale.planning.policy.derive`), given the
    network's blocks (all of them, whatever ``stages=`` picks: ``table`` when the caller has found them so).

    A unit of a plain stage hands its output to the next unit as a stage width, which the published plain
    families round on its own (timm's MobileNetV1 at ``channel_multiplier=1.2``: 128 -> 152, not 2 x 80).
    """
    table = find_stages(traced) if table is None else table
    derivations = derive(cg, {b.path: cg.node_groups.get(b.exit, ()) for s in table for b in s.blocks})
    for stage in (s for s in table if s.plain):
        for block in stage.blocks:
            for g in cg.node_groups.get(block.exit, ()):
                if derivations[g].rule == "expansion":
                    derivations[g] = Derivation("independent")
    return derivations
