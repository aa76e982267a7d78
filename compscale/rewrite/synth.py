"""Synthesize the repeat block of a stage that has only one block.

A one-block stage (MobileNetV2's first and last, EfficientNet-B0's first and last) has no block that
can be repeated as is. Its repeat is what the block's constructor would build with input width = the
stage's output width, stride 1 and the residual on. From the graph alone: the block's subgraph is cut
out, its input channel group is re-widthed to the stage output (groups derived from it follow: an
inverted residual's hidden width stays ``t x in``, an SE squeeze keeps its ratio), strided layers get
stride 1, and the block gets an identity residual: a projection shortcut is replaced by the input
itself, or the input is added back after the tail a residual peer of the same type uses (its
stochastic-depth layer).

A dense stage's new layers (:func:`synthesize_dense`) are copies of its last layer, of its own class, whose
layers that read the input are rebuilt for the wider input each new layer reads.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import OrderedDict
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch.fx as fx
from torch import nn

from compscale.analyse.channels import ChannelGraph, analyse_channels
from compscale.analyse.ops import is_add, is_residual_add
from compscale.analyse.stages import Block, Stage
from compscale.errors import RewriteError
from compscale.layers import CHANNEL_LAYERS, channels, resize
from compscale.planning.policy import Derivation, derive, resolve_widths
from compscale.registry import drop_path_attr
from compscale.rewrite.init import InitRules
from compscale.rewrite.width import apply_widths
from compscale.trace import Traced
from compscale.trace.tracer import CompscaleTracer

__all__ = ["extract_block", "own_class_repeat", "synthesize_dense", "synthesize_repeat"]


def extract_block(traced: Traced, block: Block) -> fx.GraphModule:
    """The block's own subgraph as a ``GraphModule`` over a deep copy of the block module."""
    nodes = list(traced.graph.nodes)
    names = [n.name for n in nodes]
    region = nodes[names.index(block.entry) + 1: names.index(block.exit) + 1]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[names.index(block.entry)]: graph.placeholder("x")}
    prefix = block.path + "."
    for n in region:
        new = graph.node_copy(n, lambda a: env[a])
        if n.op in ("call_module", "get_attr"):
            new.target = str(n.target)[len(prefix):]
        env[n] = new
    graph.output(env[region[-1]])
    root = copy.deepcopy(traced.root.get_submodule(block.path))
    gm = fx.GraphModule(root, graph, class_name=block.type_name)
    # GraphModule rebuilds the hierarchy from plain nn.Modules in call order; keep the block's own
    # containers (Sequential, SqueezeExcitation, ...) in their order, so the copy reads like the original.
    gm._modules = OrderedDict(root.named_children())
    return gm


def synthesize_repeat(traced: Traced, stage: Stage, blocks: Sequence[Block], rules: InitRules | None) -> nn.Module:
    """The repeat block of a one-block ``stage`` (see the module docstring).

    Where the model has a residual block of the same class to learn from, the repeat is an instance of that
    class (:func:`own_class_repeat`); otherwise a ``GraphModule`` of the block's rewritten subgraph.
    """
    block = stage.blocks[-1]  # a one-block stage's, or a plain stage's last unit that widens (ReXNet)
    if block.layers:
        return _run_repeat(traced, block, rules)
    own = own_class_repeat(traced, block, blocks, rules, plain=stage.plain)
    if own is not None:
        return own
    if _mode_dependent(traced, block):
        raise RewriteError(
            f"cannot synthesize a repeat of {block.path}: {block.type_name}.forward takes other ops in training "
            "than in eval mode, and a repeat made from its graph would keep only the eval-mode ones",
            "give its class a residual flag (a stride-1, in == out instance of it), or leave this stage out "
            "with `stages=`.",
        )
    gm = extract_block(traced, block)
    _rewiden(traced, gm, block, rules, blocks)
    _unstride(gm)
    if not stage.plain:
        _make_identity_residual(gm, block, traced, blocks)
    return _finish(traced, gm, block, block.out_shape)


