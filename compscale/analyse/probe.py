"""Probe an op that has no channel rule: does it map channels one to one?

An op without a registered rule (a function, a ``Tensor`` method, a leaf module) whose one tensor input carries
channels is run, on CPU in float32, on random tensors with two channel counts: the traced one and a few more;
their other dimensions are the traced ones cut to at most 16 (the traced ones if the op fails on those). It
maps channels one to one when its output keeps the rank and the channel count in both runs, and changing input
channels changes no other output channel: the first, a middle and the last channel one at a time (shifted far
up and far down, so that a global gate such as ``x * (x.mean() > 0)`` flips), then, with the traced count,
halves of the channels chosen by each bit of the channel index and replaced by noise, so that every pair of
channels is told apart once. Changes below 1e-6 of the output's magnitude count as none.

An op that fails with the other channel count (a module with weights sized to its channels, a literal
reshape), returns no tensor, or reads another graph value is not probed: the analysis refuses it as before.
An op that mixes channels is refused with the channels that showed it. Probing has no side effects: a leaf
module runs as an eval-mode deep copy, under ``no_grad``; each run draws from a generator of its own seeded alike
(:mod:`compscale.randomness`: torch's global generator is neither seeded nor drawn from, so a stochastic
per-channel op probes consistently), and Python's ``random`` is seeded alike and restored afterwards.
Verdicts are cached per analysis, by target, constant arguments and input shape.

Example:
    >>> import torch, torch.fx as fx
    >>> from torch import nn
    >>> from compscale.analyse import analyse_channels
    >>> from compscale.trace import trace
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
    ...     def forward(self, x):
    ...         return self.b(torch.flip(self.a(x), dims=(2,)))  # no rule for torch.flip: probed
    >>> cg = analyse_channels(trace(Net(), (1, 3, 16, 16)))
    >>> cg.group_of("a").id == cg.layers["b"].inputs[0][0]
    True
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
import torch.fx as fx

from compscale.randomness import Draws, drawing_from

if TYPE_CHECKING:
    from compscale.analyse.channels import RuleContext
    from compscale.analyse.rules import Desc

__all__ = ["probed_rule"]

log = logging.getLogger(__name__)

_EXTRA_CHANNELS = 3  # the second run's channel count is the traced one plus these
_RTOL = 1e-6  # a change below this fraction of the output's magnitude is no change
_SEED = 0
_SMALL = 16  # probe maps at most this long in every dimension but the channels, where the op allows


@dataclasses.dataclass(frozen=True)
class _Verdict:
    """What probing an op found: ``detail`` says which channels mix, or why it could not be probed."""

    kind: Literal["one to one", "mixes", "not probed"]
    detail: str = ""


class _NotProbed(Exception):
    """The op cannot be probed (it fails on the probe tensors, or returns something else than one tensor)."""


# verdicts per analysis (a RuleContext), by target, constant arguments and input shape
_CACHE: weakref.WeakKeyDictionary[Any, dict[Hashable, _Verdict]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def probed_rule(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """The descriptor of ``node`` (a call without a registered rule) if probing shows that it maps channels one
    to one: its input's. ``None`` when it cannot be probed (the caller refuses the node).

    Raises:
        UnsupportedOpError: probing shows that the op mixes channels.
    """
    src = _channel_input(ctx, node)
    if src is None:
        return None
    key = _cache_key(ctx, node, src)
    verdict = _cached(ctx, key)
    if verdict is None:
        start = time.perf_counter()
        verdict = _probe(ctx, node, src)
        log.debug("probed %s in %.1f ms: %s %s", node.format_node(), 1e3 * (time.perf_counter() - start),
                  verdict.kind, verdict.detail)
        if verdict.kind == "one to one":
            log.info("compscale probed %s (node %s): it maps channels one to one", _what(ctx, node), node.name)
        _store(ctx, key, verdict)
    if verdict.kind == "mixes":
        ctx.unsupported(node, f"no channel rule for {_what(ctx, node)}, and probing shows it mixes channels "
                        f"({verdict.detail})")
    if verdict.kind == "not probed":
        return None
    return ctx.desc(src)


def _channel_input(ctx: RuleContext, node: fx.Node) -> fx.Node | None:
    """The one graph value ``node`` reads, if it is a floating-point tensor with channels and ``node``'s output
    has as many dimensions (``None`` for any other call: it is not probed)."""
    inputs = node.all_input_nodes
    if len(inputs) != 1 or not ctx.is_tensor(inputs[0]):
        return None
    src = inputs[0]
    if node.op == "call_method" and (not node.args or node.args[0] is not src):
        return None  # a method of another object than the channel tensor
    dtype = getattr(src.meta.get("tensor_meta"), "dtype", None)
    if dtype is None or not dtype.is_floating_point or len(ctx.shape(node)) != len(ctx.shape(src)):
        return None
    return src


def _what(ctx: RuleContext, node: fx.Node) -> str:
    """How the analysis names a call without a rule: ``module type Gate``, ``call_function flip``."""
    if node.op == "call_module":
        return f"module type {type(ctx.traced.module(node)).__name__}"
    name = repr(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {name}"


# --- cache --------------------------------------------------------------------------------------


def _cache_key(ctx: RuleContext, node: fx.Node, src: fx.Node) -> Hashable | None:
    """What decides a verdict: the target (a module by its path), the constant arguments, the input's shape and
    channel dimension; ``None`` for an unhashable target (not cached)."""
    consts = repr(fx.node.map_arg((node.args, node.kwargs), lambda _: "<input>"))
    key = (node.op, node.target, consts, ctx.shape(src), ctx.channel_dim(src))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached(ctx: RuleContext, key: Hashable | None) -> _Verdict | None:
    if key is None:
        return None
    with _CACHE_LOCK:
        return _CACHE.get(ctx, {}).get(key)


def _store(ctx: RuleContext, key: Hashable | None, verdict: _Verdict) -> None:
    if key is not None:
        with _CACHE_LOCK:
            _CACHE.setdefault(ctx, {})[key] = verdict


# --- probing ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """``node``'s call with its channel tensor replaced by a probe tensor and its constants kept."""

    node: fx.Node
    fn: Callable[..., Any]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        args = cast(tuple[Any, ...], fx.node.map_arg(self.node.args, lambda _: x.clone()))
        kwargs = cast(dict[str, Any], fx.node.map_arg(self.node.kwargs, lambda _: x.clone()))
        random.seed(_SEED)
        try:  # a stochastic op draws the same numbers in every run, from a generator of its own
            with drawing_from(Draws(_SEED)):
                if self.node.op == "call_method":
                    out = getattr(args[0], str(self.node.target))(*args[1:], **kwargs)
                else:
                    out = self.fn(*args, **kwargs)
        except Exception as e:  # any failure of the user's op: it is not probed, the analysis refuses it
            raise _NotProbed(f"it fails on a probe tensor of shape {tuple(x.shape)}: {type(e).__name__}: {e}") from e
        if not isinstance(out, torch.Tensor) or out.is_complex():
            raise _NotProbed(f"it returns {type(out).__name__}, not one real tensor")
        return out.detach().float()


