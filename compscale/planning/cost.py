"""Cost of a planned network, without building it: MACs, parameters and activations from channel widths and sizes.

The planner costs the model's own graph when every stage repeats a block of its own (a new block copies it, so it
counts once more per block added); otherwise it traces one *probe* network on the meta device (no weights): the model
with one extra block per stage, so that every block a plan may add has a representative. A plan then costs, per
conv/linear layer, ``out * in / groups * kernel * H_out * W_out`` MACs (what ``FlopCounterMode`` counts for conv and
matmul, halved) and ``out * H_out * W_out`` activations for a conv (pycls's count, what
:func:`compscale.profile` counts), each layer of a stage's extra block counted ``blocks_after - blocks_before`` times.
Output sizes at a new input size come from conv arithmetic over the graph (checked against fx's shape
propagation at the base size); a graph with an op this arithmetic does not know falls back to fx's
shape propagation at every size.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compscale.analyse.channels import ChannelGraph, spatial_dims
from compscale.analyse.ops import BINARY
from compscale.analyse.pools import global_pool_nodes, global_stand_ins
from compscale.analyse.rules import get_function_rule, get_module_rule
from compscale.trace import Traced

__all__ = ["CostModel", "Costs", "layer_macs"]

Spatial = tuple[int, ...]


class Costs(NamedTuple):
    """What one input through the network costs: multiply-adds, parameters, conv output elements."""

    macs: int
    params: int
    acts: int


@dataclasses.dataclass(frozen=True)
class _Layer:
    path: str
    node: str
    kind: str  # "conv", "linear", "norm", "other"
    inputs: tuple[tuple[int, int], ...]  # (group, factor) segments; a factor > 1 follows a flatten
    output: int | None
    groups: int = 1
    depthwise: bool = False
    kernel: int = 1
    bias: bool = False
    flatten_src: str | None = None  # the node whose spatial map a linear's input flattened
    fixed_params: int = 0
    norm_params_per_channel: int = 0


class CostModel:
    """MACs and parameters of the probe network at any widths, stage depths and input size."""

    def __init__(self, traced: Traced, cg: ChannelGraph, extra_blocks: Mapping[int, Sequence[str]],
                 in_network: bool = False) -> None:
        """``extra_blocks``: per stage, the paths of the block (or the layers of the run) that each block added to it
        repeats: a block the probe added (counted only as often as blocks are added), or, ``in_network``, the
        stage's own repeat block, which new blocks copy (counted once more per block added)."""
        self.traced = traced
        self.extra_blocks = dict(extra_blocks)
        self._own = int(in_network)
        self.channel_dims = cg.channel_dims
        self.layers = _inventory(traced, cg)
        self._attrs = _attr_nodes(traced)
        self._global = global_pool_nodes(traced)  # pools of the whole map: they follow it at every size
        self._base_sizes = _recorded_spatial(traced, self.channel_dims, self._attrs)
        self._exact_arith = _spatial(traced, traced.input_shape[2:], self._attrs, self._global) == self._base_sizes

    def multiplicity(self, path: str, extra: Mapping[int, int]) -> int:
        """How many times a layer of the probe appears in a network with ``extra[s]`` blocks added to stage s."""
        for stage, paths in self.extra_blocks.items():
            if any(path == p or path.startswith(p + ".") for p in paths):
                return self._own + extra.get(stage, 0)
        return 1

    def spatial(self, input_size: Sequence[int]) -> dict[str, Spatial]:
        sizes = _spatial(self.traced, input_size, self._attrs, self._global) if self._exact_arith else None
        if sizes is not None:
            return sizes
        with global_stand_ins(self.traced.root, sorted(set(self._global.values()))):
            probe = self.traced.retrace(self.traced.root, (*self.traced.input_shape[:2], *input_size))
        return _recorded_spatial(probe, self.channel_dims, _attr_nodes(probe))

    def cost(self, widths: Mapping[int, int], extra: Mapping[int, int], input_size: Sequence[int]) -> Costs:
        """The costs with ``widths`` per group of the probe and ``extra[s]`` blocks added per stage."""
        sizes = self.spatial(input_size)
        macs = params = acts = 0
        for layer in self.layers:
            k = self.multiplicity(layer.path, extra)
            if k == 0:
                continue
            m, p, a = _layer_cost(layer, widths, sizes, self._base_sizes)
            macs, params, acts = macs + k * m, params + k * p, acts + k * a
        return Costs(macs, params, acts)


