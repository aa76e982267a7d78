"""Channel-group analysis: union-find over the channel spaces of a traced graph.

Every conv/linear output starts a *space*; ops that must keep two spaces equal in width (residual
adds, SE's broadcast mul, depthwise convs, norms) unite them. The resulting *groups* are the units a
width plan assigns a new width to. A concat makes a segmented descriptor rather than a new space, so
a consumer of ``cat([a, b])`` sees both groups.

Example:
    >>> from torchvision.models import resnet18
    >>> from compscale.trace import trace
    >>> groups = analyse_channels(trace(resnet18()))
    >>> len(groups.groups), groups.group_of("layer1.0.conv1", "out").base
    (14, 64)
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import re
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NoReturn

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compscale.analyse.probe import probed_rule
from compscale.analyse.rules import (
    _ADAPTIVE_FUNCTIONS,
    _ADAPTIVE_POOLS,
    _ATTR_READERS,
    _ATTR_VIEWS,
    _MULTI_OUTPUT,
    _PADS,
    _REDUCTIONS,
    _WINDOW_FUNCTIONS,
    _WINDOW_POOLS,
    Desc,
    GroupedView,
    _arg,
    get_function_rule,
    get_module_rule,
)
from compscale.errors import UnsupportedOpError
from compscale.trace import Traced, module_path
from compscale.trace.tracer import splits_channels

__all__ = [
    "ChannelGraph", "ChannelGroup", "LayerChannels", "Part", "RuleContext", "SizeLiteral", "analyse_channels",
    "attributes_holding", "spatial_dims",
]

_RULE_HINT = (
    "tell compscale how it maps channels: `compscale.register_channel_rule({target}, rule)` with a rule from "
    "compscale.analyse.rules (`elementwise` keeps the input's channels, `fixed` pins them), or make the module "
    "a leaf with such a rule."
)


@dataclasses.dataclass
class ChannelGroup:
    """Channels that must keep one width: every member dimension changes together.

    Attributes:
        id: the group's index.
        base: its width in the analysed model.
        members: ``(module path, role)`` pairs; role is ``out``/``in`` of a conv or linear, ``norm``, ``depthwise``.
        fixed: why its width may not change (model input, model output, a pinned layer), or ``None``.
        divisors: widths this group must stay a multiple of, with the layer that asks for each.
        producers: paths of the conv/linear layers whose output is this group.
    """

    id: int
    base: int
    members: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    fixed: str | None = None
    divisors: dict[int, str] = dataclasses.field(default_factory=dict)
    producers: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class LayerChannels:
    """The channel groups a conv/linear layer reads (segments, in order) and writes.

    ``pooled`` is true when the layer reads a summary of its map, as the squeeze and excitation layers of SE and
    a classifier do: the output of a global pool (an adaptive pool to one value, a mean over the spatial dims) or
    of layers and elementwise ops on one, or a tensor without spatial dims at all. It is read from the graph, not
    from the map being 1x1 at the traced size: a 1x1 conv on a 1x1 map of a small input is spatial.
    """

    path: str
    inputs: tuple[tuple[int, int], ...]
    output: int
    pooled: bool = False


@dataclasses.dataclass(frozen=True)
class Part:
    """Group ``piece`` is piece ``index`` of group ``whole``, cut as ``sizes`` cut the analysed width (MixConv's
    ``torch.split(x, self.splits)``): the whole is the unit that is rounded, the pieces follow it."""

    piece: int
    whole: int
    index: int
    sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SizeLiteral:
    """A channel count the model keeps in a module attribute and hands to an op as a number: split sizes
    (Res2Net's ``self.width``, MixConv's ``self.splits``), a slice bound (GhostNet's ``self.out_chs``).

    ``entries`` gives, per number (one for an ``int`` attribute), the ``(group, factor)`` pairs whose new widths
    sum to its new value; :func:`compscale.rewrite.width.apply_widths` writes it. In a ``GraphModule`` (a block
    compscale synthesized, a model traced by the user) the number is written in the code: ``attr`` is then the
    name of the graph node whose arguments hold ``value``.
    """

    path: str
    attr: str
    entries: tuple[tuple[tuple[int, int], ...], ...]
    is_list: bool
    in_graph: bool = False
    value: Any = None


@dataclasses.dataclass
class ChannelGraph:
    """The result of :func:`analyse_channels`."""

    groups: list[ChannelGroup]
    layers: dict[str, LayerChannels]
    norms: dict[str, tuple[int, ...]]
    depthwise: dict[str, tuple[int, ...]]
    ties: list[tuple[int, int, Fraction]]
    node_groups: dict[str, tuple[int, ...]]
    params: dict[str, tuple[int, tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    channel_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    shape_owners: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    parts: list[Part] = dataclasses.field(default_factory=list)
    sums: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    literals: list[SizeLiteral] = dataclasses.field(default_factory=list)
    interleaved: set[tuple[int, int]] = dataclasses.field(default_factory=set)
    sliding: list[str] = dataclasses.field(default_factory=list)
    outputs: tuple[int, ...] = ()
    """``params``: tensor attributes used in ``forward`` (a layer scale), by qualified name: the dimension
    that runs over channels and its groups. ``channel_dims``: the channel dimension of each node whose
    channels are not dimension 1 (a channels-last tensor after ``permute(0, 2, 3, 1)``). ``shape_owners``:
    modules that pass their own weight to ``F.layer_norm`` (a hand-written LayerNorm): their attribute
    holding the normalized shape follows these groups. ``parts``: pieces of a group split by the model's own sizes
    (MixConv). ``sums``: a group that is the concatenation of others (a conv output that ``x[:, :c]`` and
    ``x[:, c:]`` cut in two: DPN, ReXNet). ``literals``: numbers the model keeps that follow the width.
    ``interleaved``: the ``(out, src)`` ties whose wider side alternates the other's channels (a depthwise multiplier,
    a shuffle) rather than repeating them in blocks. ``sliding``: layers that slide along the channels (ECA).
    ``outputs``: the groups of the traced graph's outputs (of one block, when the graph is one)."""

    def group_of(self, path: str, role: str = "out") -> ChannelGroup:
        """The group of a layer's output (``role="out"``), or of a norm/depthwise layer's channels."""
        for table in (self.norms, self.depthwise):
            if path in table:
                return self.groups[table[path][0]]
        return self.groups[self.layers[path].output]

    def details(self) -> str:
        """A readable dump: one line per group with its width, fixedness, divisors and members."""
        lines = [f"{len(self.groups)} channel groups"]
        for g in self.groups:
            flags = []
            if g.fixed:
                flags.append(f"fixed: {g.fixed}")
            if g.divisors:
                flags.append("divisible by " + ", ".join(str(d) for d in sorted(g.divisors)))
            members = ", ".join(f"{p}:{r}" for p, r in g.members[:6])
            more = f" (+{len(g.members) - 6} more)" if len(g.members) > 6 else ""
            lines.append(f"  [{g.id}] {g.base:>5} ch  {'; '.join(flags)}  {members}{more}")
        return "\n".join(lines)

    __str__ = details


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []

    def make(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class RuleContext:
    """What a channel rule may ask and record; one per analysis."""

    def __init__(self, traced: Traced, pin_io: bool = True) -> None:
        self.traced = traced
        self.pin_io = pin_io
        self.uf = _UnionFind()
        self.descs: dict[fx.Node, Desc] = {}
        self.fixed: dict[int, str] = {}
        self.divisors: list[tuple[int, int, str]] = []
        self.members: list[tuple[int, str, str]] = []
        self.channel_members: dict[str, Desc] = {}  # a norm or depthwise conv's channels, at its first call
        self.layers: dict[str, tuple[Desc, Desc]] = {}
        self.pooled: set[str] = set()
        self.summaries: set[fx.Node] = set()  # nodes holding a global summary of a map (see is_summary)
        self.ties: list[tuple[int, int, Fraction]] = []
        self.interleaved: set[tuple[int, int]] = set()  # ties whose copies alternate (c * k + j), not follow in blocks
        self.sliding: list[str] = []  # layers sliding along the channels (ECA's Conv1d): they mix neighbours
        self.multi: dict[fx.Node, list[Desc]] = {}  # ops returning several tensors (chunk, split)
        self.grouped: dict[fx.Node, GroupedView] = {}  # (N, g, C/g, H, W) views of channels (shuffles, branches)
        self.parts: list[tuple[int, int, int, tuple[int, ...]]] = []  # (piece, whole, index, sizes) spaces
        self.sums: dict[int, Desc] = {}  # a space cut in pieces -> the pieces
        self.literals: list[tuple[str, str, tuple[Desc, ...], bool, Any]] = []  # module, attribute, entries,
        # is a list, and the value itself for a number written in a GraphModule's code (attribute: the node)
        self.pieces: dict[str, tuple[Desc, list[Desc]]] = {}  # module -> what it split by a list of sizes, pieces
        self.current: fx.Node | None = None  # the node whose rule runs
        self.cdim: dict[fx.Node, int] = {}  # channel dimension where a rule set it (else 1 or the input's)
        self.attrs: dict[fx.Node, fx.Node] = {}  # tensor attributes and views of them -> the get_attr node
        self.params: dict[str, tuple[int, Desc]] = {}  # attribute -> (its channel dimension, descriptor)
        self.shape_owners: dict[str, Desc] = {}  # modules calling layer_norm with their own weight (not nn.LayerNorm)

    # queries
    def is_tensor(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and (arg in self.descs or arg in self.grouped)

    def desc(self, node: Any) -> Desc:
        if isinstance(node, fx.Node) and node in self.grouped and node not in self.descs:
            self._branches(node)
        if not self.is_tensor(node):
            assert self.current is not None and isinstance(node, fx.Node), node
            self.unsupported(self.current, f"it reads {node.name}, a tensor whose channels compscale did not follow")
        return self.descs[node]

    def _branches(self, node: fx.Node) -> None:
        """Use a grouped view ``(N, k, C, *spatial)`` as a tensor of ``k`` branches over one space of ``C`` channels
        in dimension 2 (SK's and ResNeSt's attention over branches): the source's ``k * C`` follows ``C``."""
        view = self.grouped[node]
        assert self.current is not None
        if not view.factors:  # rules.py keeps a map whose channels were reduced away as a view of no dimension
            self.unsupported(self.current, f"it reads {node.name}, a map whose channels were reduced away "
                             "(`x.mean(dim=1)`), where it expects channels")
        if view.order != tuple(range(len(view.factors))) or len(view.factors) != 2:
            self.unsupported(self.current, f"it reads {node.name}, a view of channels as {view.factors} whose axes "
                             "are swapped or more than two", "compscale follows (N, k, C, ...) views of (N, k*C, ...) "
                             "tensors and channel shuffles; register a rule for the module doing this.")
        k, c = view.factors
        if len(view.desc) == 1:
            branch = self.new_space(node, c)
            if self.is_tied(view.desc):  # the k*C layer already follows another: C follows it
                self.divisor(view.desc, k, f"{node.name} ({k} branches)")
                self.tie(branch, view.desc, Fraction(1, k))
            else:  # the k*C layer follows C, the width that meets the rest of the block
                self.tie(view.desc, branch, k)
        elif len(view.desc) == k:  # k concatenated parts, one per branch
            for part in view.desc[1:]:
                self.union(view.desc[:1], (part,), node)
            branch = view.desc[:1]
        else:
            self.unsupported(self.current, f"it reads {node.name}, {len(view.desc)} concatenated parts viewed as {k} "
                             "branches")
        self.descs[node] = branch
        self.cdim[node] = 2

    def input_node(self, node: fx.Node) -> fx.Node:
        arg = node.args[0] if node.args else next(iter(node.kwargs.values()))
        assert isinstance(arg, fx.Node), node.format_node()
        return arg

    def input_desc(self, node: fx.Node) -> Desc:
        return self.desc(self.input_node(node))

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(self.traced.shape(node))

    def channel_dim(self, node: fx.Node) -> int:
        """The dimension of ``node``'s tensor that runs over channels: 1, or where a ``permute`` moved it."""
        if node in self.grouped and node not in self.descs:
            self._branches(node)
        return self.cdim.get(node, 1)

    def channels(self, node: fx.Node) -> int:
        shape = self.shape(node)
        return shape[self.channel_dim(node)] if len(shape) > 1 else 1

    def spatial(self, node: fx.Node) -> tuple[int, ...]:
        """The sizes of ``node``'s dimensions other than batch and channels."""
        return spatial_dims(self.shape(node), self.channel_dim(node))

    def channels_first(self, node: fx.Node, what: str) -> None:
        """Fail unless ``node``'s input has its channels in dimension 1 (``what`` reads such tensors)."""
        if self.channel_dim(self.input_node(node)) != 1:
            self.unsupported(node, f"{what} applied to a tensor whose channels are not dimension 1")

    def channels_last(self, node: fx.Node, what: str) -> None:
        """Fail unless ``node``'s input has its channels in its last dimension (``what`` reads such tensors)."""
        src = self.input_node(node)
        if self.channel_dim(src) != len(self.shape(src)) - 1:
            self.unsupported(node, f"{what} applied to a tensor whose channels are not its last dimension")

    def width(self, desc: Desc) -> int:
        return sum(self.uf.size[s] * f for s, f in desc)

    # records
    def new_space(self, node: fx.Node, size: int, fixed_reason: str | None = None) -> Desc:
        s = self.uf.make(size)
        if fixed_reason:
            self.fixed[s] = fixed_reason
        return ((s, 1),)

    def union(self, a: Desc, b: Desc, node: fx.Node) -> Desc:
        """Make ``a`` and ``b`` one set of channels; returns their common descriptor.

        Two concatenations of different pieces with the same width (ReXNet's ``x[:, :c] + shortcut`` where the
        shortcut is itself a concat) are first cut at each other's boundaries (see :meth:`cut`).
        """
        a, b = self.refine(a), self.refine(b)
        if len(a) != len(b) or any(fa != fb for (_, fa), (_, fb) in zip(a, b)):
            copies = a if len(b) == 1 else b if len(a) == 1 else ()
            roots = {self.uf.find(s) for s, _ in copies}
            if len(roots) == 1 and not self.is_tied(copies) and self.width(a) == self.width(b) and all(
                    f == 1 for _, f in a + b):  # GhostNet: cat([x1, cheap(x1)]) + shortcut: x1 is half the shortcut
                whole = b if copies is a else a
                self.divisor(whole, len(copies), f"{node.name} ({len(copies)} copies of one width)")
                self.tie(copies[:1], whole, Fraction(1, len(copies)))
                return copies
            if self.width(a) == self.width(b) and all(f == 1 for _, f in a + b):
                for offset in _bounds(self, a) | _bounds(self, b):
                    a, b = self.cut(a, offset, node), self.cut(b, offset, node)
            if len(a) != len(b) or any(fa != fb for (_, fa), (_, fb) in zip(a, b)):
                self.unsupported(node, "it joins tensors whose channels are concatenated differently")
        for (sa, _), (sb, _) in zip(a, b):
            self.uf.union(sa, sb)
        return a

    def refine(self, desc: Desc) -> Desc:
        """``desc`` with every space that was cut (:meth:`cut`) replaced by its pieces."""
        if not self.sums:
            return desc
        cuts = {self.uf.find(k): v for k, v in self.sums.items()}
        out: list[tuple[int, int]] = []
        for s, f in desc:
            pieces = cuts.get(self.uf.find(s)) if f == 1 else None
            out.extend(self.refine(pieces) if pieces is not None else ((s, f),))
        return tuple(out)

    def cut(self, desc: Desc, offset: int, node: fx.Node) -> Desc:
        """``desc`` with the space that holds channel ``offset`` inside it cut there into two new spaces.

        The cut space becomes the sum of its pieces (``x[:, :c]`` / ``x[:, c:]`` of DPN's conv output: the
        residual width and the dense width, rounded each on their own; the conv's output is their sum).
        """
        desc, start = self.refine(desc), 0
        for i, (s, f) in enumerate(desc):
            size = self.uf.size[s] * f
            if start < offset < start + size:
                if f != 1:
                    self.unsupported(node, "it cuts a flattened channel space")
                pieces = self.new_space(node, offset - start) + self.new_space(node, start + size - offset)
                self.sums[s] = pieces
                return desc[:i] + pieces + desc[i + 1:]
            start += size
        return desc

    def part(self, piece: Desc, whole: Desc, index: int, sizes: Sequence[int]) -> None:
        """``piece`` is piece ``index`` of ``whole`` when the model cuts it in ``sizes`` (MixConv's split)."""
        self.parts.append((piece[0][0], whole[0][0], index, tuple(sizes)))

    def follow_literal(self, node: fx.Node, values: Sequence[tuple[Any, tuple[Desc, ...]]], what: str) -> bool:
        """Find the attribute of ``node``'s module that holds a number the model passes to ``node`` (split sizes,
        a slice bound), so that the width pass updates it; returns ``False`` (after a warning) when there is none
        or several.

        Args:
            node: the op that reads the number.
            values: candidate ``(value, entries)``: the attribute's value (an ``int`` or a list of them) and, per
                number, the channels whose new width it becomes (SK's split size ``self.in_channels // 2`` is
                found as the source's width ``self.in_channels``).
            what: the op, for the warning.
        """
        path = module_path(node)
        module = self.traced.root.get_submodule(path) if path else self.traced.root
        found = [(name, entries, isinstance(value, (list, tuple))) for value, entries in values
                 for name in attributes_holding(module, value)]
        if len(found) > 1:
            found = [f for f in found if _forward_reads(module, f[0])] or found
        if not found and isinstance(module, fx.GraphModule):  # the number is in the code: the node holding it
            same = [n for n in module.graph.nodes if _call_key(n) == _call_key(node)]
            twins = [n for n in self.traced.graph.nodes if module_path(n) == path and _call_key(n) == _call_key(node)]
            if len(same) == len(twins):  # the k-th such call traced is the k-th in the code
                self.literals.append((path, same[twins.index(node)].name, values[0][1],
                                      isinstance(values[0][0], list), values[0][0]))
                return True
        if len(found) != 1:
            warnings.warn(
                f"compscale: {what} at {node.name} (in {path or type(module).__name__!r}) takes the number(s) "
                f"{values[0][0]}, which {'no attribute' if not found else 'several attributes'} of the module "
                f"holds{': ' + ', '.join(f[0] for f in found) if found else ''}; the channels they cut keep their "
                f"width, so MACs grow less than the multiplier asks", stacklevel=2)
            return False
        name, entries, is_list = found[0]
        self.literals.append((path, name, entries, is_list, None))
        return True

    def follow_bound(self, node: fx.Node, module: nn.Module, maps: Sequence[Desc], side: str, taken: set[str],
                     required: bool, read: bool = True) -> None:
        """Record the attribute of ``module`` that its ``forward`` reads and that holds the channels of ``maps``
        together (where an octave convolution cuts its weight: ``self.h_in_channels``), so that the width pass
        writes it; ``taken`` names attributes already found. Of several, the one whose name says its ``side``
        (``in`` or ``out``, as ``in_channels`` does) is taken, and only such a one for the bound after the last map (not
        ``required``: ``forward`` may not cut there). When none or several do, fail if ``required``. With ``read``
        false, an attribute ``forward`` does not read is kept current too (the width of one map: ``l_out_channels``)."""
        value = sum(self.width(m) for m in maps)
        names = [n for n in attributes_holding(module, value)
                 if n not in taken and (not read or _forward_reads(module, n))]
        if len(names) > 1 or not required:  # a bound at the end is optional: only one named for its side
            names = [n for n in names if side in n.lower().split("_")] or (names if required else [])
        if len(names) == 1:
            taken.add(names[0])
            self.literals.append((str(node.target), names[0], (tuple(s for m in maps for s in m),), False, None))
        elif required:
            self.unsupported(node, f"it cuts its weight at {value} channels, and {len(names) or 'no'} attributes its "
                             f"forward reads hold that number ({', '.join(names) or 'none'})",
                             "keep the channel count where a layer splits its maps in one attribute (as "
                             "`self.h_in_channels`), or register a channel rule for it.")

    def member(self, desc: Desc, path: str, role: str) -> None:
        if role in ("norm", "depthwise"):  # called again (a head shared by the levels): the same channels
            first = self.channel_members.setdefault(path, desc)
            if first is not desc:
                if len(first) == len(desc):
                    for (a, _), (b, _) in zip(first, desc):
                        self.uf.union(a, b)
                return
        for s, _ in desc:
            self.members.append((s, path, role))

    def layer(self, path: str, src: Desc, out: Desc, node: fx.Node | None = None) -> None:
        if path in self.layers:  # a layer called twice: both calls must see the same channels
            prev_src, prev_out = self.layers[path]
            self.uf.union(prev_out[0][0], out[0][0])
            if len(prev_src) == len(src):
                for (a, _), (b, _) in zip(prev_src, src):
                    self.uf.union(a, b)
            return
        self.layers[path] = (src, out)
        if node is not None and (self.input_node(node) in self.summaries or not self.spatial(self.input_node(node))):
            self.pooled.add(path)
        self.member(src, path, "in")
        self.member(out, path, "out")

    def divisor(self, desc: Desc, d: int, why: str) -> None:
        for s, _ in desc:
            self.divisors.append((s, d, why))

    def tie(self, out: Desc, src: Desc, factor: Fraction | int, interleaved: bool = False) -> None:
        """``out``'s width is ``factor`` times ``src``'s (a depthwise multiplier, a channel split, a shuffle).

        The wider of the two holds the other's channels ``k`` times over: as ``k`` blocks one after another (a split,
        branches), or ``interleaved`` (channel ``c * k + j``: a depthwise multiplier, a shuffle of ``k`` parts).
        """
        self.ties.append((out[0][0], src[0][0], Fraction(factor)))
        if interleaved:
            self.interleaved.add((out[0][0], src[0][0]))

    def is_tied(self, desc: Desc) -> bool:
        """Whether ``desc``'s first space already follows another by a tie."""
        root = self.uf.find(desc[0][0])
        return any(self.uf.find(out) == root for out, _, _ in self.ties)

    def param(self, attr: fx.Node, desc: Desc, dim: int) -> None:
        """Tensor attribute ``attr`` (a layer scale) runs over the channels ``desc`` along its dimension ``dim``."""
        target = str(attr.target)
        if target in self.params:
            self.union(self.params[target][1], desc, attr)
        else:
            self.params[target] = (dim, desc)

    def pin(self, desc: Desc, why: str) -> None:
        for s, _ in desc:
            self.fixed.setdefault(s, why)

    def expect_width(self, node: fx.Node, desc: Desc, width: int) -> None:
        if self.width(desc) != width:
            self.unsupported(node, f"it expects {width} input channels but receives {self.width(desc)}")

    def flatten(self, node: fx.Node, src_node: fx.Node) -> Desc:
        spatial = math.prod(self.spatial(src_node))
        return tuple((s, f * spatial) for s, f in self.desc(src_node))

    def unsupported(self, node: fx.Node, why: str, hint: str | None = None) -> NoReturn:
        target = _target_name(self.traced, node)
        raise UnsupportedOpError(
            f"cannot tell how node {node.format_node()} (in module {module_path(node) or '<root>'!r}) maps channels: "
            f"{why}",
            hint or _RULE_HINT.format(target=target),
        )


def _fix_followers(groups: list[ChannelGroup], ties: list[tuple[int, int, Fraction]], parts: list[Part],
                   sums: dict[int, tuple[int, ...]]) -> None:
    """A group that follows others (a tie, a piece of a whole, a sum of pieces) and is fixed (a pinned split, the
    model's output) fixes what it follows, so that the relation still holds at the new widths."""
    follows = [(out, src) for out, src, _ in ties] + [(p.piece, p.whole) for p in parts]
    follows += [(whole, piece) for whole, pieces in sums.items() for piece in pieces]
    changed = True
    while changed:
        changed = False
        for a, b in follows:
            if groups[a].fixed and not groups[b].fixed:
                groups[b].fixed = f"follows group {a}, {groups[a].fixed}"
                changed = True


def _bounds(ctx: RuleContext, desc: Desc) -> set[int]:
    """Offsets where the segments of ``desc`` meet."""
    return set(itertools.accumulate(ctx.uf.size[s] * f for s, f in desc[:-1]))


def attributes_holding(module: nn.Module, value: int | Sequence[int], narrow: bool = False) -> list[str]:
    """The names of ``module``'s own attributes (as ``vars`` holds them) equal to the number or list ``value``.

    With ``narrow``, several are narrowed to those ``forward``'s source reads (``self.<name>``) when any is.
    """
    names = [k for k, v in vars(module).items() if not k.startswith("_") and _same_number(v, value)]
    if narrow and len(names) > 1:
        names = [k for k in names if _forward_reads(module, k)] or names
    return names


def _call_key(node: fx.Node) -> Any:
    """What a call writes in the code besides its tensor arguments: the op, the target and the constants."""
    def constants(arg: Any) -> Any:
        return repr(fx.node.map_arg(arg, lambda _: "<node>"))

    return node.op, node.target, constants(node.args), constants(node.kwargs)


def _same_number(attr: Any, value: Any) -> bool:
    def number(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(value, (list, tuple)):
        return isinstance(attr, (list, tuple)) and all(number(a) for a in attr) and list(attr) == list(value)
    return number(attr) and attr == value


def _forward_reads(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s ``forward`` source mentions ``self.<name>`` (to tell apart attributes of one value)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return re.search(rf"\bself\.{re.escape(name)}\b", source) is not None


def spatial_dims(shape: Sequence[int], cdim: int) -> tuple[int, ...]:
    """The sizes of a tensor's dimensions other than batch (0) and channels (``cdim``)."""
    return tuple(d for i, d in enumerate(shape) if i not in (0, cdim))


def _target_name(traced: Traced, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(traced.module(node)).__name__
    if node.op == "call_method":
        return repr(node.target)
    return getattr(node.target, "__name__", str(node.target))


def analyse_channels(traced: Traced, pin_io: bool = True) -> ChannelGraph:
    """Group the channels of every conv/linear/norm of ``traced`` into coupled groups.

    Args:
        traced: the traced model.
        pin_io: mark the model's input and output groups fixed (off when analysing one block of a model).

    Raises:
        UnsupportedOpError: a node whose effect on channels is not known (register a rule for it).
    """
    ctx = RuleContext(traced, pin_io)
    for node in traced.graph.nodes:
        desc = _visit(ctx, node)
        if desc is not None:
            ctx.descs[node] = desc
        if is_summary(ctx, node):
            ctx.summaries.add(node)
    return _collect(ctx)


# ops that give a summary spatial extent again: it is no longer one value per channel
_SPREADS: tuple[Any, ...] = (F.interpolate, "expand", "expand_as", "repeat", "tile", torch.tile, "broadcast_to",
                             torch.broadcast_to, F.pad)
_SPREAD_MODULES: tuple[type[nn.Module], ...] = (nn.Upsample, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                                nn.ConvTranspose3d, *_PADS)


def is_summary(ctx: RuleContext, node: fx.Node) -> bool:
    """Whether ``node`` holds a global summary of a map, whatever the input size: a global pool
    (:func:`_global_pool`), or an op whose tensor inputs are all summaries and that does not spread them out again
    (a conv, Linear, activation, view or arithmetic on pooled values: SE's squeeze and excitation)."""
    if _global_pool(ctx, node):
        return True
    if node.op == "call_module":
        if isinstance(ctx.traced.module(node), _SPREAD_MODULES):
            return False
    elif node.op in ("call_function", "call_method") and _in(node.target, _SPREADS):
        return False
    tensors = [a for a in node.all_input_nodes
               if a in ctx.descs or a in ctx.multi or a in ctx.grouped or a in ctx.summaries]
    return bool(tensors) and all(a in ctx.summaries for a in tensors)


def _global_pool(ctx: RuleContext, node: fx.Node) -> bool:
    """An op that pools its whole map into one value per channel by what the graph says, not by the traced size:
    an adaptive pool to 1, a ``mean``/``sum``/``amax`` over every spatial dim, a pool whose window is read from its
    input's own shape (``F.avg_pool2d(x, x.size()[2:])``), a pooling module whose window is its whole map
    (``nn.AvgPool2d(7)`` on a 7x7 map: :func:`_whole_map`)."""
    if node.op == "call_module":
        module = ctx.traced.module(node)
        if isinstance(module, _WINDOW_POOLS):  # a window written for the base size: global if it is the whole map
            src = ctx.input_node(node)
            return ctx.traced.has_shape(src) and _whole_map(module, ctx.spatial(src))
        return isinstance(module, _ADAPTIVE_POOLS) and _all_ones(module.output_size)
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    src = node.args[0]
    if not ctx.traced.has_shape(src):
        return False
    if _in(node.target, _ADAPTIVE_FUNCTIONS):
        return _all_ones(_arg(node, 1, "output_size"))
    if _in(node.target, _WINDOW_FUNCTIONS):
        kernel = _arg(node, 1, "kernel_size")
        return _reads_shape_of(kernel, src)
    if _in(node.target, _REDUCTIONS):
        arg = _arg(node, 1, "dim")
        dims = [arg] if isinstance(arg, int) else list(arg) if isinstance(arg, (list, tuple)) else []
        if not dims or not all(isinstance(d, int) for d in dims):
            return False
        ndim, c = len(ctx.shape(src)), ctx.channel_dim(src)
        spatial = set(range(ndim)) - {0, c}
        return bool(spatial) and {int(d) % ndim for d in dims} == spatial
    return False


def _whole_map(pool: nn.Module, size: tuple[int, ...]) -> bool:
    """Whether a fixed-window pool (``nn.AvgPool2d(7)`` on ResNet's 7x7 map) takes its whole map, unpadded: a global
    pool written for one input size, which the resolution pass keeps global at any other
    (:func:`compscale.rewrite.resolution.follow_global_pools`)."""
    def dims(v: Any) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * len(size)

    dilation = getattr(pool, "dilation", 1)
    return (bool(size) and dims(pool.kernel_size) == size and not any(dims(pool.padding))
            and all(d == 1 for d in dims(dilation)))


def _in(target: Any, targets: Sequence[Any]) -> bool:
    try:
        return any(target is t or (isinstance(t, str) and target == t) for t in targets)
    except TypeError:
        return False


def _all_ones(size: Any) -> bool:
    """An adaptive pool's output size of one value (``1``, ``(1, 1)``; ``None`` keeps a dim: not global)."""
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (list, tuple)) and bool(size) and all(d == 1 for d in size)


def _reads_shape_of(arg: Any, src: fx.Node, depth: int = 4) -> bool:
    """Whether ``arg`` (a pool's window) is computed from ``src``'s own ``size()``/``shape``."""
    nodes = [a for a in (arg if isinstance(arg, (list, tuple)) else (arg,)) if isinstance(a, fx.Node)]
    for n in nodes:
        if (n.target in ("size", "shape") or (n.target is getattr and n.args[1:2] == ("shape",))) and n.args[0] is src:
            return True
        if depth and _reads_shape_of(list(n.args), src, depth - 1):
            return True
    return False


def _visit(ctx: RuleContext, node: fx.Node) -> Desc | None:
    ctx.current = node
    if node.op == "output":
        if ctx.pin_io:
            for out in ctx.traced.output_nodes:
                ctx.pin(ctx.desc(out), "model output")
        return None
    if node.op == "get_attr" or _is_attr_view(ctx, node):  # a tensor attribute, or a view of one (p[:, None, None])
        ctx.attrs[node] = ctx.attrs[ctx.input_node(node)] if node.op != "get_attr" else node
        return None
    attr = next((a for a in node.all_input_nodes if a in ctx.attrs), None)
    if attr is not None and not _reads_attr(node):
        ctx.unsupported(node, f"it reads the tensor attribute {ctx.attrs[attr].target!r}: compscale follows tensor "
                        "attributes only as per-channel scales and offsets (`p * x`, `x + p`), and layer_norm weights",
                        f"make the module that owns it ({module_path(node) or 'the model'!r}) a leaf with "
                        "`leaf_modules=[ThatModule]` and tell compscale how it maps channels with "
                        "`compscale.register_channel_rule(ThatModule, rule)`.")
    if node.op in ("call_function", "call_method") and node.target in _MULTI_OUTPUT:
        frule = get_function_rule(node)
        assert frule is not None
        frule(ctx, node)  # records ctx.multi[node]
        return None
    if node.op == "call_module" and splits_channels(node, ctx.traced.module(node)):  # an octave conv's maps
        module = ctx.traced.module(node)
        rule = get_module_rule(module)
        if rule is None or rule(ctx, node, module) is not None or node not in ctx.multi:
            ctx.unsupported(node, f"{type(module).__name__} returns several maps and its rule does not follow them")
        return None
    if not ctx.traced.has_shape(node) or len(ctx.shape(node)) < 2:
        return None  # shapes, sizes, scalars: no channels
    if node.op == "placeholder":
        return ctx.new_space(node, ctx.channels(node), fixed_reason="model input" if ctx.pin_io else None)
    args: tuple[nn.Module, ...] = ()
    if node.op == "call_module":
        module = ctx.traced.module(node)
        rule, args, what = get_module_rule(module), (module,), f"module type {type(module).__name__}"
    else:
        rule, what = get_function_rule(node), f"{node.op} {_target_name(ctx.traced, node)}"
    desc = probed_rule(ctx, node) if rule is None else rule(ctx, node, *args)  # a registered rule wins over probing
    if rule is None and desc is None:
        ctx.unsupported(node, f"no channel rule for {what}")
    if desc is None:  # a view the rule tracks itself (a channel shuffle's grouped view)
        return None
    if node not in ctx.cdim:
        _inherit_channel_dim(ctx, node)
    if ctx.width(desc) != ctx.channels(node):
        ctx.unsupported(node, f"its rule gives {ctx.width(desc)} channels but the tensor has {ctx.channels(node)}")
    return desc


def _reads_attr(user: fx.Node) -> bool:
    """Whether ``user``'s rule accounts for tensor attributes among its arguments."""
    return user.op in ("call_function", "call_method") and user.target in _ATTR_READERS


def _is_attr_view(ctx: RuleContext, node: fx.Node) -> bool:
    """A view of a tensor attribute: ``p[:, None, None]``, ``p.reshape(1, -1, 1, 1)``, ``p.unsqueeze(-1)``."""
    return (node.op in ("call_function", "call_method") and node.target in _ATTR_VIEWS and bool(node.args)
            and isinstance(node.args[0], fx.Node) and node.args[0] in ctx.attrs)


def _inherit_channel_dim(ctx: RuleContext, node: fx.Node) -> None:
    """A node keeps the channel dimension of its first tensor input when it keeps its number of dimensions."""
    src = next((a for a in node.all_input_nodes if a in ctx.descs), None)
    if src is not None and ctx.channel_dim(src) != 1 and len(ctx.shape(src)) == len(ctx.shape(node)):
        ctx.cdim[node] = ctx.channel_dim(src)


def _collect(ctx: RuleContext) -> ChannelGraph:
    uf = ctx.uf
    roots = sorted({uf.find(s) for s in range(len(uf.parent))})
    index = {r: i for i, r in enumerate(roots)}

    def gid(space: int) -> int:
        return index[uf.find(space)]

    groups = [ChannelGroup(i, uf.size[r]) for i, r in enumerate(roots)]
    for s, why in ctx.fixed.items():
        groups[gid(s)].fixed = groups[gid(s)].fixed or why
    for s, d, why in ctx.divisors:
        groups[gid(s)].divisors.setdefault(d, why)
    roles: dict[str, dict[str, tuple[int, ...]]] = {"norm": {}, "depthwise": {}}  # path -> its groups, per role
    for s, path, role in ctx.members:
        groups[gid(s)].members.append((path, role))
        if role in roles:
            roles[role][path] = (*roles[role].get(path, ()), gid(s))
    layers = {}
    for path, (src, out) in ctx.layers.items():
        layers[path] = LayerChannels(path, tuple((gid(s), f) for s, f in src), gid(out[0][0]), path in ctx.pooled)
        groups[gid(out[0][0])].producers.append(path)
    ties = [(gid(a), gid(b), k) for a, b, k in ctx.ties]
    node_groups = {n.name: tuple(gid(s) for s, _ in d) for n, d in ctx.descs.items()}
    params = {t: (dim, tuple(gid(s) for s, _ in d)) for t, (dim, d) in ctx.params.items()}
    channel_dims = {n.name: c for n, c in ctx.cdim.items() if c != 1}
    shape_owners = {path: tuple(gid(s) for s, _ in d) for path, d in ctx.shape_owners.items()}
    parts = [Part(gid(p), gid(w), i, sizes) for p, w, i, sizes in ctx.parts]
    sums: dict[int, tuple[int, ...]] = {}
    for s, pieces in ctx.sums.items():
        groups_of = tuple(gid(p) for p, _ in ctx.refine(pieces))
        if sums.setdefault(gid(s), groups_of) != groups_of:
            members = ", ".join(p for p, _ in groups[gid(s)].members[:3])
            raise UnsupportedOpError(f"the channels of {members or 'a tensor'} are cut in pieces in two different "
                                     "ways", "cut a tensor's channels at one place, or register a rule for the "
                                     "module that cuts them.")
    literals = [SizeLiteral(path, name, tuple(tuple((gid(s), f) for s, f in e) for e in entries), is_list,
                            value is not None, value) for path, name, entries, is_list, value in ctx.literals]
    _fix_followers(groups, ties, parts, sums)
    outputs = tuple(dict.fromkeys(gid(s) for out in ctx.traced.output_nodes if out in ctx.descs
                                  for s, _ in ctx.descs[out]))
    return ChannelGraph(groups, layers, roles["norm"], roles["depthwise"], ties, node_groups, params, channel_dims,
                        shape_owners, parts, sums, literals, {(gid(a), gid(b)) for a, b in ctx.interleaved},
                        ctx.sliding, outputs)
