"""Stage analysis: find the blocks of a traced network and group them into stages.

A *block* is a module whose nodes form a single-entry, single-exit region of the graph: one tensor
is live where it starts and one where it ends. Blocks that add their own input back (an identity
residual, stride 1, in == out) are *repeats*; the module types of repeats are the network's block
types. A *stage* is a run of consecutive blocks of one type whose blocks after the first are repeats.
A block of a block type that no repeat follows is a one-block stage.

Example:
    >>> from torchvision.models import resnet50
    >>> from compscale.trace import trace
    >>> print(find_stages(trace(resnet50())))  # doctest: +NORMALIZE_WHITESPACE
    stage   blocks  block type  in -> out ch   stride  first .. last
    layer1       3  Bottleneck    64 -> 256         1  layer1.0 .. layer1.2
    ...
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import torch.fx as fx
from torch import nn

from compscale.analyse.ops import OpKind, is_add, is_residual_add, op_kind
from compscale.trace import Traced, module_path

__all__ = ["Block", "Stage", "StageTable", "cut_points", "find_blocks", "find_stages"]



@dataclasses.dataclass(frozen=True)
class Block:
    """A single-entry, single-exit module of the graph.

    Attributes:
        path: the module's qualified name.
        type_name: its class name.
        entry: name of the node feeding the block; exit: name of the block's output node.
        in_shape, out_shape: ``(N, C, H, W)`` at the traced input size.
        residual: ``"identity"`` (adds its own input), ``"concat"`` (concatenates it: a dense layer, a channel
            split), ``"projection"`` (adds a transformed input), ``"dense"`` (a layer of a dense block that does the
            concatenating itself: ``entry`` is the concatenation the layer reads, ``exit`` the new channels it
            returns) or ``None``.
        layers: for a *run* (a unit of a flat container such as torchvision VGG's ``features``: a conv and the
            layers after it up to the next conv or downsampling), the paths of its layers; ``path`` is the first's.
            Empty for a module.
    """

    path: str
    type_name: str
    module_type: type
    entry: str
    exit: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    residual: str | None
    layers: tuple[str, ...] = ()

    @property
    def last_path(self) -> str:
        """The block's path, or a run's last layer's."""
        return self.layers[-1] if self.layers else self.path

    @property
    def keeps_shape(self) -> bool:
        """Stride 1 and in == out: a plain network repeats such a unit whether or not it carries its input."""
        return self.in_shape == self.out_shape

    @property
    def stride(self) -> int:
        if len(self.in_shape) < 3 or self.out_shape[2] == 0:
            return 1
        return max(1, round(self.in_shape[2] / self.out_shape[2]))

    @property
    def out_channels(self) -> int:
        """Channels after the block: its output's, or for a ``"dense"`` layer its input's and output's together."""
        return self.in_shape[1] + self.out_shape[1] if self.residual == "dense" else self.out_shape[1]

    @property
    def growth(self) -> int:
        """Channels the block adds to its input."""
        return self.out_channels - self.in_shape[1]

    @property
    def grows(self) -> bool:
        """A dense layer: its new channels are concatenated to its input, same spatial size (``cat([x, f(x)])``)."""
        return (self.residual in ("concat", "dense") and self.in_shape[2:] == self.out_shape[2:]
                and self.growth > 0)

    @property
    def is_repeat(self) -> bool:
        """Stride 1, in == out, merging its input back: a block that can be repeated as is."""
        return self.residual in ("identity", "concat") and self.in_shape == self.out_shape