def layer_macs(out: int, fan_in: int, groups: int, kernel: int, positions: int) -> int:
    """Multiply-adds of a conv or linear layer: what ``FlopCounterMode`` counts for it, halved (the one formula the
    planner uses, here and for the layers of dense stages)."""
    return out * (fan_in // groups) * kernel * positions


def _layer_cost(layer: _Layer, widths: Mapping[int, int], sizes: Mapping[str, Spatial],
                base_sizes: Mapping[str, Spatial]) -> tuple[int, int, int]:
    """``(macs, params, acts)`` of one layer."""
    if layer.kind == "other":
        return 0, layer.fixed_params, 0
    out = widths[layer.output] if layer.output is not None else 0
    if layer.kind == "norm":
        return 0, out * layer.norm_params_per_channel, 0
    fan_in = sum(widths[g] * f for g, f in layer.inputs)
    if layer.flatten_src is not None:  # a flatten head: its features follow the flattened map's size
        fan_in = fan_in * math.prod(sizes[layer.flatten_src]) // math.prod(base_sizes[layer.flatten_src])
    if layer.depthwise:
        fan_in, groups = out, out
    else:
        groups = layer.groups
    weights = layer_macs(out, fan_in, groups, layer.kernel, 1)
    positions = math.prod(sizes.get(layer.node, ()))  # a linear over a channels-last map runs at every position
    acts = out * positions if layer.kind == "conv" else 0
    return layer_macs(out, fan_in, groups, layer.kernel, positions), weights + (out if layer.bias else 0), acts


def _map_pairs(traced: Traced, node: fx.Node, module: nn.Module, bias: bool, cg: ChannelGraph) -> list[_Layer]:
    """A conv reading and returning several maps (an octave conv), as one conv per (map in, map out): each at the
    smaller map's positions, where the octave conv runs it (pooling the larger map first, or upsampling after)."""
    assert isinstance(module, nn.modules.conv._ConvNd)
    outs = [u for u in node.users if u.target is operator.getitem and traced.has_shape(u)]
    layers: list[_Layer] = []
    for i, src in enumerate(node.all_input_nodes):
        for out in outs:
            at = min((src, out), key=lambda n: math.prod(spatial_dims(traced.shape(n), 1)))
            g_in, g_out = cg.node_groups[src.name], cg.node_groups[out.name]
            layers.append(_Layer(str(node.target), at.name, "conv", tuple((g, 1) for g in g_in), g_out[0], 1, False,
                                 math.prod(module.kernel_size), bias and i == 0))  # one bias per map out
    return layers


def _inventory(traced: Traced, cg: ChannelGraph) -> list[_Layer]:
    nodes = {n.name: n for n in traced.graph.nodes}
    layers = []
    seen: set[str] = set()
    for node in traced.graph.nodes:
        if node.op != "call_module" or str(node.target) in seen:
            continue
        path = str(node.target)
        seen.add(path)
        module = traced.gm.get_submodule(path)
        own = sum(p.numel() for p in module.parameters(recurse=False))
        bias = getattr(module, "bias", None) is not None
        if path in cg.layers and not traced.has_shape(node):  # maps in and out (an octave conv)
            layers += _map_pairs(traced, node, module, bias, cg)
        elif path in cg.layers:
            lc = cg.layers[path]
            kind = "conv" if isinstance(module, nn.modules.conv._ConvNd) else "linear"
            kernel = math.prod(getattr(module, "kernel_size", (1,)))
            groups = getattr(module, "groups", 1)
            layers.append(_Layer(path, node.name, kind, lc.inputs, lc.output, groups, False, kernel, bias,
                                 _flatten_source(node, nodes) if any(f > 1 for _, f in lc.inputs) else None))
        elif path in cg.depthwise:
            g = cg.depthwise[path][0]
            assert isinstance(module, nn.modules.conv._ConvNd)
            layers.append(_Layer(path, node.name, "conv", ((g, 1),), g, module.groups, True,
                                 math.prod(module.kernel_size), bias))
        elif path in cg.norms and len(cg.norms[path]) == 1:
            per_channel = own // max(1, cg.groups[cg.norms[path][0]].base)
            layers.append(_Layer(path, node.name, "norm", (), cg.norms[path][0], norm_params_per_channel=per_channel))
        elif own:
            layers.append(_Layer(path, node.name, "other", (), None, fixed_params=own))
    for path, gs in cg.norms.items():  # a norm whose forward is traced through (LayerNorm2d calling F.layer_norm)
        if path not in seen and len(gs) == 1:
            own = sum(p.numel() for p in traced.root.get_submodule(path).parameters(recurse=False))
            layers.append(_Layer(path, "", "norm", (), gs[0], norm_params_per_channel=own // cg.groups[gs[0]].base))
            seen.add(path)
    params = dict(traced.gm.named_parameters())
    for node in traced.graph.nodes:  # tensor attributes: a layer scale runs over channels, the rest is fixed
        target = str(node.target)
        if node.op != "get_attr" or target in seen or target.rpartition(".")[0] in seen:
            continue
        seen.add(target)
        numel = params[target].numel() if target in params else 0
        if target in cg.params and len(cg.params[target][1]) == 1:
            g = cg.params[target][1][0]
            layers.append(_Layer(target, node.name, "norm", (), g, norm_params_per_channel=numel // cg.groups[g].base))
        elif numel:
            layers.append(_Layer(target, node.name, "other", (), None, fixed_params=numel))
    return layers


def _flatten_source(node: fx.Node, nodes: Mapping[str, fx.Node]) -> str | None:
    """The spatial map a linear's input was flattened from (walking back through elementwise ops)."""
    cur = node.all_input_nodes[0] if node.all_input_nodes else None
    while cur is not None:
        shape = cur.meta.get("tensor_meta")
        if shape is not None and len(shape.shape) > 2:
            return cur.name
        cur = cur.all_input_nodes[0] if cur.all_input_nodes else None
    return None


def _recorded_spatial(traced: Traced, channel_dims: Mapping[str, int], attrs: set[fx.Node]) -> dict[str, Spatial]:
    return {n.name: spatial_dims(traced.shape(n), channel_dims.get(n.name, 1)) for n in traced.graph.nodes
            if n not in attrs and traced.has_shape(n) and len(traced.shape(n)) > 2}


def _attr_nodes(traced: Traced) -> set[fx.Node]:
    """Tensor attributes and what is computed from them alone (``gamma[:, None, None]``): no feature maps."""
    attrs: set[fx.Node] = set()
    for n in traced.graph.nodes:
        if n.op == "get_attr" or (n.op != "placeholder" and n.all_input_nodes
                                  and all(a in attrs for a in n.all_input_nodes)):
            attrs.add(n)
    return attrs


_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _spatial(traced: Traced, input_size: Sequence[int], attrs: set[fx.Node],
             global_pools: Mapping[str, str]) -> dict[str, Spatial] | None:
    """Output spatial size of every 4-d node at ``input_size``, by conv arithmetic; ``None`` for an unknown op.

    Sizes exclude the channel dimension wherever it is, so ops that move it (``permute``) keep them. The nodes of
    ``global_pools`` pool their whole map, as the built network's do at every size.
    """
    out: dict[str, Spatial] = {}
    for node in traced.graph.nodes:
        if node in attrs or not traced.has_shape(node) or len(traced.shape(node)) <= 2:
            continue
        size = _node_spatial(traced, node, out, tuple(input_size))
        if node.name in global_pools and size is not None:
            size = (1,) * len(size)
        if size is None:
            return None
        out[node.name] = size
    return out


def _node_spatial(traced: Traced, node: fx.Node, known: Mapping[str, Spatial], input_size: Spatial) -> Spatial | None:
    if node.op == "placeholder":
        return input_size
    ins = [known[a.name] for a in node.all_input_nodes if a.name in known]
    if not ins:
        return None
    if node.op == "call_module":
        module = traced.gm.get_submodule(str(node.target))
        if isinstance(module, (nn.modules.conv._ConvNd, *_POOLS)):
            return _window(module, ins[0])
        if isinstance(module, _ADAPTIVE):
            return _adaptive(module.output_size, ins[0])
        return ins[0] if get_module_rule(module) is not None else None
    if node.target in BINARY:
        return tuple(max(d) for d in zip(*ins))
    if node.target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        return _adaptive(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"), ins[0])
    if node.target in ("mean", "amax", "sum") and node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2]):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        reduced = {dims} if isinstance(dims, int) else set(dims) if isinstance(dims, (list, tuple)) else set()
        ndim = len(ins[0]) + 2
        return tuple(1 if i + 2 in {d % ndim for d in reduced if isinstance(d, int)} else n  # a channels-first map
                     for i, n in enumerate(ins[0]))
    if get_function_rule(node) is not None and node.target not in (F.interpolate, F.avg_pool2d, F.max_pool2d):
        return ins[0]
    return None


def _adaptive(output_size: object, size: Spatial) -> Spatial | None:
    """An adaptive pool's output size (``None`` entries keep the input's)."""
    if isinstance(output_size, int):
        return (output_size,) * len(size)
    if isinstance(output_size, (tuple, list)):
        return tuple(o if isinstance(o, int) else n for o, n in zip(output_size, size))
    return None


def _window(module: nn.Module, size: Spatial) -> Spatial:
    """PyTorch's output-size arithmetic of conv and pooling windows."""
    def pair(v: object) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, tuple) else (int(v),) * len(size)  # type: ignore[call-overload]

    k, s, d = pair(module.kernel_size), pair(module.stride or module.kernel_size), pair(getattr(module, "dilation", 1))
    p = pair(module.padding) if not isinstance(module.padding, str) else None
    ceil = getattr(module, "ceil_mode", False)
    result = []
    for i, n in enumerate(size):
        if p is None:  # padding="same" or "valid"
            result.append(n if module.padding == "same" else (n - d[i] * (k[i] - 1) - 1) // s[i] + 1)
            continue
        span = n + 2 * p[i] - d[i] * (k[i] - 1) - 1
        o = (-(-span // s[i]) if ceil else span // s[i]) + 1
        if ceil and (o - 1) * s[i] >= n + p[i]:
            o -= 1
        result.append(o)
    return tuple(result)
