"""Stage analysis: find the blocks of a traced network and group them into stages.

A *block* is a module whose nodes form a single-entry, single-exit region of the graph: one tensor
is live where it starts and one where it ends. Blocks that add their own input back (an identity
residual, stride 1, in == out) are *repeats*; the module types of repeats are the network's block
types. A *stage* is a run of consecutive blocks of one type whose blocks after the first are repeats.
A block of a block type that no repeat follows is a one-block stage.

A unit is repeated only where the model shows it is repeatable, and each stage records how (``Stage.evidence``):
``"repeats"`` (a residual block, a dense layer, or a run of two or more units with one signature), ``"class"`` (a
lone unit of a kind that the network repeats elsewhere: EfficientNet's one-block MBConv stages, VGG's one-conv
stages) or, on a weaker signal (``Stage.guessed``), ``"place"`` (a lone block known by its container's place among
stage containers) and ``"lone"`` (a lone run of a flat container that nothing else repeats, whose stride-1 copy keeps
its shape). A container is looked into, not copied: a generic container is known by its children's types, a
residual block wrapped with parameter-free layers (``Sequential(ConcatTable, CAddTable, ReLU)``) is the wrapper, and
a module that only chains units of a list is no unit. The unit that first takes the raw input (a stem) is no stage of
a network whose stages are blocks.

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
from typing import Literal

import torch.fx as fx
from torch import nn

from compscale.analyse.ops import OpKind, is_add, is_residual_add, op_kind
from compscale.trace import Traced, module_path

__all__ = ["GUESSED", "Block", "Evidence", "Stage", "StageTable", "cat_inputs", "cut_points", "find_blocks",
           "find_stages"]

Evidence = Literal["repeats", "class", "place", "lone"]
GUESSED: tuple[Evidence, ...] = ("place", "lone")  # what is decided on a weaker signal than a repeat of the model's


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
        signature: for a generic container (``nn.Sequential``...), its children's class names: what tells a
            residual unit built of containers from the container of the whole network. Empty for other modules.
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
    signature: tuple[str, ...] = ()

    @property
    def kind(self) -> tuple[type, tuple[str, ...]]:
        """What makes two blocks of one kind: their class, and for generic containers their children's classes."""
        return self.module_type, self.signature

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
    evidence: Evidence = "repeats"  # what shows that the stage's unit is repeatable (see the module docstring)
    taps: bool = False  # the blocks' outputs are also concatenated after the stage (a C2f/CSP block's bottlenecks)

    @property
    def guessed(self) -> bool:
        """Whether the stage was found on a weaker signal than a repeat of the model's own (``"place"``, ``"lone"``)."""
        return self.evidence in GUESSED

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
        # the evidence column when a stage has other evidence than its own repeats (a lone block, a guess)
        evidence = any(s.evidence != "repeats" for s in self.stages)
        rows = [("stage", "blocks", "block type", "in -> out ch", "stride", *(("evidence",) if evidence else ()),
                 "first .. last")]
        for s in self.stages:
            first, last = s.blocks[0].path, s.blocks[-1].last_path
            why = (s.evidence + (" (guessed)" if s.guessed else ""),) if evidence else ()
            rows.append((s.name, str(len(s.blocks)), s.blocks[0].type_name, f"{s.in_channels:>5} -> {s.out_channels}",
                         str(s.stride), *why, first if first == last else f"{first} .. {last}"))
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
        path = _node_path(n)
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
        signature = tuple(type(c).__name__ for c in module.children()) if isinstance(module, _CONTAINERS) else ()
        blocks.append(Block(path, type(module).__name__, type(module), entry.name, exit_.name,
                            tuple(traced.shape(entry)), tuple(traced.shape(exit_)), _residual(traced, region, entry),
                            signature=signature))
    return blocks


