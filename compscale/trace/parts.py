"""The network part of a model whose forward torch.fx cannot trace as a whole: a detector.

A detector's forward takes a list of images of any size, resizes and batches them (its transform), runs an ordinary
network (backbone, feature pyramid, heads) and ends in data-dependent code (anchors, proposals, RoI pooling, NMS).
:func:`network_part` runs the model once, in eval mode, with hooks on every module, and records which module calls
carry its parameters and how tensors flow between them. The calls that hold parameters and take tensors from the
network's input or from each other are its *units* (a unit torch.fx cannot trace is replaced by the calls inside
it); a call without parameters between units (RoI pooling: features in, pooled features out, with the same
channels) stands in as an adaptive pool of the maps it reads. The units, replayed in the recorded order on the
batched image, form one ``GraphModule`` over the model's own submodules, at their own paths: the rest of the
pipeline scales it as any network, and :func:`compscale.parts.scale_parts` puts the scaled units back.

Nothing here knows a detector's class: the parts come from the recorded calls, and the resizing transform is the
call that produced the network's input (its ``min_size``/``max_size``/``fixed_size``/``size`` are what it exposes).

Example:
    >>> from torchvision.models.detection import retinanet_resnet50_fpn
    >>> part = network_part(retinanet_resnet50_fpn(weights=None, weights_backbone=None))
    >>> part.units
    ('backbone', 'head')
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compscale.errors import TraceError
from compscale.trace.tracer import eval_mode

__all__ = ["PART_FLAG", "RESIZE_ATTRS", "NetworkPart", "NotRunnable", "network_part", "output_signature", "pooled",
           "record_calls"]

log = logging.getLogger("compscale")

RESIZE_ATTRS = ("min_size", "max_size", "fixed_size", "size")
"""The attributes through which a resizing transform exposes the size it resizes images to (torchvision's
``GeneralizedRCNNTransform``: ``min_size``, ``max_size``, ``fixed_size``)."""

_RECORD_SIDE = 64  # the network runs on the batched image shrunk to this side while the calls are recorded


@dataclasses.dataclass
class _Call:
    path: str
    module: nn.Module
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    output: Any = None
    children: list[_Call] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class NetworkPart:
    """The network part of ``model``: ``gm`` replays its units (module paths of ``model``) on the batched image.

    ``resizer`` is the path of the call that made the network's input (the transform), ``input_size`` the size it
    resizes a square image to (``None`` when it exposes none of :data:`RESIZE_ATTRS`).
    """

    model: nn.Module
    gm: fx.GraphModule
    units: tuple[str, ...]
    resizer: str | None
    input_size: tuple[int, int] | None
    stand_ins: tuple[str, ...] = ()
    unscaled: tuple[str, ...] = ()  # modules with parameters no unit holds or no call ran (they keep their widths)


def output_signature(root: nn.Module, shape: Sequence[int]) -> tuple[int, ...]:
    """What of an output's shape must not change when ``root`` is rescaled: its batch and channels (classes), or, for
    a network part, whose outputs are per-location predictions, maps (N, C, ...) or flattened over the map (N, HWA,
    K), its rank, batch and channels (the last dimension of a flattened one: classes, box coordinates)."""
    if getattr(root, "meta", {}).get(PART_FLAG) and shape:
        return len(shape), shape[0], shape[1] if len(shape) > 3 else shape[-1]
    return tuple(shape[:2])


PART_FLAG = "compscale_network_part"


def pooled(size: Sequence[int], *maps: torch.Tensor) -> torch.Tensor:
    """The stand-in of a parameter-free call between units that pools maps of one width (RoI pooling): its channels
    are theirs, its spatial size ``size``."""
    return functools.reduce(operator.add, [F.adaptive_avg_pool2d(m, (size[0], size[1])) for m in maps])


def network_part(model: nn.Module, images: Sequence[torch.Tensor] | None = None) -> NetworkPart:
    """Record one eval-mode call of ``model`` on ``images`` (one random 3 x 224 x 224 image by default) and build its
    network part.

    Raises:
        TraceError: no unit was found, or tensors reach the units from code compscale cannot stand in for.
    """
    name = type(model).__name__
    root, shrunk = record_calls(model, images)
    units = _units(root)
    for _ in range(64):
        try:
            gm, source, stand_ins = _replay(model, root, units, name)
        except _Descend as d:  # it reads tensors from code between the units: its own calls are the units
            at = units.index(d.call)
            units[at:at + 1] = _units(d.call)
            continue
        try:
            _check_traceable(gm)
        except TraceError as e:
            inner = _failing_unit(e, units)
            if inner is None or not inner.children:
                raise
            log.debug("parts: %s cannot be traced whole (%s); its calls are taken one by one", inner.path, e)
            at = units.index(inner)
            units[at:at + 1] = _units(inner)
            continue
        break
    else:  # pragma: no cover - a model with more nesting than this is not a detector
        raise TraceError(f"{name}: no traceable network part was found", "pass the network part itself.")
    held = {p for u in units for p in _parameter_ids(u.module)}
    called = {"", *(c.path for c in _calls(root))}
    unscaled = sorted({path.rpartition(".")[0] for path, p in model.named_parameters()
                       if id(p) not in held or path.rpartition(".")[0] not in called})
    resizer = _resizer(root, shrunk.get(source, source))
    return NetworkPart(model, gm, tuple(u.path for u in units), resizer.path if resizer else None,
                       _nominal_size(resizer.module) if resizer else None, tuple(stand_ins), tuple(unscaled))


def _units(call: _Call) -> list[_Call]:
    """The calls under ``call`` that hold parameters and take only tensors, containers of them and constants (the
    calls inside one that takes anything else, an ``ImageList``, in its place)."""
    units = []
    for c in call.children:
        if _holds_parameters(c.module):
            units.extend([c] if _passable((c.args, c.kwargs)) or not c.children else _units(c))
    return units


def _passable(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_passable(v) for v in value)
    if isinstance(value, dict):
        return all(_passable(v) for v in value.values())
    return isinstance(value, (torch.Tensor, int, float, str, bool, type(None)))


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _parameter_ids(module: nn.Module) -> Iterator[int]:
    return (id(p) for p in module.parameters())


def record_calls(model: nn.Module, images: Sequence[torch.Tensor] | None = None, shrink: bool = True
                 ) -> tuple[_Call, dict[int, int]]:
    """The tree of module calls of one eval-mode, no-grad call of ``model`` on ``images`` (one random 3 x 224 x 224
    image by default, drawn from a generator of its own), their arguments and outputs. The first call with
    parameters that takes a batch of images sees it shrunk (cheap to run; when the shrunk batch does not run, a
    layer without padding at the end of SSD300's VGG, it runs again at full size): the map from the shrunk tensor's
    id to the batch's is returned with the tree.

    Raises:
        NotRunnable: the model does not run on a list of images.
    """
    if images is None:
        first = next(model.parameters(), None)
        image = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
        images = [image if first is None else image.to(first.device, first.dtype)]
    root = _Call("", model)
    stack = [root]
    shrunk: dict[int, int] = {}

    def pre(path: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if shrink and not shrunk and _holds_parameters(module) and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() == 4 and min(args[0].shape[-2:]) > _RECORD_SIDE:
            x = args[0]
            side = _RECORD_SIDE / min(x.shape[-2:])
            small = F.interpolate(x, size=[max(1, round(s * side)) for s in x.shape[-2:]], mode="nearest")
            shrunk[id(small)] = id(x)
            args = (small, *args[1:])
            stack[0].output = (x, small)  # both stay alive while their ids are compared
        call = _Call(path, module, args, kwargs)
        stack[-1].children.append(call)
        stack.append(call)
        return args, kwargs

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        stack.pop().output = output

    handles = []
    for path, m in model.named_modules():
        if path:
            handles.append(m.register_forward_pre_hook(functools.partial(pre, path), with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            model(list(images))
    except Exception as e:
        failed = e
    else:
        return root, shrunk
    finally:
        for h in handles:
            h.remove()
    if shrunk:
        return record_calls(model, images, shrink=False)
    raise NotRunnable(f"{type(model).__name__} could not be run on a list of images to find its network part "
                      f"({type(failed).__name__}: {failed})",
                      "scale the network part (its backbone and heads) yourself.") from failed


class NotRunnable(TraceError):
    """The model does not run on a list of images: no detector (or one that fails as it is)."""


def _leaves(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], torch.Tensor]]:
    """The tensors in a call's output, each with the keys that reach it (lists, tuples, dicts)."""
    if isinstance(value, torch.Tensor):
        yield at, value
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, (*at, i))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, (*at, k))