def _mode_dependent(traced: Traced, block: Block) -> bool:
    """Whether the block's ``forward`` records other ops in training mode than in eval mode (``if self.training:``):
    a ``GraphModule`` of its eval-mode graph would silently drop them. ``False`` when it cannot be traced alone."""
    module = copy.deepcopy(traced.root.get_submodule(block.path))
    graphs = []
    for mode in (True, False):
        module.train(mode)
        try:
            graph = CompscaleTracer(traced.leaf_modules).trace(module)  # under the trace lock, as every trace
        except Exception:
            return False
        graphs.append([(n.op, str(n.target), len(n.args)) for n in graph.nodes])
    return graphs[0] != graphs[1]


def _run_repeat(traced: Traced, block: Block, rules: InitRules | None) -> nn.Module:
    """The repeat of a run of layers (VGG's first conv of a stage, with its norm and activation): the same layers
    reading the run's output width, with stride 1, in an ``nn.Sequential`` whose children the caller inserts."""
    new = copy.deepcopy(nn.Sequential(*(traced.root.get_submodule(p) for p in block.layers)))
    _rewiden(traced, new, block, rules)
    _unstride(new)
    _check_maps(traced, new, block, block.out_shape, block.out_shape)
    return new


def own_class_repeat(traced: Traced, block: Block, blocks: Sequence[Block],
                     rules: InitRules | None, plain: bool = False) -> nn.Module | None:
    """The repeat of ``block`` as an instance of its own class, or ``None`` when none can be made.

    A copy of the block is re-widthed to map its output width to itself and loses its strides. Its residual is
    switched on as a residual peer of its class has it: the boolean attributes (of the block or of a
    submodule) where the two differ are tried, one at a time, then all together, and a candidate is kept when a
    trace shows that it adds its input back and maps the stage's output shape to itself (``use_res_connect`` in
    torchvision's ``MBConv``, ``has_skip`` in timm's, ``apply_dropout`` in Hugging Face's EfficientNet).

    In a ``plain`` network the peer is a stride-1 unit with in == out, residual or not, else the block itself
    (its constructor arguments are updated for the new input width), and the candidate must map the stage's
    output shape to itself, adding its input back only if the block or the peer does.
    """
    peer = next((b for b in blocks if b.module_type is block.module_type
                 and (b.is_repeat or (plain and b.keeps_shape))), None)
    template = traced.root.get_submodule(block.path)
    if peer is None:  # no residual block of its class: switch on a residual flag of its own (timm's has_skip)
        peer = block
        flags = [] if plain else _false_flags(template)
    else:
        flags = _differing_flags(template, traced.root.get_submodule(peer.path))
    try:
        base = copy.deepcopy(template)
        _rewiden(traced, base, block, rules, blocks)
    except Exception:
        return None
    _unstride(base)
    variants = [base]
    recorded = copy.deepcopy(base)
    if _record_new_args(recorded, traced.root.get_submodule(peer.path), block.in_shape[1], block.out_shape[1]):
        variants.insert(0 if plain else 1, recorded)  # a plain unit has no flags to try: its arguments first
    if plain:
        variants = _plain_variants(traced, block, peer, variants)
    elif block.residual == "projection":  # GhostNet's strided blocks: the shortcut becomes the identity
        variants += _dropped_shortcut(traced, block, variants)
    shape = block.out_shape
    subsets: list[list[tuple[str, str, bool]]] = [[f] for f in flags] + ([flags] if len(flags) > 1 else [])
    for variant in variants:
        none: list[list[tuple[str, str, bool]]] = [[]] if variant is not base or plain else []
        for subset in none + subsets:
            candidate = copy.deepcopy(variant)
            for path, name, value in subset:
                setattr(candidate.get_submodule(path) if path else candidate, name, value)
            if _adds_its_input(traced, candidate, shape, need_residual=not plain or bool(
                    {block.residual, peer.residual} & {"identity", "concat"})):
                return candidate
    return None