def _probe(ctx: RuleContext, node: fx.Node, src: fx.Node) -> _Verdict:
    """Run ``node``'s op on a small map (each dimension but the channels at most ``_SMALL``), or on the traced
    shape when it fails there (an op written for its traced size)."""
    shape, cdim = ctx.shape(src), ctx.channel_dim(src)
    small = tuple(d if i == cdim else min(d, _SMALL) for i, d in enumerate(shape))
    py_state = random.getstate()
    try:
        with torch.no_grad():
            call = _Call(node, _callable(ctx, node))
            if small != shape:
                with contextlib.suppress(_NotProbed):
                    return _probe_at(call, small, None, cdim)
            return _probe_at(call, shape, ctx.shape(node), cdim)
    except _NotProbed as e:
        return _Verdict("not probed", str(e))
    finally:
        random.setstate(py_state)


def _probe_at(call: _Call, shape: tuple[int, ...], out_shape: tuple[int, ...] | None, cdim: int) -> _Verdict:
    """Probe on inputs of ``shape`` with its channel count and a few more; ``out_shape``: the traced output's,
    which the op must reproduce (``None``: only its rank and channel count are checked)."""
    for extra in (0, _EXTRA_CHANNELS):
        in_shape = _with_channels(shape, cdim, shape[cdim] + extra)
        expect = _with_channels(out_shape, cdim, shape[cdim] + extra) if out_shape is not None else None
        mixing = _mixing(call, in_shape, expect, cdim, every_pair=extra == 0)
        if mixing is not None:
            return _Verdict("mixes", mixing)
    return _Verdict("one to one")


def _callable(ctx: RuleContext, node: fx.Node) -> Callable[..., Any]:
    """What ``node`` calls; a module as an eval-mode float32 CPU deep copy (the user's module is never run)."""
    if node.op != "call_module":
        return cast(Callable[..., Any], node.target)
    try:
        return copy.deepcopy(ctx.traced.module(node)).to(device="cpu", dtype=torch.float32).eval()
    except Exception as e:  # a module that cannot be copied or moved (meta tensors, handles): not probed
        raise _NotProbed(f"its module cannot be copied to the CPU: {type(e).__name__}: {e}") from e


