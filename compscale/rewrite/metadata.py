"""The metadata pass: what a library reads back from its model describes the scaled network, not the base one.

Libraries keep numbers beside the layers: timm's ``num_features`` (what ``reset_classifier`` sizes the new head
for), ``head_hidden_size``, ``feature_info`` (``features_only`` consumers), ``pretrained_cfg`` (what
``timm.data.resolve_data_config`` feeds the model), the ``in_channels``/``out_channels`` a block keeps; Hugging
Face's ``config`` (what ``save_pretrained`` writes and ``from_pretrained`` rebuilds). None of them is read by the
forward, so the rewrite leaves them stale. This pass finds them from what the classes expose, never from model
names, and measures their new values on the scaled network:

- a channel attribute (``in_chs``, ``out_channels``, ``num_features``...) whose value, on every module of its class
  in the base model, is the channels the module takes or gives, takes the scaled module's;
- ``num_features``/``head_hidden_size`` are the channels out of ``forward_features`` and of
  ``forward_head(pre_logits=True)``; ``feature_info`` the channels at each feature module; ``pretrained_cfg``'s
  sizes follow the input size and the final map;
- a Hugging Face ``config`` is rewritten to the values that rebuild the scaled network, checked by building
  ``type(model)(config)`` on the meta device and comparing every parameter's shape. When no config does,
  ``save_pretrained`` and ``push_to_hub`` raise :class:`MetadataError` before writing anything.

Example:
    >>> r = compscale.scale(timm.create_model("resnet18"), phi=1)         # doctest: +SKIP
    >>> r.num_features, r.pretrained_cfg["input_size"]                    # doctest: +SKIP
    (560, (3, 256, 256))
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten

from compscale.errors import CompscaleError
from compscale.layers import SHAPE_PRESERVING
from compscale.planning.plan import ScalingPlan
from compscale.trace.tracer import (
    Traced,
    default_input_shape,
    empty_like,
    eval_mode,
    meta_copy,
)

__all__ = ["MetadataError", "update_metadata"]

log = logging.getLogger("compscale")


class MetadataError(CompscaleError):
    """A library's metadata cannot describe the scaled network (a Hugging Face config has no field for a width)."""


# attributes that may hold a module's channel count; a value is only changed where the base model shows it is one
_CHANNEL_ATTR = re.compile(r"((in|out|mid|num|hidden|head_hidden|pooled)_?)?(channels|chs|features|planes|dim)|"
                           r"inplanes|outplanes|dim_out|dim_in")
# Hugging Face config fields that multiply widths or depths (EfficientNet's width_coefficient, MobileNet's
# depth_multiplier, which is a width multiplier in TensorFlow's naming)
_MULTIPLIER_FIELD = re.compile(r".*(coefficient|multiplier)")

_ROUNDING = re.compile(r"divisor|divisible")  # a rounding rule's step (EfficientNet's depth_divisor), never a width
Shapes = dict[str, tuple[tuple[int, ...] | None, tuple[int, ...] | None]]  # module path -> (input, output) shapes


def update_metadata(result: nn.Module, base: nn.Module, plan: ScalingPlan,
                    graphs: tuple[Traced, Traced] | None = None) -> None:
    """Make what ``result``'s library reads back from it describe the scaled network (see the module docstring).

    ``base`` is the model ``result`` was scaled from (only read); ``plan`` the plan it was built by; ``graphs`` the
    graphs of both at their input sizes, when the pipeline has them: a module's shapes are read from the nodes its
    call made instead of from a forward of a meta-device copy (timm's ``forward_features``/``forward_head`` still
    run one).
    """
    _update_hf_config(result, plan)
    timm = _has_head_api(result) or any(k in vars(result) for k in ("feature_info", "pretrained_cfg", "default_cfg"))
    paths = _measured_paths(result)
    if not (timm or paths):
        return  # no timm attribute, no channel attribute: nothing to measure
    given = getattr(plan.options, "input_shape", None)
    shape = tuple(given) if given is not None else default_input_shape(base, plan.base_input_size)
    new_shape = (*shape[:2], *plan.input_size)
    extra = tuple(getattr(plan.options, "extra_inputs", ()) or ())
    before = after = None
    if graphs is not None and not timm:
        before = graph_shapes(graphs[0], _measured_paths(base))
        after = graph_shapes(graphs[1], paths) if before is not None else None
    if before is None or after is None:
        before = _measure(base, shape, extra)
        after = _measure(result, new_shape, extra) if before is not None else None
    if before is not None and after is not None:
        _update_channel_attributes(result, base, before, after)
        _update_timm(result, base, plan, before, after, shape, new_shape)