@dataclasses.dataclass
class Stage:
    """Consecutive blocks of one type whose blocks after the first are repeats.

    In a *plain* network (no block merges its input back: VGG, MobileNetV1, RepVGG), a stage is the run of
    units of one type at one resolution, and its units after the first need not carry their input.
    """

    index: int
    blocks: list[Block]
    whole_parent: bool = False  # the blocks are all the children of their parent module
    concat: str | None = None  # a dense block's own output: the concatenation of its input and all its layers
    plain: bool = False  # units of a plain network: a stride-1 unit with in == out is a repeat without a residual

    @property
    def exit(self) -> str:
        """The node holding the stage's output."""
        return self.concat or self.blocks[-1].exit

    @property
    def name(self) -> str:
        """The parent module when the stage is all of it (``layer1``), else the blocks' paths."""
        if self.whole_parent:
            return self.parent
        first, last = self.blocks[0].path, self.blocks[-1].last_path
        return first if first == last else f"{first}..{last}"

    @property
    def parent(self) -> str:
        return _parent(self.blocks[-1].path)

    @property
    def in_channels(self) -> int:
        return self.blocks[0].in_shape[1]

    @property
    def out_channels(self) -> int:
        return self.blocks[-1].out_channels

    @property
    def stride(self) -> int:
        return self.blocks[0].stride

    @property
    def grows(self) -> bool:
        """A dense block: each block adds channels, so every new block is synthesized for its own input width.
        Its first block may be a projection that opens it (DPN's strided block)."""
        return all(b.grows for b in self.blocks[1:]) and (self.blocks[0].grows or len(self.blocks) > 1)

    @property
    def repeat(self) -> Block | None:
        """The block new blocks copy: the stage's last block if it is a repeat, else ``None`` (synthesize one)."""
        last = self.blocks[-1]
        return last if last.is_repeat or (self.plain and last.keeps_shape) else None


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


