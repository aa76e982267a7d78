"""Adapt layers to the input size and the channels they are now fed: after a resolution change, or a dense block
that grew.

A model ending in global pooling needs nothing. A fixed-window pool written for the base size, whose window is the
whole map it pools there (``nn.AvgPool2d(7)`` on ResNet's 7x7 map at 224), is a global pool (found by
:mod:`compscale.analyse.pools`): at a new size its window follows the new map (``nn.AvgPool2d(8)`` at 256), as an
expert builds the network for that size, and the classifier after it keeps its features and weights
(:func:`follow_global_pools`). A head that flattens a spatial map into a ``Linear`` with fixed ``in_features`` is
found by shape propagation at the new size; the ``Linear`` takes the new number of features and fresh weights, with
a warning naming the fixed pool before it. A model whose output changes shape at the new size (a pool covering part
of the map before a 1x1-conv classifier), and anything else that cannot take the new size (fixed-size pooling
feeding an add, constant interpolate sizes), raises a ``ResolutionError`` that names the node.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch.fx as fx
from torch import nn

from compscale.analyse.pools import (
    POOL_FUNCTIONS,
    as_dims,
    global_pool_nodes,
    global_stand_ins,
    may_pool_whole_map,
    pool_dims,
    pool_window,
    whole_map,
)
from compscale.errors import ResolutionError, TraceError
from compscale.rewrite.init import InitRules, reinit
from compscale.rewrite.modules import channels, resize, set_submodule
from compscale.trace import Traced
from compscale.trace.parts import output_signature
from compscale.trace.tracer import module_path, propagate_shapes

__all__ = ["adapt_inputs", "follow_global_pools"]

log = logging.getLogger("compscale")


def follow_global_pools(root: nn.Module, traced: Traced, input_shape: Sequence[int]) -> list[str]:
    """Resize, for ``input_shape``, every pooling module of ``root`` whose window is its whole map at the base size;
    returns the paths changed.

    ``root`` is traced afresh at the base size (its blocks may have moved) to find them, and once at the new size
    with each one standing in as an adaptive pool to one value, which gives the map it is fed there: its kernel
    becomes that map (its stride too, where it equalled the kernel). A module that is also called where its window
    is not the whole map is left as it is, and so is a pooling function written in ``forward`` (warned about).

    Example:
        >>> from compscale.trace import trace
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=32), nn.AvgPool2d(7), nn.Flatten(), nn.Linear(8, 10))
        >>> follow_global_pools(net, trace(net, (1, 3, 224, 224)), (1, 3, 256, 256)), net[1]
        (['1'], AvgPool2d(kernel_size=8, stride=8, padding=0))
    """
    has_functions = any(n.target in POOL_FUNCTIONS for n in traced.graph.nodes if n.op == "call_function")
    if not may_pool_whole_map(root) and not has_functions:
        return []
    base = traced.retrace(root, traced.input_shape)
    for node in base.graph.nodes:
        window = pool_window(node, root) if node.op == "call_function" else None
        if window is not None and isinstance(node.args[0], fx.Node) and whole_map(window, base.shape(node.args[0])):
            _warn_functional(root, node, tuple(input_shape[2:]))
    paths = sorted(set(global_pool_nodes(base).values()))
    return _resize_pools(root, traced, input_shape, paths) if paths else []


def _resize_pools(root: nn.Module, traced: Traced, input_shape: Sequence[int], paths: list[str]) -> list[str]:
    """Give each pool of ``paths`` (whole-map pools at the base size) the map it is fed at ``input_shape``."""
    pools = {path: root.get_submodule(path) for path in paths}
    with global_stand_ins(root, paths):
        new = traced.retrace(root, input_shape)
    maps: dict[str, set[tuple[int, ...]]] = {}
    for node in new.graph.nodes:
        if node.op == "call_module" and str(node.target) in pools and isinstance(node.args[0], fx.Node):
            n = pool_dims(pools[str(node.target)])
            maps.setdefault(str(node.target), set()).add(tuple(new.shape(node.args[0])[-n:]))
    changed = []
    for path, pool in pools.items():
        sizes = maps.get(path, set())
        if len(sizes) != 1:  # called on maps of several sizes: no one window is each one's whole map
            continue
        _set_window(pool, next(iter(sizes)))
        changed.append(path)
        log.info("compscale: %s pools the whole %s map at input %s", path, "x".join(map(str, next(iter(sizes)))),
                 tuple(input_shape[2:]))
    return changed


def _set_window(pool: nn.Module, size: tuple[int, ...]) -> None:
    """``pool``'s kernel becomes ``size`` (an int where it was one and the map is square); a stride that equalled
    the kernel follows it (any stride gives one value when the kernel is the map)."""
    old = pool.kernel_size
    kernel: int | tuple[int, ...] = size[0] if isinstance(old, int) and len(set(size)) == 1 else size
    if pool.stride in (old, None) or as_dims(pool.stride, len(size)) == as_dims(old, len(size)):
        pool.stride = kernel  # type: ignore[assignment]
    pool.kernel_size = kernel  # type: ignore[assignment]


def _label(node: fx.Node, root: nn.Module) -> str:
    """A pooling node as a user finds it: its module's path, or the function and the forward that calls it."""
    if node.op == "call_module":
        return str(node.target)
    return f"{node.name} in the forward of {module_path(node) or type(root).__name__}"