def _node_path(node: fx.Node) -> str:
    """The module a node runs in, as :func:`~compscale.trace.module_path`, but for a layer shared by several modules
    (ultralytics' ``Conv.default_act``, one ``nn.SiLU`` for the whole network) the module that calls it: fx names
    such a layer by its first owner's path, which would put it outside the block it runs in."""
    path = module_path(node)
    if node.op == "call_module":
        stack = list(node.meta.get("nn_module_stack", {}).values())
        caller = str(stack[-2][0]) if len(stack) >= 2 else ""
        if caller and not path.startswith(caller + "."):
            return f"{caller}.{path.rpartition('.')[2]}"
    return path


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
    return node.op == "call_module" and next(traced.gm.get_submodule(str(node.target)).parameters(), None) is not None


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
            stack.extend(cur.all_input_nodes)
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
    wrapped = _wrapped(traced, all_blocks)
    units = [b for b in all_blocks if b.path not in wrapped]
    block_kinds = {b.kind for b in units if (b.is_repeat or b.grows) and _innermost_residual(b, units)}
    if not block_kinds:
        return _plain_stages(traced, all_blocks, stages)
    candidates = [b for b in _outermost([b for b in units if b.kind in block_kinds]) if _wanted(b.path, stages)]
    result: list[Stage] = []
    for b in candidates:
        cur = result[-1] if result else None
        joins = (cur is not None and (b.is_repeat or (b.grows and (cur.grows or _opens(cur))))
                 and cur.blocks[-1].exit == b.entry
                 and b.kind == cur.blocks[0].kind and _parent(b.path) == cur.parent)
        if joins and cur is not None:
            cur.blocks.append(b)
        else:
            result.append(Stage(len(result), [b]))
    # a lone growing block repeats as its layers when it concatenates them itself (torchvision's _DenseBlock);
    # otherwise it has no layer granularity: adding a copy would add a whole dense block, not layers
    result = [s for s in (_dense_stage(traced, s.blocks[0]) if s.grows and len(s.blocks) == 1 else s for s in result)
              if s is not None]
    for s in result:  # a stage without a repeat of its own is one of a kind that the network repeats elsewhere
        s.evidence = "repeats" if s.grows or any(b.is_repeat for b in s.blocks) else "class"
    lone = [s for s in _lone_stages(traced, result, all_blocks) if _wanted(s.blocks[0].path, stages)]
    if lone:
        order = {n.name: i for i, n in enumerate(traced.graph.nodes)}
        result = sorted(result + lone, key=lambda s: order[s.blocks[0].entry])
    for i, s in enumerate(result):
        s.index, s.whole_parent = i, _is_whole_parent(traced, s)
        s.taps = s.concat is None and _taps(traced, s)
    return StageTable(result, all_blocks)


def _wrapped(traced: Traced, blocks: Sequence[Block]) -> set[str]:
    """Paths of residual blocks that their parent module wraps: the wrapper is the unit.

    The parent merges its input back too, holds no other residual block, and runs nothing with parameters after the
    block: a module around it (pytorchcv's ``BamResUnit``, an attention module then the ``ResUnit``), or a generic
    container that adds parameter-free layers after it (torch7-converted nets:
    ``nn.Sequential(ConcatTable(branch, shortcut), CAddTable(), nn.ReLU())``). A container that only holds the block
    (a stage of one block) is not its unit.
    """
    nodes = _data_nodes(traced)
    pos = {n.name: i for i, n in enumerate(nodes)}
    by_path = {b.path: b for b in blocks}
    residual = [b for b in blocks if b.residual in ("identity", "concat", "projection")]
    found = set()
    for inner in residual:
        outer = by_path.get(_parent(inner.path))
        if outer is None or outer.residual is None or pos[outer.exit] < pos[inner.exit]:
            continue
        tail = nodes[pos[inner.exit] + 1:pos[outer.exit] + 1]
        if any(_has_params(traced, n) for n in tail):
            continue
        if isinstance(traced.root.get_submodule(outer.path), _CONTAINERS) and (not tail or outer.entry != inner.entry):
            continue
        if any(o is not inner and o.path.startswith(outer.path + ".") and not o.path.startswith(inner.path + ".")
               for o in residual):
            continue  # the parent holds several residual blocks: a stage, not a wrapper
        found.add(inner.path)
    return found


def _taps(traced: Traced, stage: Stage) -> bool:
    """Whether a channel concatenation after the stage reads a block's input and its output: the block list of a
    C2f/ELAN-style block (``y = [x]; y.extend(m(y[-1]) for m in self.m); cv2(cat(y))``), whose new blocks' outputs
    join the concatenation, so that the layer reading it takes more channels."""
    nodes = {n.name: n for n in traced.graph.nodes}
    for b in stage.blocks:
        for user in nodes[b.exit].users:
            inputs = cat_inputs(user)
            if inputs is not None and nodes[b.entry] in inputs:
                return True
    return False