def _plain_variants(traced: Traced, block: Block, peer: Block, variants: list[nn.Module]) -> list[nn.Module]:
    """The candidates for a plain unit's repeat, most specific first: given the norm layers a stride-1 peer has
    (RepVGG's identity BatchNorm), then without the projection shortcut (ResNeSt's ``downsample``), then as is."""
    filled = [f for v in variants if (f := _with_peer_children(v, traced, peer, block)) is not None]
    dropped = _dropped_shortcut(traced, block, variants) if block.residual == "projection" else []
    return [*filled, *dropped, *variants]


def _dropped_shortcut(traced: Traced, block: Block, variants: list[nn.Module]) -> list[nn.Module]:
    """The variants with each child on the projection shortcut set to ``None`` or to an ``nn.Identity``."""
    children = _shortcut_children(traced, block)
    return [_without(v, name, empty) for v in variants for name in children for empty in (None, nn.Identity())]


_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # norms with their activation, as timm's BatchNormAct2d


def _with_peer_children(block: nn.Module, traced: Traced, peer: Block, source: Block) -> nn.Module | None:
    """A copy of ``block`` given the norm layers its peer has where it has ``None`` (RepVGG's identity BatchNorm,
    which only stride-1 blocks with in == out carry), resized to the block's width; ``None`` if there is none."""
    theirs = traced.root.get_submodule(peer.path)
    missing = [name for name, child in theirs._modules.items()
               if block._modules.get(name, getattr(block, name, 0)) is None and isinstance(child, _LAYERS)]
    if not missing:
        return None
    new = copy.deepcopy(block)
    width = source.out_shape[1]
    for name in missing:
        child = theirs._modules[name]
        assert child is not None
        if name in vars(new):  # a plain attribute set to None before the module existed
            delattr(new, name)
        setattr(new, name, resize(copy.deepcopy(child), width, width))
    return new


def _without(block: nn.Module, name: str, empty: nn.Module | None) -> nn.Module:
    """A copy of ``block`` whose child ``name`` is ``empty`` (``None``, or an ``nn.Identity``)."""
    new = copy.deepcopy(block)
    setattr(new, name, empty)
    return new


def _shortcut_children(traced: Traced, block: Block) -> list[str]:
    """The children of ``block`` on the shortcut of its last residual add: its projection (``downsample``)."""
    nodes = list(traced.graph.nodes)
    names = [n.name for n in nodes]
    entry = nodes[names.index(block.entry)]
    region = nodes[names.index(block.entry) + 1: names.index(block.exit) + 1]
    adds = [n for n in region if is_residual_add(n)]
    if not adds:
        return []
    operands = [a for a in adds[-1].args[:2] if isinstance(a, fx.Node)]
    shortcut = min(operands, key=lambda a: _distance(a, entry))
    children: list[str] = []
    inside, stack, seen = set(region), [shortcut], set()
    while stack:
        n = stack.pop()
        if n not in inside or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and str(n.target).startswith(block.path + "."):
            child = str(n.target)[len(block.path) + 1:].split(".")[0]
            if child not in children:
                children.append(child)
        stack.extend(n.all_input_nodes)
    return children


_SIZED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _record_new_args(block: nn.Module, peer: nn.Module, old_in: int, new_in: int) -> bool:
    """Update the constructor arguments a block keeps as plain attributes (or in a namedtuple of them, as
    efficientnet-pytorch's ``_block_args``): its input width ``old_in`` becomes ``new_in``, and each ``stride``
    takes the value the residual ``peer`` (a stride-1 repeat) has there.

    Returns whether anything changed. Forwards that test ``input_filters == output_filters and stride == 1``
    then switch the residual on by themselves.
    """
    changed = False
    peers = dict(peer.named_modules())
    for path, m in block.named_modules():
        if isinstance(m, _SIZED) or type(m).__module__.startswith("torch."):
            continue  # a layer's own sizes are the width pass's: ``conv1.out_channels == old_in`` is no argument
        other = vars(peers[path]) if path in peers else {}
        for name, value in list(vars(m).items()):
            new = _updated_arg(name, value, other.get(name), old_in, new_in)
            if new is not value:
                setattr(m, name, new)
                changed = True
    return changed