def _has_head_api(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))


def _measured_paths(model: nn.Module) -> set[str]:
    """The modules whose shapes this pass reads: timm's feature modules, and those keeping a channel attribute but
    torch's own layers (which the width pass resizes with their attributes)."""
    return {path for path, m in model.named_modules() if path and _channel_attributes(m)
            and not type(m).__module__.startswith("torch.nn.modules.")} | {
        e["module"] for e in _feature_info(model) if isinstance(e, dict) and isinstance(e.get("module"), str)}


def _feature_info(model: nn.Module) -> list[Any]:
    info = getattr(vars(model).get("feature_info"), "info", vars(model).get("feature_info"))
    return info if isinstance(info, list) else []


# -- measuring ---------------------------------------------------------------------------------------------------


def _first_shape(value: Any) -> tuple[int, ...] | None:
    leaves, _ = tree_flatten(value)
    return next((tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)), None)


def _measure(model: nn.Module, shape: tuple[int, ...], extra: tuple[torch.Tensor, ...]) -> Shapes | None:
    """In one forward of a meta-device copy of ``model``, the first input and output shapes of the modules this pass
    reads and of timm's ``forward_features``/``forward_head``; ``None`` when the model cannot run on meta tensors."""
    shapes: Shapes = {}
    try:
        meta = meta_copy(model)
        paths = _measured_paths(meta)
        for path, m in meta.named_modules():
            if path in paths:
                m.register_forward_hook(functools.partial(_record, shapes, path), with_kwargs=True)
            if isinstance(m, SHAPE_PRESERVING):  # they keep their input's shape (meta batch_norm is slow)
                vars(m)["forward"] = functools.partial(_same_shape, m.forward)
    except Exception as e:  # a model whose copy cannot be hooked (RAFT's) keeps its metadata, as it did before
        log.debug("metadata: cannot measure a meta-device copy of %s (%s: %s)", type(model).__name__,
                  type(e).__name__, e)
        return None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    x = torch.empty(shape, device="meta", dtype=dtype)
    inputs = (x, *(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in extra))
    try:
        with torch.no_grad(), eval_mode(meta), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if _has_head_api(meta) and not extra:  # timm's forward is forward_head(forward_features(x))
                features = meta.forward_features(x)
                meta.forward_head(features)  # modules keep this call's shapes, not pre_logits' below
                shapes["forward_features"] = (shape, _first_shape(features))
                shapes["forward_head"] = (shapes["forward_features"][1],
                                          _first_shape(meta.forward_head(features, pre_logits=True)))
            else:
                meta(*inputs)
    except Exception as e:  # data-dependent code cannot run on meta tensors: what was measured is kept
        log.debug("metadata: %s does not run on meta tensors (%s: %s)", type(model).__name__, type(e).__name__, e)
        if not shapes:
            return None
    return shapes