@dataclasses.dataclass
class StageTable:
    """All stages of a network, printable as a table."""

    stages: list[Stage]
    blocks: list[Block]

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.stages)

    def __getitem__(self, i: int) -> Stage:
        return self.stages[i]

    def __str__(self) -> str:
        rows = [("stage", "blocks", "block type", "in -> out ch", "stride", "first .. last")]
        for s in self.stages:
            first, last = s.blocks[0].path, s.blocks[-1].last_path
            rows.append((s.name, str(len(s.blocks)), s.blocks[0].type_name, f"{s.in_channels:>5} -> {s.out_channels}",
                         str(s.stride), first if first == last else f"{first} .. {last}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cut_points(nodes: Sequence[fx.Node]) -> set[int]:
    """Positions after which exactly one value of the graph is still needed (constants aside).

    A value that is only returned (a backbone's intermediate feature maps, gathered in a dict) is not needed
    by what follows it, so the stages after it are still single-entry.
    """
    pos = {n: i for i, n in enumerate(nodes)}
    cuts = set()
    live_until = -1
    first = next((n for n in nodes if n.op == "placeholder"), None)
    for i, n in enumerate(nodes):
        if n.op == "placeholder" and n is not first:
            continue  # another input of the forward (a mask, a condition) is there all along, like a constant
        if live_until <= i:
            cuts.add(i)  # nothing before i is used after i
        users = [u for u in n.users if u.op != "output"]
        if n.op != "get_attr" and users:
            live_until = max(live_until, max(pos.get(u, len(nodes)) for u in users))
    return cuts


def find_blocks(traced: Traced) -> list[Block]:
    """Every single-entry, single-exit module region of the graph that contains more than one op."""
    nodes = _data_nodes(traced)
    cuts = cut_points(nodes)
    spans: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            continue
        path = module_path(n)
        parts = path.split(".") if path else []
        for k in range(1, len(parts) + (0 if n.op == "call_module" else 1)):
            spans.setdefault(".".join(parts[:k]), []).append(i)
    pos = {n: i for i, n in enumerate(nodes)}
    blocks = []
    for path, idx in spans.items():
        first, last = idx[0], idx[-1]
        if len(idx) < 2 or last - first + 1 != len(idx):
            continue
        if not (first - 1 in cuts and last in cuts) and not _bypassed(nodes, pos, first, last):
            continue
        entry, exit_ = nodes[first - 1], nodes[last]
        if not (traced.has_shape(entry) and traced.has_shape(exit_)):
            continue
        region = nodes[first:last + 1]
        module = traced.root.get_submodule(path)
        blocks.append(Block(path, type(module).__name__, type(module), entry.name, exit_.name,
                            tuple(traced.shape(entry)), tuple(traced.shape(exit_)), _residual(traced, region, entry)))
    return blocks


def _bypassed(nodes: Sequence[fx.Node], pos: dict[fx.Node, int], first: int, last: int) -> bool:
    """Whether ``nodes[first:last + 1]`` reads only the node before it and hands on only its last node, while
    other values pass around it: the half of a cross-stage-partial split that skips the stage's blocks
    (``xs, xb = x.split(...); xb = self.blocks(xb); cat([xs, xb])``), or the input a residual adds back later."""
    if first < 1:
        return False
    for n in nodes[first:last + 1]:
        if any(a.op not in ("get_attr", "placeholder") and not first - 1 <= pos.get(a, -1) <= last
               for a in n.all_input_nodes):
            return False
        if n is not nodes[last] and any(u.op != "output" and pos.get(u, len(nodes)) > last for u in n.users):
            return False
    return True


def _data_nodes(traced: Traced) -> list[fx.Node]:
    """The graph's nodes but its output and constants (get_attr: a layer scale, a norm's weight used functionally),
    which carry no data flow."""
    return [n for n in traced.graph.nodes if n.op not in ("output", "get_attr")]


def _residual(traced: Traced, region: Sequence[fx.Node], entry: fx.Node) -> str | None:
    """How the region merges its input back into its output.

    ``"identity"``: an add (or a concat: ``"concat"``) of the input, reached through parameter-free ops only
    (an ``nn.Identity`` shortcut, a channel split), with a branch computed by layers. ``"projection"``: both
    operands of the region's last add go through layers (a 1x1-conv shortcut).
    """
    free, layered = {entry}, set()
    kind = None
    for n in region:
        inputs = [a for a in n.all_input_nodes if a in free or a in layered]
        if not inputs:
            continue
        if any(a in layered for a in inputs) or _has_params(traced, n):
            layered.add(n)
        else:
            free.add(n)
        is_cat = op_kind(n) is OpKind.CAT
        operands = n.args[0] if is_cat else n.args[:2]
        if is_add(n) or is_cat:
            ops = [a for a in operands if isinstance(a, fx.Node)] if isinstance(operands, (list, tuple)) else []
            if any(a in free for a in ops) and any(a in layered for a in ops):
                kind = "concat" if is_cat else "identity"
    if kind is not None:
        return kind
    adds = [n for n in region if is_residual_add(n)]
    return "projection" if adds and _reaches(entry, adds[-1], set(region)) else None


def _has_params(traced: Traced, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    return any(True for _ in traced.gm.get_submodule(str(node.target)).parameters())


def _reaches(src: fx.Node, dst: fx.Node, region: set[fx.Node]) -> bool:
    """Whether ``dst`` has two disjoint-looking routes from ``src``: both of its operands depend on ``src``."""
    def depends(n: fx.Node) -> bool:
        stack, seen = [n], set()
        while stack:
            cur = stack.pop()
            if cur is src:
                return True
            if cur in seen or cur not in region:
                continue
            seen.add(cur)
            stack.extend(a for a in cur.all_input_nodes)
        return False

    return all(isinstance(a, fx.Node) and depends(a) for a in dst.args[:2])


StageFilter = Sequence[str] | Callable[[str], bool]


def find_stages(traced: Traced, stages: StageFilter | None = None) -> StageTable:
    """Group the network's blocks into stages.

    Args:
        traced: the traced model.
        stages: restrict depth scaling to some blocks: module paths (a block, or a container of blocks),
            or a predicate on a block's path (``lambda path: path.startswith("layer")``).
    """
    all_blocks = find_blocks(traced)
    block_types = {b.module_type for b in all_blocks
                   if (b.is_repeat or b.grows) and _innermost_residual(b, all_blocks)}
    if not block_types:
        return _plain_stages(traced, all_blocks, stages)
    candidates = [b for b in _outermost([b for b in all_blocks if b.module_type in block_types])
                  if _wanted(b.path, stages)]
    result: list[Stage] = []
    for b in candidates:
        cur = result[-1] if result else None
        joins = (cur is not None and (b.is_repeat or (b.grows and (cur.grows or _opens(cur))))
                 and cur.blocks[-1].exit == b.entry
                 and b.module_type is cur.blocks[0].module_type and _parent(b.path) == cur.parent)
        if joins and cur is not None:
            cur.blocks.append(b)
        else:
            result.append(Stage(len(result), [b]))
    # a lone growing block repeats as its layers when it concatenates them itself (torchvision's _DenseBlock);
    # otherwise it has no layer granularity: adding a copy would add a whole dense block, not layers
    result = [s for s in (_dense_stage(traced, s.blocks[0]) if s.grows and len(s.blocks) == 1 else s for s in result)
              if s is not None]
    lone = [s for s in _lone_stages(traced, result, all_blocks) if _wanted(s.blocks[0].path, stages)]
    if lone:
        order = {n.name: i for i, n in enumerate(traced.graph.nodes)}
        result = sorted(result + lone, key=lambda s: order[s.blocks[0].entry])
    for i, s in enumerate(result):
        s.index = i
    for s in result:
        s.whole_parent = _is_whole_parent(traced, s)
    return StageTable(result, all_blocks)


def _plain_stages(traced: Traced, blocks: list[Block], stages: StageFilter | None) -> StageTable:
    """The stages of a network none of whose blocks merges its input back (VGG, MobileNetV1, RepVGG, LCNet).

    Its units are the modules of a type that its containers hold several of (:func:`_module_units`), else the
    runs of layers of a flat container (:func:`_flat_units`); a depthwise-only unit joins the next one.
    Consecutive units of one type and one parent form a stage while the resolution stays: each unit after the
    first has stride 1, and runs of a flat container also have the same layers (:func:`_signature`).
    """
    module_units = _module_units(traced, blocks)
    found = module_units or _flat_units(traced, blocks)
    units = [u for u in _attach_depthwise(traced, found) if _wanted(u.path, stages)]
    result: list[Stage] = []
    for u in units:
        cur = result[-1] if result else None
        if (cur is not None and cur.blocks[-1].exit == u.entry and u.module_type is cur.blocks[0].module_type
                and _parent(u.path) == cur.parent and u.in_shape[2:] == u.out_shape[2:]
                and (bool(module_units) or _signature(traced, u) == _signature(traced, cur.blocks[-1]))):
            cur.blocks.append(u)
        else:
            result.append(Stage(len(result), [u], plain=True))
    for s in result:
        s.whole_parent = _is_whole_parent(traced, s)
    return StageTable(result, [*blocks, *(u for u in units if u.layers)])


def _attach_depthwise(traced: Traced, units: list[Block]) -> list[Block]:
    """Units whose convolutions are all depthwise joined to the unit after them: a depthwise conv mixes no
    channels, so it is half a unit (Hugging Face's MobileNetV1 keeps its depthwise and pointwise convs as
    separate layers of one list; a flat ``nn.Sequential`` has them as separate runs)."""
    result: list[Block] = []
    pending: list[Block] = []
    for u in units:
        if pending and pending[-1].exit != u.entry:
            result += pending
            pending = []
        pending.append(u)
        if not _depthwise_only(traced, u):
            result.append(pending[0] if len(pending) == 1 else _joined(pending))
            pending = []
    return result + pending


def _joined(parts: list[Block]) -> Block:
    paths = tuple(p for u in parts for p in (u.layers or (u.path,)))
    return Block(parts[0].path, "-".join(u.type_name for u in parts), parts[-1].module_type, parts[0].entry,
                 parts[-1].exit, parts[0].in_shape, parts[-1].out_shape, None, paths)


def _signature(traced: Traced, unit: Block) -> tuple[object, ...]:
    """What makes runs of a flat container alike: their layer types and their convs' kernels and depthwise-ness,
    not strides or widths (a flat MobileNetV1's stem conv is no depthwise-pointwise pair)."""
    layers = [traced.root.get_submodule(p) for p in unit.layers or (unit.path,)]
    return tuple((type(m).__name__, getattr(m, "kernel_size", None),
                  isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels)
                 for m in layers)


def _depthwise_only(traced: Traced, unit: Block) -> bool:
    convs = [m for p in unit.layers or (unit.path,) for m in traced.root.get_submodule(p).modules()
             if isinstance(m, nn.modules.conv._ConvNd)]
    return bool(convs) and all(c.groups > 1 and c.groups == c.in_channels == c.out_channels for c in convs)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _module_units(traced: Traced, blocks: Sequence[Block]) -> list[Block]:
    """The outermost blocks, held in containers, of a type with a convolution that containers hold several of
    (timm's ``DepthwiseSeparableConv`` in MobileNetV1, ``RepVggBlock`` with its identity-BN and 1x1 branches).

    A block alone of its type (a stem, a head) is not a unit; neither is a container itself.
    """
    def is_candidate(b: Block) -> bool:
        module = traced.root.get_submodule(b.path)
        parent = traced.root.get_submodule(_parent(b.path)) if "." in b.path else None
        return (len(b.in_shape) >= 3 and not isinstance(module, _CONTAINERS) and isinstance(parent, _CONTAINERS)
                and any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()))

    def holds_residual(b: Block) -> bool:  # a module with residual blocks inside is no plain unit
        return any(o.path.startswith(b.path + ".") and o.residual in ("identity", "concat") for o in blocks)

    candidates = [b for b in blocks if is_candidate(b) and not holds_residual(b)]
    counts = Counter(b.module_type for b in candidates)
    return _outermost([b for b in candidates if counts[b.module_type] >= 2])


def _flat_units(traced: Traced, blocks: Sequence[Block]) -> list[Block]:
    """The runs of layers of flat containers (torchvision VGG's ``features``): a run starts at a convolution and
    takes the layers after it that keep the resolution; a layer that downsamples (a pooling) belongs to no run."""
    units: list[Block] = []
    nodes = _data_nodes(traced)
    if isinstance(traced.root, nn.Sequential) and len(nodes) > 1 and traced.has_shape(nodes[-1]):
        whole = Block("", type(traced.root).__name__, type(traced.root), nodes[0].name, nodes[-1].name,
                      tuple(traced.shape(nodes[0])), tuple(traced.shape(nodes[-1])), None)
        blocks = [whole, *blocks]  # the model itself is the flat container
    for block in blocks:
        container = traced.root.get_submodule(block.path)
        if not isinstance(container, nn.Sequential) or any(True for m in container.children()
                                                           if next(m.children(), None) is not None):
            continue
        units += _runs(traced, block)
    return units


def _runs(traced: Traced, block: Block) -> list[Block]:
    nodes = _data_nodes(traced)
    names = [n.name for n in nodes]
    region = nodes[names.index(block.entry) + 1: names.index(block.exit) + 1]
    if any(n.op != "call_module" or len(n.all_input_nodes) != 1 for n in region):
        return []  # not a plain chain of layers
    runs: list[list[fx.Node]] = []
    prev = nodes[names.index(block.entry)]
    for n in region:
        if n.all_input_nodes[0] is not prev or not traced.has_shape(n):
            return []
        if isinstance(traced.module(n), nn.modules.conv._ConvNd):
            runs.append([n])
        elif tuple(traced.shape(n))[2:] != tuple(traced.shape(prev))[2:]:
            runs.append([])  # a downsampling layer ends the run
        elif runs and runs[-1]:
            runs[-1].append(n)
        prev = n
    units = []
    for run in (r for r in runs if r):
        entry = run[0].all_input_nodes[0]
        types = "-".join(type(traced.module(n)).__name__ for n in run)
        paths = tuple(str(n.target) for n in run)
        units.append(Block(paths[0], types, type(traced.module(run[0])), entry.name, run[-1].name,
                           tuple(traced.shape(entry)), tuple(traced.shape(run[-1])), None, paths))
    return units


def _opens(stage: Stage) -> bool:
    """A stage of one projection block, which growing blocks of its type may follow (DPN's first block of a stage)."""
    return len(stage.blocks) == 1 and stage.blocks[0].residual == "projection"


def _is_whole_parent(traced: Traced, stage: Stage) -> bool:
    """Whether the stage's blocks are all the children of their parent module."""
    return bool(stage.parent) and _children(traced, stage.parent) == [b.path for b in stage.blocks]


def _wanted(path: str, stages: StageFilter | None) -> bool:
    """Whether the ``stages=`` filter (paths of blocks or their containers, or a predicate) keeps a block."""
    if stages is None:
        return True
    if callable(stages):
        return bool(stages(path))
    return any(path == p or path.startswith(p + ".") for p in stages)


def _lone_stages(traced: Traced, stages: Sequence[Stage], blocks: Sequence[Block]) -> list[Stage]:
    """One-block stages known by their place: a container holding a single block, beside stage containers.

    timm's EfficientNet keeps each stage in a container of ``blocks``; the first holds one depthwise-separable
    block (32 -> 16 channels) of a type that never repeats, so no residual marks it. Its place does: it is a
    stage as its siblings are, and deepens as they do (a synthesized repeat, as for any one-block stage).
    """
    whole = {s.parent for s in stages if _is_whole_parent(traced, s)}
    by_path = {b.path: b for b in blocks}
    taken = {b.path for s in stages for b in s.blocks}
    found = []
    for outer in sorted({_parent(p) for p in whole}):
        for child in _children(traced, outer):
            kids = _children(traced, child) if child not in whole else []
            if len(kids) != 1 or kids[0] not in by_path or kids[0] in taken:
                continue
            if next(traced.root.get_submodule(kids[0]).children(), None) is None:
                continue  # a single layer, not a block
            found.append(Stage(0, [by_path[kids[0]]]))
    return found


def _dense_stage(traced: Traced, block: Block) -> Stage | None:
    """The stage of ``block``'s layers, if it is a dense block that does the concatenating itself, else ``None``.

    Such a block (torchvision's ``_DenseBlock``: ``features.append(layer(features))``, then ``cat(features)``) has
    children that, called once each in their order, read the concatenation of the block's input and every earlier
    child's output (concatenated in the child or in the block), and returns the concatenation of its input and all
    of them. Each child becomes a ``"dense"`` block: entry = the concatenation it reads, exit = its output.
    """
    nodes = _data_nodes(traced)
    names = [n.name for n in nodes]
    first, last = names.index(block.entry) + 1, names.index(block.exit)
    entry, exit_ = nodes[first - 1], nodes[last]
    spans = _child_spans(nodes[first:last], block.path)
    if spans is None or [p for p, _, _ in spans] != _children(traced, block.path):
        return None
    outputs: list[fx.Node] = []
    layers = []
    for path, concat, body in spans:
        if concat is None and not outputs:
            concat = entry  # the first child may read the block's input itself
        if concat is None or (concat is not entry and _cat_inputs(concat) != [entry, *outputs]):
            return None
        inside = set(body)
        if any(a not in inside and a is not concat for n in body for a in n.all_input_nodes):
            return None  # the child reads something besides the concatenation
        if any(u not in inside for n in body[:-1] for u in n.users) or not traced.has_shape(body[-1]):
            return None  # the child's output is not its last node
        outputs.append(body[-1])
        module = traced.root.get_submodule(path)
        layers.append(Block(path, type(module).__name__, type(module), concat.name, body[-1].name,
                            tuple(traced.shape(concat)), tuple(traced.shape(body[-1])), "dense"))
    if _cat_inputs(exit_) != [entry, *outputs] or not all(b.grows for b in layers):
        return None
    return Stage(0, layers, concat=exit_.name)


def _child_spans(region: Sequence[fx.Node], parent: str) -> list[tuple[str, fx.Node | None, list[fx.Node]]] | None:
    """``region`` cut into runs of nodes of one child of ``parent``: (child path, the concat before it, the rest).

    The concat a child reads is its first node (a ``cat`` in the child) or a ``cat`` in ``parent`` just before the
    run; ``None`` if ``parent`` runs any other op of its own, or a child's nodes are not one run.
    """
    spans: list[tuple[str, fx.Node | None, list[fx.Node]]] = []
    pending: fx.Node | None = None
    prefix = parent + "."
    for n in region:
        path = module_path(n)
        if not path.startswith(prefix):
            if op_kind(n) is not OpKind.CAT or pending is not None:
                return None
            pending = n
            continue
        child = prefix + path[len(prefix):].split(".")[0]
        if spans and spans[-1][0] == child and pending is None:
            spans[-1][2].append(n)
        elif any(p == child for p, _, _ in spans):
            return None
        elif pending is None and op_kind(n) is OpKind.CAT:
            spans.append((child, n, []))
        else:
            spans.append((child, pending, [n]))
            pending = None
    return None if pending is not None or any(not body for _, _, body in spans) else spans


def _cat_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The tensors a channel concatenation (``torch.cat(..., 1)`` of 4-d tensors) joins, else ``None``."""
    if op_kind(node) is not OpKind.CAT or not node.args or not isinstance(node.args[0], (list, tuple)):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    tensors = list(node.args[0])
    if dim not in (1, -3) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    return tensors


def _innermost_residual(block: Block, blocks: Sequence[Block]) -> bool:
    """True unless a smaller repeatable residual block sits inside ``block`` (then that one is the repeat unit).

    A smaller block that adds a transformed input to itself but repeats nothing (ConvNeXt-V2's GRN,
    ``gamma * (x * n) + beta + x``, which the layer's own residual input bypasses) does not count.
    """
    return not any(o.path.startswith(block.path + ".") and o.residual and (o.is_repeat or o.grows) for o in blocks)


def _outermost(blocks: list[Block]) -> list[Block]:
    paths = [b.path for b in blocks]
    return [b for b in blocks if not any(b.path.startswith(p + ".") for p in paths if p != b.path)]


def _children(traced: Traced, parent: str) -> list[str]:
    mod = traced.root.get_submodule(parent) if parent else traced.root
    prefix = parent + "." if parent else ""
    return [prefix + name for name, _ in mod.named_children()]