def _updated_arg(name: str, value: Any, peer_value: Any, old_in: int, new_in: int) -> Any:
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple of constructor arguments
        fields = {f: _updated_arg(f, getattr(value, f), getattr(peer_value, f, None), old_in, new_in)
                  for f in value._fields}
        changed = any(fields[f] is not getattr(value, f) for f in fields)
        return value._replace(**fields) if changed else value  # type: ignore[attr-defined]
    if name.startswith("_") or name == "training" or isinstance(value, bool):
        return value
    if "stride" in name:
        return peer_value if peer_value is not None and peer_value != value else value
    if isinstance(value, int) and value == old_in and old_in != new_in:
        return new_in
    return value


def _false_flags(block: nn.Module) -> list[tuple[str, str, bool]]:
    """``(submodule path, attribute, True)`` for every boolean attribute that is ``False`` in the block's own
    (not torch's) modules: one of them may switch its residual on."""
    return [(path, name, True) for path, m in block.named_modules() if not type(m).__module__.startswith("torch.")
            for name, value in vars(m).items() if value is False and name != "training" and not name.startswith("_")]


def _differing_flags(mine: nn.Module, peer: nn.Module) -> list[tuple[str, str, bool]]:
    """``(submodule path, attribute, peer's value)`` for every boolean attribute where ``peer`` differs."""
    peer_modules = dict(peer.named_modules())
    flags = []
    for path, m in mine.named_modules():
        other = peer_modules.get(path)
        if other is None or type(other) is not type(m):
            continue
        for name, value in vars(m).items():
            theirs = vars(other).get(name)
            if name != "training" and isinstance(value, bool) and isinstance(theirs, bool) and theirs != value:
                flags.append((path, name, theirs))
    return flags


def _rewiden(traced: Traced, module: nn.Module, block: Block, rules: InitRules | None,
             blocks: Sequence[Block] = ()) -> None:
    """Resize ``module`` (made from ``block``) in place so that its input group (and output, and the groups derived)
    are the block's output width: a repeat maps its width to itself (a plain conv block ``160 -> 960`` repeats as
    ``960 -> 960``, not ``960 -> 6 x 960``). Its inner widths follow what ``blocks`` of its class show
    (:func:`_peer_derivations`)."""
    cg, entry, exits = _block_channels(traced, module, block)
    derivations = _peer_derivations(traced, block, blocks, cg, entry, exits)
    seeds = _repeat_seeds(cg, entry, exits, block.out_shape[1])
    apply_widths(module, cg, resolve_widths(cg, lambda g, d: g.base, seeds=seeds, derivations=derivations), rules)


def _repeat_seeds(cg: ChannelGraph, entry: int, exits: Sequence[int], width: int) -> dict[int, int]:
    """Widths that make a block map ``width`` channels to ``width``: its input group, and its output's group, or
    the group whose pieces its output is (ReXNet adds its input to the first ``in`` channels of a wider conv
    output and passes the rest on: as a repeat the rest is empty and the conv's output is the input's width)."""
    seeds = {entry: width}
    if len(exits) == 1 and cg.groups[exits[0]].base == width:
        seeds[exits[0]] = width
    elif len(exits) > 1 and sum(cg.groups[g].base for g in exits) == width:
        wholes = {whole for whole, pieces in cg.sums.items() if set(pieces) == set(exits)}
        if wholes:
            seeds.update({whole: width for whole in wholes})
        elif entry not in exits:  # the output's pieces keep their widths (the two halves of GhostNet's module)
            seeds.update({g: cg.groups[g].base for g in exits})
    return seeds