def _objects(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, attributes of plain objects included (an ``ImageList``'s ``tensors``)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _objects(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _objects(v, depth + 1)
    elif depth < 3 and hasattr(value, "__dict__") and not isinstance(value, nn.Module):
        for v in vars(value).values():
            yield from _objects(v, depth + 1)


def _replay(model: nn.Module, root: _Call, units: list[_Call], name: str
            ) -> tuple[fx.GraphModule, int, list[str]]:
    """A graph calling ``units`` in order on one input; returns it, the id of the tensor that input stands for and
    the paths of the calls stood in for."""
    graph = fx.Graph()
    unit_ids = {id(u) for u in units}
    made: dict[int, fx.Node] = {}  # id(tensor) -> the node that computes it
    outputs: dict[int, fx.Node] = {}  # unit outputs nobody reads yet
    source: list[int] = []
    stand_ins: list[str] = []
    x = graph.placeholder("x")

    def produced(call: _Call, node: fx.Node) -> None:
        items: dict[tuple[Any, ...], fx.Node] = {(): node}  # one getitem per key path: (0,), then (0, 1) from it
        for keys, t in _leaves(call.output):
            for i in range(1, len(keys) + 1):
                if keys[:i] not in items:
                    items[keys[:i]] = graph.call_function(operator.getitem, (items[keys[:i - 1]], keys[i - 1]))
            made[id(t)] = outputs[id(t)] = items[keys]

    def node_of(t: torch.Tensor, reader: _Call) -> fx.Node:
        if id(t) in made:
            outputs.pop(id(t), None)
            return made[id(t)]
        if not source:
            source.append(id(t))
            made[id(t)] = x
            return x
        if reader.children and any(_holds_parameters(c.module) for c in reader.children):
            raise _Descend(reader)
        raise TraceError(f"{name}: the call of {reader.path!r} reads a tensor of shape {tuple(t.shape)} that "
                         "neither the network's input nor another unit made",
                         "scale the network part (its backbone and heads) yourself.")

    def arg(value: Any, reader: _Call) -> Any:
        if isinstance(value, torch.Tensor):
            return node_of(value, reader)
        if isinstance(value, (list, tuple)):
            items = [arg(v, reader) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, dict):
            return {k: arg(v, reader) for k, v in value.items()}
        return value  # a constant (the units take nothing else: _passable)

    def walk(call: _Call) -> None:
        for c in call.children:
            if id(c) in unit_ids:
                node = graph.call_module(c.path, arg(c.args, c), arg(c.kwargs, c))
                produced(c, node)
            elif not _holds_parameters(c.module) and (stand := _stand_in(c, made)) is not None:
                size, read = stand
                stand_ins.append(c.path)
                produced(c, graph.call_function(pooled, (size, *(node_of(t, c) for t in read))))
            else:
                walk(c)

    walk(root)
    graph.output(tuple(outputs.values()))
    if not source:
        raise TraceError(f"{name}: no module call with parameters takes the network's input",
                         "scale the network part yourself.")
    gm = fx.GraphModule(model, graph, f"{name}NetworkPart")
    gm.meta[PART_FLAG] = True
    return gm, source[0], stand_ins


class _Descend(Exception):
    def __init__(self, call: _Call) -> None:
        self.call = call


def _stand_in(call: _Call, made: dict[int, fx.Node]) -> tuple[tuple[int, ...], list[torch.Tensor]] | None:
    """For a call that pools the unit maps it reads (one 4-d output of their channels): the output's spatial size
    and those maps; else ``None``."""
    outs = [t for _, t in _leaves(call.output)]
    maps = [t for _, t in _leaves((call.args, call.kwargs)) if id(t) in made and t.dim() == 4]
    if len(outs) != 1 or outs[0].dim() != 4 or not maps or {t.shape[1] for t in maps} != {outs[0].shape[1]}:
        return None
    return tuple(outs[0].shape[-2:]), maps


def _check_traceable(gm: fx.GraphModule) -> None:
    from compscale.trace.entry import trace

    trace(gm, shapes=False)


def _failing_unit(error: TraceError, units: list[_Call]) -> _Call | None:
    """The unit inside which tracing failed (its path is in the message), deepest first."""
    text = str(error)
    for u in sorted(units, key=lambda u: -len(u.path)):
        if f"'{u.path}" in text:
            return u
    return None


def _resizer(root: _Call, source: int) -> _Call | None:
    """The call whose output holds the network's input: the transform that resized and batched the images."""
    for c in _calls(root):
        if not _holds_parameters(c.module) and any(id(t) == source for t in _objects(c.output)):
            return c
    return None


def _calls(call: _Call) -> Iterator[_Call]:
    for c in call.children:
        yield c
        yield from _calls(c)


def _nominal_size(module: nn.Module) -> tuple[int, int] | None:
    """The size a square image is resized to by a transform exposing :data:`RESIZE_ATTRS`."""
    fixed = getattr(module, "fixed_size", None) or getattr(module, "size", None)
    if isinstance(fixed, int):
        return fixed, fixed
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        return int(fixed[0]), int(fixed[1])
    low = getattr(module, "min_size", None)
    if isinstance(low, (tuple, list)) and low:
        low = low[-1]
    if not isinstance(low, int):
        return None
    high = getattr(module, "max_size", None)
    side = min(low, high) if isinstance(high, int) else low
    return side, side