def _plain_stages(traced: Traced, blocks: list[Block], stages: StageFilter | None) -> StageTable:
    """The stages of a network none of whose blocks merges its input back (VGG, MobileNetV1, RepVGG, Inception).

    Its units are the modules of a kind that its containers hold several of, or that the network chains one after
    another (:func:`_module_units`), else the runs of layers of a flat container (:func:`_flat_units`); a
    depthwise-only unit joins the next one. Consecutive units of one kind and one parent form a stage while the
    resolution stays: each unit after the first has stride 1, and runs of a flat container also have the same layers
    (:func:`_signature`). A stage is kept on evidence (:func:`_plain_evidence`).
    """
    module_units = _module_units(traced, blocks)
    found = module_units or _flat_units(traced, blocks)
    units = [u for u in _attach_depthwise(traced, found) if _wanted(u.path, stages)]
    result: list[Stage] = []
    for u in units:
        cur = result[-1] if result else None
        if (cur is not None and cur.blocks[-1].exit == u.entry and u.kind == cur.blocks[0].kind
                and _parent(u.path) == cur.parent and u.in_shape[2:] == u.out_shape[2:]
                and (bool(module_units) or _signature(traced, u) == _signature(traced, cur.blocks[-1]))):
            cur.blocks.append(u)
        else:
            result.append(Stage(len(result), [u], plain=True))
    result = _plain_evidence(traced, result, flat=not module_units)
    for i, s in enumerate(result):
        s.index, s.whole_parent = i, _is_whole_parent(traced, s)
    return StageTable(result, [*blocks, *(u for u in units if u.layers)])


def _plain_evidence(traced: Traced, stages: list[Stage], flat: bool) -> list[Stage]:
    """The plain stages kept, each with its evidence.

    ``"repeats"``: two units of the stage have one signature (:func:`_unit_signature`: the layers, kernels and
    paddings, not the widths or strides). ``"class"``: a unit of the stage has the signature of a unit of such a
    stage (VGG's one-conv stages), or, where no stage has two, of a unit of another stage (ResNeSt-14's one-block
    stages), unless it is the stem of a network of modules (it takes the raw input). Other stages are no stages, but
    for a flat container's lone run whose stride-1 copy keeps its input's shape (``"lone"``, guessed): nothing but its
    runs tells the units of a flat network.
    """
    signatures = [[_unit_signature(traced, b) for b in s.blocks] for s in stages]
    repeated = {sig for sigs in signatures for sig, n in Counter(sigs).items() if n >= 2}
    if not repeated:  # no stage repeats a unit: a unit that opens several stages is the network's (ResNeSt-14)
        repeated = {sig for sig, n in Counter(sig for sigs in signatures for sig in set(sigs)).items() if n >= 2}
    kept = []
    for s, sigs in zip(stages, signatures):
        if any(sigs.count(sig) >= 2 for sig in sigs):
            s.evidence = "repeats"
        elif any(sig in repeated for sig in sigs) and (flat or not _is_stem(traced, s.blocks[0])):
            s.evidence = "class"  # but a stem unit of a network of modules, which its stages follow
        elif flat and _keeps_shape_at_stride_1(traced, s.blocks[-1]):
            s.evidence = "lone"
        else:
            continue
        kept.append(s)
    return kept


def _unit_signature(traced: Traced, unit: Block) -> tuple[object, ...]:
    """What makes units alike: their kind, and their convs' kernels, dilations, paddings and depthwise-ness in order
    (not their widths or strides: a stage's first unit downsamples). Inception's ``Conv2d_2a_3x3`` (unpadded) and
    ``Conv2d_2b_3x3`` (padded) differ; ``Mixed_5b`` .. ``Mixed_5d`` do not."""
    convs = tuple((type(m).__name__, m.kernel_size, m.dilation, m.padding, m.groups > 1 and m.groups == m.in_channels)
                  for m in _convs(traced, unit))
    return (unit.kind if not unit.layers else _signature(traced, unit), convs)


def _keeps_shape_at_stride_1(traced: Traced, unit: Block) -> bool:
    """Whether every conv of the unit, at stride 1, keeps its input's size (``2 * padding == dilation * (k - 1)``):
    AlexNet's 11x11 stem (padding 2) does not, so a copy of it cannot follow it."""
    convs = _convs(traced, unit)
    return all(m.padding == "same" or (not isinstance(m.padding, str) and all(
        2 * pad == d * (k - 1) for pad, d, k in zip(m.padding, m.dilation, m.kernel_size))) for m in convs)