_INNER = ("independent", "squeeze", "expansion", "stage")
_MAX_PEERS = 12


def _peer_derivations(traced: Traced, block: Block, blocks: Sequence[Block], cg: ChannelGraph, entry: int,
                      exits: Sequence[int]) -> dict[int, Derivation]:
    """How each inner width of a repeat of ``block`` follows from its input or its output, as the other blocks of
    its class in the network show.

    A lone block cannot tell whether an inner width is a function of the block's input or of its output: a
    ResNet/RegNet bottleneck's middle is ``out / b``, an MBConv's hidden width ``t x in``, RegNet's SE squeeze
    ``in / 4`` (torchvision, timm, Hugging Face) where an SE-ResNet's is ``out / 16``. Its peers can: each inner
    group keeps :func:`~compscale.planning.policy.derive`'s derivation, unless ``width x base / base(input)`` or
    ``width x base / base(output)`` predicts the peers' widths of that group (found by layer path, in peers of the
    same structure) more often. Hugging Face's ``RegNetYLayer`` 32 -> 128 (squeeze 8) repeats with a 32-wide squeeze
    (``round(128 / 4)``), as ``RegNetConfig(depths=[2, ...])`` builds it, not 8 (``128 x 8 / 128``).
    """
    derivations = derive(cg)
    exit = exits[0] if len(exits) == 1 else None
    peers = [w for w in _peer_widths(traced, block, blocks, cg, entry, exit) if w]
    if not peers:
        return derivations
    for g in cg.groups:
        d = derivations[g.id]
        if g.id in (entry, exit) or d.rule not in _INNER or d.never_narrower or g.fixed:
            continue
        candidates = [d, *(_ratio_derivation(cg, g.id, p, p == exit) for p in (entry, exit)
                           if p is not None and p != d.parent and not cg.groups[p].fixed)]
        scores = [sum(_explains(c, g.base, widths, g.id) for widths in peers) for c in candidates]
        derivations[g.id] = candidates[scores.index(max(scores))]  # a tie keeps derive's
    return derivations


def _ratio_derivation(cg: ChannelGraph, gid: int, parent: int, is_exit: bool) -> Derivation:
    ratio = Fraction(cg.groups[gid].base, cg.groups[parent].base)
    rule = "squeeze" if ratio < 1 else "stage" if ratio == 1 and is_exit else "expansion"
    return Derivation(rule, parent, ratio)


def _explains(d: Derivation, base: int, widths: dict[int, int], gid: int) -> bool:
    """Whether derivation ``d`` of group ``gid`` (``base`` wide) gives a peer's width of it, from the peer's own
    width of its parent."""
    if gid not in widths:
        return False
    if d.parent is None:
        return widths[gid] == base
    if d.parent not in widths:
        return False
    w = math.floor(widths[d.parent] * d.ratio)
    return (max(1, w) if d.rule == "squeeze" else w) == widths[gid]


def _peer_widths(traced: Traced, block: Block, blocks: Sequence[Block], cg: ChannelGraph, entry: int,
                 exit: int | None) -> list[dict[int, int]]:
    """For each other block of ``block``'s kind (one per pair of input and output widths), the width it gives each
    group of ``cg`` (``block``'s channel groups), read at the layers of the same path and class; empty for a peer
    whose layers disagree (another structure: an MBConv without its expansion conv)."""
    if block.layers:
        return []
    template = traced.root.get_submodule(block.path)
    seen = {(block.in_shape[1], block.out_shape[1])}
    result: list[dict[int, int]] = []
    for peer in blocks:
        pair = (peer.in_shape[1], peer.out_shape[1])
        if peer.kind != block.kind or peer.layers or pair in seen or len(result) >= _MAX_PEERS:
            continue
        module = _submodule(traced.root, peer.path)
        if module is None:  # a peer that is not (or no longer) in the model tells nothing
            continue
        seen.add(pair)
        widths = {entry: pair[0], **({exit: pair[1]} if exit is not None else {})}
        result.append(_matched_widths(cg, template, module, widths))
    return result