def graph_shapes(traced: Traced, paths: set[str]) -> Shapes | None:
    """The input and output shapes of the modules ``paths`` read from ``traced``'s nodes, as a forward hook on each
    would record them: the first value the nodes of a module's first call read from outside it, and the one value
    they give out (fx names a later call's scope ``path@1``...). ``None`` when a module made no node of its own,
    reads several values from outside (which is its first argument the graph does not say) or gives out several,
    or the graph was traced with concrete values: a hooked forward measures those."""
    if not traced.gm.meta.get("compscale_symbolic"):
        return None
    inside: dict[str, list[fx.Node]] = {p: [] for p in paths}
    for node in traced.graph.nodes:
        for scope, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if scope == path and path in inside:
                inside[path].append(node)
    shapes: Shapes = {}
    for path, nodes in inside.items():
        members = set(nodes)
        read = {a for n in nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
        given = [n for n in nodes if any(u not in members for u in n.users)]
        if len(read) != 1 or len(given) != 1 or not all(traced.has_shape(n) for n in (*read, *given)):
            return None
        shapes[path] = (tuple(traced.shape(next(iter(read)))), tuple(traced.shape(given[0])))
    return shapes


def _same_shape(forward: Any, *args: Any, **kwargs: Any) -> Any:
    x = args[0] if len(args) == 1 and not kwargs else None
    return empty_like(x) if isinstance(x, torch.Tensor) else forward(*args, **kwargs)


def _record(shapes: Shapes, path: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
            output: Any) -> None:
    if path not in shapes:  # a module called twice keeps its first call
        shapes[path] = (_first_shape((args, kwargs)), _first_shape(output))


# -- channel attributes ------------------------------------------------------------------------------------------

Relation = tuple[int, int]  # (0: input, 1: output; the dim of the channels: 1 or -1)
_RELATIONS: tuple[Relation, ...] = ((0, 1), (1, 1), (0, -1), (1, -1))


def _channel_attributes(module: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(module).items()
            if type(v) is int and _CHANNEL_ATTR.fullmatch(k) and not k.startswith("_")}


def _relations(value: int, measured: tuple[tuple[int, ...] | None, tuple[int, ...] | None]) -> set[Relation]:
    return {(side, dim) for side, dim in _RELATIONS
            if (s := measured[side]) is not None and len(s) >= 2 and s[dim] == value}


def _update_channel_attributes(result: nn.Module, base: nn.Module, before: Shapes, after: Shapes) -> None:
    """A channel attribute that holds, on every measured module of its class in ``base``, the channels the module
    takes (or gives) takes the channels its scaled module takes (gives)."""
    learned: dict[tuple[type, str], set[Relation]] = {}
    for path, m in base.named_modules():
        if path and path in before:
            for name, value in _channel_attributes(m).items():
                key = (type(m), name)
                found = _relations(value, before[path])
                learned[key] = found if key not in learned else learned[key] & found
    for path, m in result.named_modules():
        if not path or path not in after:
            continue
        for name, value in _channel_attributes(m).items():
            relations = learned.get((type(m), name))
            if not relations:
                continue
            new = _new_value(name, relations, after[path])
            if new is not None and new != value:
                log.debug("metadata: %s.%s %d -> %d", path, name, value, new)
                setattr(m, name, new)


def _new_value(name: str, relations: set[Relation],
               measured: tuple[tuple[int, ...] | None, tuple[int, ...] | None]) -> int | None:
    """The scaled value by ``relations``; where they disagree, the side the name says (``in_``/``out_``) on the
    channel dim 1 first; ``None`` when that does not decide."""
    values = {(side, dim): s[dim] for side, dim in relations if (s := measured[side]) is not None and len(s) >= 2}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    named = 0 if name.startswith("in") else 1 if name.startswith("out") or name.endswith("_out") else None
    for dim in (1, -1):
        if named is not None and (named, dim) in values:
            return values[(named, dim)]
    return None


# -- timm --------------------------------------------------------------------------------------------------------


def _channels_like(value: int, base: tuple[int, ...] | None, new: tuple[int, ...] | None) -> int | None:
    """``new``'s channels where ``value`` is ``base``'s channels (dim 1, else the last dim)."""
    if base is None or new is None or len(base) < 2 or len(base) != len(new):
        return None
    for dim in (1, -1):
        if base[dim] == value:
            return new[dim]
    return None


def _update_timm(result: nn.Module, base: nn.Module, plan: ScalingPlan, before: Shapes, after: Shapes,
                 shape: tuple[int, ...], new_shape: tuple[int, ...]) -> None:
    """timm's model attributes: ``num_features``, ``head_hidden_size``, ``feature_info``, ``pretrained_cfg``."""
    for name, key, side in (("num_features", "forward_features", 1), ("head_hidden_size", "forward_head", 1)):
        value = vars(result).get(name)
        if type(value) is int and key in before and key in after:
            new = _channels_like(value, before[key][side], after[key][side])
            if new is not None:
                setattr(result, name, new)
    _update_feature_info(_feature_info(result), before, after, shape, new_shape)
    done: set[int] = set()
    for name in ("pretrained_cfg", "default_cfg"):
        cfg = vars(result).get(name)
        if isinstance(cfg, dict) and id(cfg) not in done:
            done.add(id(cfg))
            _update_data_config(cfg, plan, before.get("forward_features"), after.get("forward_features"))


def _update_feature_info(info: list[Any], before: Shapes, after: Shapes, shape: tuple[int, ...],
                         new_shape: tuple[int, ...]) -> None:
    for entry in info:
        if not isinstance(entry, dict) or entry.get("module") not in after or entry.get("module") not in before:
            continue
        old, new = before[entry["module"]][1], after[entry["module"]][1]
        chs = _channels_like(entry["num_chs"], old, new) if type(entry.get("num_chs")) is int else None
        if chs is not None:
            entry["num_chs"] = chs
        if type(entry.get("reduction")) is int and old is not None and new is not None and len(new) == len(new_shape):
            if len(old) > 2 and old[2] and entry["reduction"] == round(shape[2] / old[2]) and new[2]:
                entry["reduction"] = round(new_shape[2] / new[2])


def _update_data_config(cfg: dict[str, Any], plan: ScalingPlan, features_before: Any, features_after: Any) -> None:
    """``input_size`` is the plan's, ``test_input_size`` keeps its ratio to it (rounded as the plan rounds sizes),
    ``pool_size`` follows the final map; ``crop_pct`` stays."""
    divisor = getattr(plan.options, "resolution_divisor", 8)
    old = cfg.get("input_size")
    if not (isinstance(old, (tuple, list)) and len(old) == len(plan.input_size) + 1):
        return
    for key in ("test_input_size", "min_input_size"):
        value = cfg.get(key)
        if isinstance(value, (tuple, list)) and len(value) == len(old):
            cfg[key] = (value[0], *(max(divisor, round(v * n / o / divisor) * divisor)
                                    for v, n, o in zip(value[1:], plan.input_size, old[1:])))
    cfg["input_size"] = (old[0], *plan.input_size)
    pool = cfg.get("pool_size")
    if isinstance(pool, (tuple, list)) and features_before is not None and features_after is not None:
        (x, maps), new = features_before, features_after[1]
        if x is None or maps is None or new is None or not len(maps) == len(new) == len(pool) + 2:
            return
        # the final map at the config's input size, by the reduction measured at the size scaled from
        at_cfg = tuple(round(o * m / i) for o, m, i in zip(old[1:], maps[2:], x[2:]))
        if at_cfg == tuple(pool):
            cfg["pool_size"] = tuple(new[2:])  # measured at the new input size, the config's from now on


# -- Hugging Face ------------------------------------------------------------------------------------------------


def _hf_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) is None or not callable(getattr(config, "to_dict", None)):
        return None
    return config if callable(getattr(model, "save_pretrained", None)) else None