def _convs(traced: Traced, unit: Block) -> list[nn.modules.conv._ConvNd]:
    """The convolutions of a unit's module, or of a run's layers, in order."""
    return [m for p in unit.layers or (unit.path,) for m in traced.root.get_submodule(p).modules()
            if isinstance(m, nn.modules.conv._ConvNd)]


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
    convs = _convs(traced, unit)
    return bool(convs) and all(c.groups > 1 and c.groups == c.in_channels == c.out_channels for c in convs)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _module_units(traced: Traced, blocks: Sequence[Block]) -> list[Block]:
    """The outermost modules with a convolution that the network holds several of, one after another: held in
    containers (timm's ``DepthwiseSeparableConv`` in MobileNetV1, ``RepVggBlock`` with its identity-BN and 1x1
    branches) or chained by the forward (Inception's ``Mixed_6b`` .. ``Mixed_6e``).

    A unit starts and ends where a single tensor is live (not a branch of a multi-branch module); a block alone of its
    kind (a stem, a head) is not a unit; neither is a container, nor a module that only runs the units of its list
    one after another (a stage module whose ``forward`` loops over ``self.units``): that one is looked into.
    """
    nodes = _data_nodes(traced)
    cuts, pos = cut_points(nodes), {n.name: i for i, n in enumerate(nodes)}

    def is_candidate(b: Block) -> bool:
        module = traced.root.get_submodule(b.path)
        return (len(b.in_shape) >= 3 and not isinstance(module, _CONTAINERS) and pos[b.entry] in cuts
                and pos[b.exit] in cuts and any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules()))

    def holds_residual(b: Block) -> bool:  # a module with residual blocks inside is no plain unit
        return any(o.path.startswith(b.path + ".") and o.residual in ("identity", "concat") for o in blocks)

    pool = [b for b in blocks if is_candidate(b) and not holds_residual(b)]
    listed = [b for b in pool if "." in b.path and isinstance(traced.root.get_submodule(_parent(b.path)), _CONTAINERS)]
    chained = _chained(pool)
    candidates = [b for b in pool if (b in listed or b in chained) and not _runs_a_list(b, listed)]
    counts = Counter(b.kind for b in candidates)
    return _outermost([b for b in candidates if counts[b.kind] >= 2])


def _chained(blocks: Sequence[Block]) -> list[Block]:
    """The blocks that follow, or are followed by, a block of their kind under the same parent."""
    by_entry = {(b.entry, _parent(b.path), b.kind): b for b in blocks}
    found = []
    for b in blocks:
        nxt = by_entry.get((b.exit, _parent(b.path), b.kind))
        if nxt is not None:
            found += [b, nxt]
    return [b for b in blocks if b in found]


def _runs_a_list(block: Block, listed: Sequence[Block]) -> bool:
    """Whether ``block`` only runs units held in a container of its own, from its input to its output."""
    inner = {b.entry: b for b in listed if b.path.startswith(block.path + ".")}
    cur = inner.get(block.entry)
    while cur is not None and cur.exit != block.exit:
        cur = inner.get(cur.exit)
    return cur is not None


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
        if not isinstance(container, nn.Sequential) or any(
                next(m.children(), None) is not None for m in container.children()):
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
            if _is_stem(traced, by_path[kids[0]]):
                continue  # the stem (pytorchcv's ``features.init_block``), which the stages follow
            found.append(Stage(0, [by_path[kids[0]]], evidence="place"))
    return found


def _is_stem(traced: Traced, block: Block) -> bool:
    """Whether ``block`` first takes the raw input: its entry comes from the network's first input through
    parameter-free ops of one input each (TF-style padding, a normalisation of the image), or is it."""
    nodes = {n.name: n for n in traced.graph.nodes}
    node = nodes[block.entry]
    while node.op != "placeholder":
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if len(inputs) != 1 or _has_params(traced, node):
            return False
        node = inputs[0]
    return node is next(n for n in traced.graph.nodes if n.op == "placeholder")


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
        if concat is None or (concat is not entry and cat_inputs(concat) != [entry, *outputs]):
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
    if cat_inputs(exit_) != [entry, *outputs] or not all(b.grows for b in layers):
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
        path = _node_path(n)
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


def cat_inputs(node: fx.Node) -> list[fx.Node] | None:
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