def _matched_widths(cg: ChannelGraph, template: nn.Module, module: nn.Module, widths: dict[int, int]
                    ) -> dict[int, int]:
    """``widths`` completed with the peer's width of each group of ``cg`` (the template's groups), read from the
    peer's layers at the group's members' paths (no trace: the layers say their widths); empty if two members of one
    group disagree or a member is a layer of another class in the peer."""
    for g in cg.groups:
        for path, role in g.members:
            if role not in ("out", "norm", "depthwise"):
                continue
            layer = _submodule(module, path)
            if type(_submodule(template, path)) is not type(layer):
                return {}
            if isinstance(layer, CHANNEL_LAYERS):  # a layer's output (``out``), a norm's or depthwise conv's channels
                w = channels(layer)[1 if role == "out" else 0]
                if widths.setdefault(g.id, w) != w:
                    return {}
    return widths


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _adds_its_input(traced: Traced, block: nn.Module, shape: tuple[int, ...], need_residual: bool = True) -> bool:
    """Whether ``block`` maps ``shape`` to itself and adds its input back (a trace proves it)."""
    try:
        check = traced.retrace(block, shape)
    except Exception:
        return False
    if tuple(check.shape(check.output_node)) != tuple(shape):
        return False
    if not need_residual:
        return True
    x = next(n for n in check.graph.nodes if n.op == "placeholder")
    return any(is_residual_add(n) and x in [_through_identity(check, a) for a in n.args[:2]]
               for n in check.graph.nodes)


def _through_identity(traced: Traced, arg: Any) -> Any:
    """``arg``, or what it passes on unchanged when it is a call of an ``nn.Identity`` (an emptied shortcut)."""
    while isinstance(arg, fx.Node) and arg.op == "call_module" and isinstance(traced.module(arg), nn.Identity):
        arg = arg.args[0]
    return arg


def synthesize_dense(traced: Traced, stage: Stage, extra: int, rules: InitRules | None) -> list[nn.Module]:
    """``extra`` dense layers after a growing stage's last one, each taking all the channels before it.

    Each is a deep copy of the last layer, of its own class (so that its ``forward``, and the container's that
    calls it, work as they did), with the layers that read its input rebuilt for the wider input.
    """
    last = stage.blocks[-1]
    template = traced.root.get_submodule(last.path)
    gm = extract_block(traced, last)
    cg, entry_group, _ = _block_channels(traced, gm, last)
    new: list[nn.Module] = []
    for i in range(1, extra + 1):
        width = last.in_shape[1] + i * last.growth
        widths = resolve_widths(cg, lambda g, d: g.base, seeds={entry_group: width})
        layer = copy.deepcopy(template)
        apply_widths(layer, cg, widths, rules)
        in_shape = (last.in_shape[0], width, *last.in_shape[2:])
        out_shape = (in_shape[0], width + last.growth if last.residual == "concat" else last.growth, *in_shape[2:])
        _check_maps(traced, fx.GraphModule(layer, copy.deepcopy(gm.graph)), last, in_shape, out_shape)
        new.append(layer)
    return new


def _block_channels(traced: Traced, module: nn.Module, block: Block) -> tuple[ChannelGraph, int, tuple[int, ...]]:
    """The channel groups of ``module`` (made from ``block``), the group of its input and the groups of its output."""
    sub = traced.retrace(module, block.in_shape)
    cg = analyse_channels(sub, pin_io=False)
    entry = cg.node_groups[next(n for n in sub.graph.nodes if n.op == "placeholder").name]
    if len(entry) != 1:
        raise RewriteError(f"cannot synthesize a repeat of {block.path}: its input is a concatenation",
                           "leave this stage out of depth scaling with `stages=`, or give the stage two blocks "
                           "so that the second is repeated as it is.")
    return cg, entry[0], cg.node_groups.get(sub.output_node.name, ())