def _update_hf_config(result: nn.Module, plan: ScalingPlan) -> None:
    """Rewrite ``result.config`` to the values that rebuild the scaled network, or make saving it refuse."""
    config = _hf_config(result)
    if config is None:
        return
    target = _param_shapes(result)
    fields = _candidate_fields(config, plan, _group_widths(result))
    found = _search_config(result, config, fields, target)
    if found is None:
        _refuse_saving(result, config)
        return
    for name, value in found.items():
        setattr(config, name, value)
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and (size,) * len(plan.base_input_size) == tuple(plan.base_input_size):
        config.image_size = plan.input_size[0] if len(set(plan.input_size)) == 1 else list(plan.input_size)
    elif isinstance(size, (list, tuple)) and tuple(size) == tuple(plan.base_input_size):
        config.image_size = type(size)(plan.input_size)


def _param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _width_map(plan: ScalingPlan) -> dict[int, list[int]]:
    """Base width -> the widths groups of that width scaled to, the most common first."""
    seen: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for g in plan.groups:
        seen[g.before][g.after] += 1
    return {before: [w for w, _ in c.most_common()] for before, c in seen.items()}


Coordinate = tuple[str, int | None]  # a config field, and the index of one entry of a list field


def _group_widths(model: nn.Module) -> list[int]:
    """The channels per group of ``model``'s grouped (not depthwise) convolutions, the most common first."""
    seen = collections.Counter(m.in_channels // m.groups for m in model.modules()
                               if isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups < m.in_channels)
    return [w for w, _ in seen.most_common()]


def _candidate_fields(config: Any, plan: ScalingPlan, group_widths: list[int]) -> dict[Coordinate, list[Any]]:
    """Each config field (or entry of a list field) the scaling may change, with the values it may take, the most
    likely first: a width the plan scaled to, the stages' new depths, a multiplier times the width or depth one,
    a group width the scaled network has."""
    widths = _width_map(plan)
    depths = [s.blocks_before for s in plan.stages]
    fields: dict[Coordinate, list[Any]] = {}
    for name, value in config.to_dict().items():
        if isinstance(value, bool) or name in ("image_size", "num_labels", "num_channels") or _ROUNDING.search(name):
            continue
        if isinstance(value, float) and _MULTIPLIER_FIELD.fullmatch(name):
            first, second = ((plan.depth, plan.width) if "depth" in name and "multiplier" not in name
                             else (plan.width, plan.depth))
            fields[(name, None)] = list(dict.fromkeys((value * first, value * second)))
        elif type(value) is int and value in widths:
            fields[(name, None)] = widths[value]
        elif type(value) is int and "group" in name and group_widths:  # RegNet's groups_width
            fields[(name, None)] = group_widths
        elif isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
            if list(value) == depths and any(s.blocks_after != s.blocks_before for s in plan.stages):
                fields[(name, None)] = [[s.blocks_after for s in plan.stages]]
            elif all(v in widths for v in value):
                fields.update({(name, i): widths[v] for i, v in enumerate(value)})
    return {k: v for k, v in fields.items() if v != [_current(config, {}, k)]}