def _warn_functional(root: nn.Module, node: fx.Node, size: tuple[int, ...]) -> None:
    warnings.warn(
        f"compscale: {_label(node, root)} pools its whole map with a window "
        f"written for the base size; at input {size} it pools only part of the map (or several windows of it). "
        "Make it adaptive (F.adaptive_avg_pool2d(x, 1)) or a module (nn.AvgPool2d), which compscale resizes",
        stacklevel=5,
    )


def adapt_inputs(
    root: nn.Module, traced: Traced, input_shape: Sequence[int], rules: InitRules | None, warn: bool = True,
    keep_ratio: Mapping[str, Fraction] | None = None, notes: dict[str, str] | None = None, current: bool = False,
) -> list[str]:
    """Resize the layers of ``root`` fed a different number of channels at ``input_shape``.

    A flatten head's ``Linear`` at a new input size (with a warning, ``warn``), and the layers after a dense
    block that grew (its transition, final norm and classifier). A layer keeps its outputs, except a norm (they
    follow its input) and a conv or linear of ``keep_ratio`` (path -> out / in: a DenseNet transition's
    compression), whose new outputs feed the layers after it in turn. Returns the paths of the layers changed.
    Given ``notes`` (``init="preserve"``'s record of what is not exact), a rebuilt head is noted there instead of
    warned about. ``current``: ``traced``'s graph still describes ``root`` (symbolic, the same leaves): it is
    rebound to ``root``'s layers instead of traced again.
    """
    probe = traced.rebind(root, input_shape, shapes=False) if current else traced.retrace_graph(root, input_shape)
    try:
        mismatched = propagate_shapes(probe, tolerate_inputs=True, keep_ratio=keep_ratio)
    except TraceError as e:
        if not warn:  # adapting to a dense block that grew, at the same input size
            raise
        raise ResolutionError(
            f"{type(root).__name__} cannot run at input {tuple(input_shape[2:])}: {str(e).splitlines()[0]}",
            "the model's shapes depend on its input size: use adaptive pooling (nn.AdaptiveAvgPool2d) and sizes "
            "relative to the input, or keep `resolution=1`.",
        ) from e
    pool = _last_partial_pool(probe, root) if warn else ""
    if warn:
        _check_outputs(root, traced, probe, tuple(input_shape[2:]), pool)
    for path, (features, out) in mismatched.items():
        old = root.get_submodule(path)
        before = channels(old)[0]
        new = resize(old, features, out)
        reinit(new, rules, template=old)
        set_submodule(root, path, new)
        if warn and notes is not None:
            notes.setdefault(path, f"takes {features} features at input {tuple(input_shape[2:])} instead of "
                                   f"{before}: fresh weights")
        elif warn:
            warnings.warn(
                f"compscale: {path} takes {features} features at input {tuple(input_shape[2:])} instead of "
                f"{before}; it was rebuilt with fresh weights{pool}",
                stacklevel=3,
            )
    return list(mismatched)


def _last_partial_pool(probe: Traced, root: nn.Module) -> str:
    """`` (after <node>, ...)`` naming the head's last fixed-window pool (after the last spatial conv) whose output is
    not one value per channel at the new size (what left the map larger than the classifier was built for), or
    ``""``."""
    for node in reversed(probe.graph.nodes):
        if node.op == "call_module":  # a pool before a spatial conv is not the head's
            m = root.get_submodule(str(node.target))
            if isinstance(m, nn.modules.conv._ConvNd) and math.prod(m.kernel_size) > 1:
                return ""
        window = pool_window(node, root)
        if window is not None and probe.has_shape(node) and math.prod(probe.shape(node)[-len(window.kernel):]) > 1:
            size = "x".join(str(d) for d in probe.shape(node)[-len(window.kernel):])
            return (f" (after {_label(node, root)}, a fixed {'x'.join(map(str, window.kernel))} window that gives a "
                    f"{size} map here: a pool covering part of the map stays as it is)")
    return ""


def _check_outputs(root: nn.Module, traced: Traced, probe: Traced, size: tuple[int, ...], pool: str) -> None:
    """The outputs keep their batch and channels (classes) at the new size, or a ``ResolutionError`` names why."""
    before = [output_signature(root, traced.shape(n)) for n in traced.output_nodes]
    after = [output_signature(root, probe.shape(n)) for n in probe.output_nodes if probe.has_shape(n)]
    if len(after) == len(before) and after != before:
        raise ResolutionError(
            f"{type(root).__name__} returns {after} at input {size} where it returned {before}{pool}",
            "make the pool adaptive (nn.AdaptiveAvgPool2d(1)) or cover the whole map, or keep `resolution=1`.",
        )
