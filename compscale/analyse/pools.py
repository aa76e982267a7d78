"""Global pools written for one input size: fixed-window pools whose window is the whole map they pool.

A fixed-window pool written for the base size, whose window is the whole map it pools there (``nn.AvgPool2d(7)``
on ResNet's 7x7 map at 224), is a global pool: :func:`global_pool_nodes` finds them in a traced graph, and
:func:`global_stand_ins` stands each one in as an adaptive pool to one value, what it is at any input size once
:func:`compscale.rewrite.resolution.follow_global_pools` has resized it (the planner costs a new size so, and the
resolution pass traces so to learn the map each one is fed there).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compscale.layers import set_submodule
from compscale.trace import Traced

__all__ = ["POOL_FUNCTIONS", "Window", "as_dims", "global_pool_nodes", "global_stand_ins", "may_pool_whole_map",
           "pool_dims", "pool_window", "whole_map"]

_AVG_POOLS: dict[type[nn.Module], int] = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_MAX_POOLS: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3}
_ADAPTIVE: dict[tuple[bool, int], type[nn.Module]] = {
    (False, 1): nn.AdaptiveAvgPool1d, (False, 2): nn.AdaptiveAvgPool2d, (False, 3): nn.AdaptiveAvgPool3d,
    (True, 1): nn.AdaptiveMaxPool1d, (True, 2): nn.AdaptiveMaxPool2d, (True, 3): nn.AdaptiveMaxPool3d,
}
# pooling functions: (is max, dims, the names of their arguments after the input)
_AVG_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAX_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
POOL_FUNCTIONS: dict[Any, tuple[bool, int, tuple[str, ...]]] = {
    F.avg_pool1d: (False, 1, _AVG_ARGS[:-1]), F.avg_pool2d: (False, 2, _AVG_ARGS), F.avg_pool3d: (False, 3, _AVG_ARGS),
    torch.avg_pool1d: (False, 1, _AVG_ARGS[:-1]),
    F.max_pool1d: (True, 1, _MAX_ARGS), F.max_pool2d: (True, 2, _MAX_ARGS), F.max_pool3d: (True, 3, _MAX_ARGS),
}


@dataclasses.dataclass(frozen=True)
class Window:
    """A fixed pooling window over the last ``len(kernel)`` dims (``max``: max pooling, else average)."""

    max: bool
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    divisor_override: int | None = None


def as_dims(value: Any, n: int) -> tuple[int, ...]:
    """A pooling argument (one int, or one per dim) as one int per dim of ``n``."""
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


def pool_dims(pool: nn.Module) -> int:
    """The number of spatial dims a fixed-window pooling module pools over."""
    return _AVG_POOLS.get(type(pool)) or _MAX_POOLS[type(pool)]


def pool_window(node: fx.Node, root: nn.Module) -> Window | None:
    """The window of a fixed-window pooling node (an ``nn.AvgPool*d``/``nn.MaxPool*d`` call or their functions);
    ``None`` for any other node (adaptive pools included)."""
    if node.op == "call_module":
        m = root.get_submodule(str(node.target))
        n = _AVG_POOLS.get(type(m)) or _MAX_POOLS.get(type(m))
        if n is None:
            return None
        kernel = as_dims(m.kernel_size, n)
        return Window(type(m) in _MAX_POOLS, kernel, as_dims(m.stride or kernel, n), as_dims(m.padding, n),
                      as_dims(getattr(m, "dilation", 1), n), getattr(m, "divisor_override", None))
    spec = POOL_FUNCTIONS.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return None
    is_max, n, names = spec
    given = {**dict(zip(names, node.args[1:])), **node.kwargs}
    if any(isinstance(v, fx.Node) for v in given.values()) or "kernel_size" not in given:
        return None  # a window computed in forward: not a fixed one
    kernel = as_dims(given["kernel_size"], n)
    override = given.get("divisor_override")
    return Window(is_max, kernel, as_dims(given.get("stride") or kernel, n), as_dims(given.get("padding", 0), n),
                  as_dims(given.get("dilation", 1), n), override if isinstance(override, int) else None)


def whole_map(window: Window, shape: Sequence[int]) -> bool:
    """Whether ``window`` pools the whole map of a tensor of ``shape`` (its last dims) into one value per channel:
    its kernel is the map, unpadded, undilated, averaging over all of it (no ``divisor_override``) — a global pool
    written for one input size."""
    n = len(window.kernel)
    return (len(shape) > n and window.kernel == tuple(shape[-n:]) and not any(window.padding)
            and all(d == 1 for d in window.dilation) and window.divisor_override is None)


def may_pool_whole_map(root: nn.Module) -> bool:
    """Whether ``root`` has a pooling module that may pool a whole map (unpadded, undilated, no divisor override):
    the others (ResNet's padded stem max pool) need no trace to be told apart."""
    return any((type(m) in _AVG_POOLS or type(m) in _MAX_POOLS) and not any(as_dims(m.padding, 1))
               and all(d == 1 for d in as_dims(getattr(m, "dilation", 1), 1))
               and getattr(m, "divisor_override", None) is None for m in root.modules())


def global_pool_nodes(traced: Traced) -> dict[str, str]:
    """The pooling-module nodes of ``traced`` whose window is their whole map (node name -> module path), of modules
    whose every call pools a whole map."""
    found: dict[str, str] = {}
    partial: set[str] = set()
    for node in traced.graph.nodes:
        window = pool_window(node, traced.gm) if node.op == "call_module" else None
        if window is None:
            continue
        arg = node.args[0] if node.args else None
        if isinstance(arg, fx.Node) and traced.has_shape(arg) and whole_map(window, traced.shape(arg)):
            found[node.name] = str(node.target)
        else:
            partial.add(str(node.target))
    return {name: path for name, path in found.items() if path not in partial}


@contextlib.contextmanager
def global_stand_ins(root: nn.Module, paths: Sequence[str]) -> Iterator[None]:
    """Within the block, each pooling module of ``paths`` is an adaptive pool of its kind to one value (what it is at
    any input size once :func:`~compscale.rewrite.resolution.follow_global_pools` resized it); the modules are put
    back after."""
    pools = {path: root.get_submodule(path) for path in paths}
    for path, pool in pools.items():
        set_submodule(root, path, _ADAPTIVE[type(pool) in _MAX_POOLS, pool_dims(pool)](1))
    try:
        yield
    finally:
        for path, pool in pools.items():
            set_submodule(root, path, pool)