def _current(config: Any, chosen: Mapping[Coordinate, Any], coordinate: Coordinate) -> Any:
    if coordinate in chosen:
        return chosen[coordinate]
    name, index = coordinate
    value = getattr(config, name)
    return value if index is None else value[index]


def _changes(config: Any, chosen: Mapping[Coordinate, Any]) -> dict[str, Any]:
    """The config fields ``chosen`` (coordinate -> value) sets, list fields whole."""
    out: dict[str, Any] = {}
    for (name, index), value in chosen.items():
        if index is None:
            out[name] = value
        else:
            entries = out.setdefault(name, list(getattr(config, name)))
            entries[index] = value
    return out


def _search_config(result: nn.Module, config: Any, fields: Mapping[Coordinate, list[Any]],
                   target: Mapping[str, tuple[int, ...]], budget: int = 60) -> dict[str, Any] | None:
    """Config fields that rebuild ``target``'s shapes, or ``None``.

    From every coordinate's likeliest value (and, apart, from the whole fields alone: a multiplier scales the widths
    that the lists hold at their base values), one coordinate at a time changes while that lowers the number of
    parameters that differ; at most ``budget`` builds.
    """
    if _mismatches(result, config, {}, target) == 0:
        return {}
    builds = 1
    starts = [{k: v[0] for k, v in fields.items()}, {k: v[0] for k, v in fields.items() if k[1] is None}]
    for start in starts if starts[0] != starts[1] else starts[:1]:
        chosen, best, used = _descend(result, config, fields, target, start, budget - builds)
        builds += used
        if best == 0:
            return _changes(config, chosen)
    return None


def _descend(result: nn.Module, config: Any, fields: Mapping[Coordinate, list[Any]],
             target: Mapping[str, tuple[int, ...]], chosen: dict[Coordinate, Any], budget: int,
             ) -> tuple[dict[Coordinate, Any], int, int]:
    """Greedy descent from ``chosen``: the coordinates, their number of differing parameters, the builds used."""
    best = _mismatches(result, config, _changes(config, chosen), target)
    builds, improved = 1, True
    while best and improved and builds < budget:
        improved = False
        for coordinate, values in fields.items():
            for value in [_current(config, {}, coordinate), *values]:
                if value == _current(config, chosen, coordinate) or builds >= budget or not best:
                    continue
                trial = {**chosen, coordinate: value}
                count = _mismatches(result, config, _changes(config, trial), target)
                builds += 1
                if count < best:
                    chosen, best, improved = trial, count, True
    return chosen, best, builds


def _mismatches(result: nn.Module, config: Any, changes: Mapping[str, Any],
                target: Mapping[str, tuple[int, ...]]) -> int:
    """How many parameters and buffers differ (in shape, or are missing on one side) between ``target`` and the
    model ``config`` with ``changes`` builds."""
    trial = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(trial, name, value)
    try:
        with _quiet(), torch.device("meta"):
            built = type(result)(trial)
    except Exception as e:  # a config the library refuses (a field out of its range) rebuilds nothing
        log.debug("metadata: %s(config) with %s fails: %s", type(result).__name__, dict(changes), e)
        return len(target) + 1
    shapes = _param_shapes(built)
    return sum(shapes.get(k) != target.get(k) for k in shapes.keys() | target.keys())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = logging.getLogger("transformers")
        level = hf.level
        hf.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hf.setLevel(level)


def _refuse_saving(result: nn.Module, config: Any) -> None:
    """``save_pretrained``/``push_to_hub`` of ``result`` raise before writing anything: ``config`` would rebuild
    the base network, with which the weights do not load."""
    for method in ("save_pretrained", "push_to_hub"):
        if callable(getattr(result, method, None)):
            object.__setattr__(result, method, functools.partial(_refuse, type(result).__name__,
                                                                 str(config.model_type), method))


def _refuse(name: str, model_type: str, method: str, *args: Any, **kwargs: Any) -> None:
    raise MetadataError(
        f"{name}.{method}: no {model_type} config describes the scaled network (a width or depth it has no field "
        "for), so from_pretrained would rebuild another network; nothing was written",
        "save it with compscale.checkpoint.save(model, path, model='package.module:callable') and rebuild it with "
        "compscale.checkpoint.load(path); or torch.save(model.state_dict(), path) and rebuild with compscale.scale.",
    )