def _finish(traced: Traced, gm: fx.GraphModule, block: Block, out_shape: tuple[int, ...]) -> fx.GraphModule:
    """Clean the synthesized block's graph and check it maps ``out_shape`` to itself."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.graph.lint()
    _check_maps(traced, gm, block, out_shape, out_shape)
    return gm


def _check_maps(traced: Traced, gm: nn.Module, block: Block, in_shape: tuple[int, ...],
                out_shape: tuple[int, ...]) -> None:
    """Raise ``RewriteError`` unless ``gm``, made from ``block``, maps ``in_shape`` to ``out_shape``."""
    check = traced.retrace(gm, in_shape)
    got = tuple(check.shape(check.output_node))
    if got != out_shape:
        raise RewriteError(
            f"the block synthesized from {block.path} maps {in_shape} to {got}, not {out_shape}",
            "name the stages to deepen with `stages=` so that this block is left alone.",
        )


def _unstride(gm: nn.Module) -> None:
    for m in gm.modules():
        stride = getattr(m, "stride", None)
        if isinstance(m, (nn.modules.conv._ConvNd, nn.MaxPool2d, nn.AvgPool2d)) and stride not in (1, None):
            # efficientnet-pytorch keeps a list ([2, 2]) that its static padding zips over
            m.stride = type(stride)([1] * len(stride)) if isinstance(stride, (tuple, list)) else 1  # type: ignore[assignment]


def _make_identity_residual(gm: fx.GraphModule, block: Block, traced: Traced, blocks: Sequence[Block]) -> None:
    graph = gm.graph
    x = next(n for n in graph.nodes if n.op == "placeholder")
    out = next(n for n in graph.nodes if n.op == "output")
    adds = [n for n in graph.nodes if is_residual_add(n)]
    if block.residual == "projection" and adds:
        operands = [a for a in adds[-1].args[:2] if isinstance(a, fx.Node)]
        adds[-1].replace_input_with(min(operands, key=lambda a: _distance(a, x)), x)
        return
    last = out.args[0]
    assert isinstance(last, fx.Node)
    with graph.inserting_before(out):
        cur = last
        for rel, module in _residual_tail(traced, block, blocks):
            if _submodule(gm, rel) is None:
                gm.add_submodule(rel, copy.deepcopy(module))
            cur = graph.call_module(rel, (cur,))
        res = graph.call_function(operator.add, (cur, x))
    out.args = (res,)


def _distance(node: fx.Node, src: fx.Node) -> int:
    """Number of ops from ``src`` to ``node`` along first inputs (large when unrelated)."""
    steps = 0
    while node is not src and steps < 10_000:
        ins = node.all_input_nodes
        if not ins:
            return 10_000
        node, steps = ins[0], steps + 1
    return steps


def _residual_tail(traced: Traced, block: Block, blocks: Sequence[Block]) -> list[tuple[str, nn.Module]]:
    """Drop-path layers a residual peer of the same type applies to its branch before adding the input back."""
    peer = next((b for b in blocks if b.module_type is block.module_type and b.is_repeat), None)
    if peer is None:
        return []
    by_name = {n.name: n for n in traced.graph.nodes}
    add = by_name[peer.exit]
    while not is_add(add) and add.all_input_nodes:  # ops after the add (a trailing ReLU)
        add = add.all_input_nodes[0]
    branch = next((a for a in add.args[:2] if isinstance(a, fx.Node) and a.name != peer.entry), None)
    tail: list[tuple[str, nn.Module]] = []
    while branch is not None and branch.op == "call_module":
        module = traced.gm.get_submodule(str(branch.target))
        if drop_path_attr(module) is None:
            break
        tail.insert(0, (str(branch.target)[len(peer.path) + 1:], module))
        branch = branch.all_input_nodes[0]
    return tail