def _with_channels(shape: tuple[int, ...], cdim: int, channels: int) -> tuple[int, ...]:
    return (*shape[:cdim], channels, *shape[cdim + 1:])


def _mixing(call: _Call, in_shape: tuple[int, ...], out_shape: tuple[int, ...] | None, cdim: int,
            every_pair: bool) -> str | None:
    """How changing input channels changes other output channels (``None``: it does not). ``every_pair``: after
    the single channels, the halves by each bit of the channel index, so that any two channels are told apart.

    Raises:
        _NotProbed: the op fails, or its output has another shape than ``out_shape`` (when ``None``: another rank
            or channel count than its input).
    """
    gen = torch.Generator().manual_seed(_SEED)
    x = torch.randn(in_shape, generator=gen)
    out = call(x)
    if (tuple(out.shape) != out_shape if out_shape is not None
            else out.dim() != x.dim() or out.shape[cdim] != x.shape[cdim]):
        raise _NotProbed(f"on an input of shape {in_shape} it returns shape {tuple(out.shape)}")
    far = 10 * (1 + float(x.abs().max()))
    magnitude = float(torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).abs().max()) if out.numel() else 0.0
    base = _Baseline(call, x, out, _RTOL * (out.abs() + magnitude), far * torch.randn(in_shape, generator=gen), cdim)
    for chans, delta in _changes(in_shape[cdim], far, every_pair):
        hits = base.changed(chans, delta).nonzero()
        if len(hits):
            return _describe(base, chans, int(hits[0]))
    return None


@dataclasses.dataclass
class _Baseline:
    """A probe input ``x``, the op's output on it, the tolerance of each output element (``_RTOL`` of its own
    magnitude plus the output's largest), and the noise that replaces channels."""

    call: _Call
    x: torch.Tensor
    out: torch.Tensor
    tol: torch.Tensor
    noise: torch.Tensor
    cdim: int

    def changed(self, chans: list[int], delta: float | None) -> torch.Tensor:
        """Per output channel but ``chans``, whether it changes when input channels ``chans`` are shifted by
        ``delta`` (replaced by noise when ``None``). NaN where the output had NaN, and equal infinities, are no
        change."""
        out = self.call(_perturbed(self.x, self.cdim, chans, delta, self.noise))
        changed = ((out - self.out).abs() <= self.tol).logical_not_()  # a NaN difference counts, refined below
        per_channel = self._per_channel(changed)
        per_channel[chans] = False
        if bool(per_channel.any()):
            changed &= (out != self.out) & ~(out.isnan() & self.out.isnan())
            per_channel &= self._per_channel(changed)
        return per_channel

    def _per_channel(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.movedim(self.cdim, 0).reshape(mask.shape[self.cdim], -1).any(dim=1)


def _changes(channels: int, far: float, every_pair: bool) -> Iterator[tuple[list[int], float | None]]:
    """Channel sets to change and how (a shift by ``delta``, or noise when ``None``): the first, a middle and
    the last channel one by one, shifted far up and far down (a global gate flips one way or the other), then
    for each bit of the channel index the channels with it set, and unset, replaced by noise."""
    for c in sorted({0, channels // 2, channels - 1}):
        for delta in (far, -far):
            yield [c], delta
    for bit in range(max(channels - 1, 1).bit_length() if every_pair else 0):
        for value in (0, 1):
            chans = [c for c in range(channels) if (c >> bit) & 1 == value]
            if 0 < len(chans) < channels:
                yield chans, None


def _perturbed(x: torch.Tensor, cdim: int, chans: list[int], delta: float | None,
               noise: torch.Tensor) -> torch.Tensor:
    """``x`` with channels ``chans`` shifted by ``delta``, or replaced by ``noise`` when ``delta`` is ``None``."""
    mask = torch.zeros(x.shape[cdim], dtype=torch.bool)
    mask[chans] = True
    mask = mask.view(*(-1 if d == cdim else 1 for d in range(x.dim())))
    return torch.where(mask, noise if delta is None else x + delta, x)


def _describe(base: _Baseline, chans: list[int], leak: int) -> str:
    """Which input channel changes output channel ``leak``: halve ``chans`` while one half alone still does."""
    while len(chans) > 1:
        halves = (chans[: len(chans) // 2], chans[len(chans) // 2:])
        found = next((h for h in halves if bool(base.changed(h, None)[leak])), None)
        if found is None:  # only the channels together do (or the op is not deterministic)
            return f"channels {_span(chans)} of its input together change channel {leak} of its output"
        chans = found
    return f"channel {chans[0]} of its input changes channel {leak} of its output"


def _span(chans: list[int]) -> str:
    return ", ".join(map(str, chans)) if len(chans) <= 4 else f"{chans[0]}, {chans[1]}, ..., {chans[-1]}"
