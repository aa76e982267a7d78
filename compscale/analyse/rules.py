"""Channel rules: how each op maps the channel spaces of its inputs to those of its output.

A *descriptor* is a tuple of segments ``(space, factor)``: the tensor's channel dimension is the
concatenation of the spaces, each repeated ``factor`` times (``factor > 1`` after a flatten of a
spatial map). Rules are small functions ``rule(ctx, node, module) -> descriptor``, registered per
module type or per function, in the register/get style of timm's registries.

Example: a custom layer that keeps its input channels::

    compscale.register_channel_rule(MyGate, compscale.analyse.rules.elementwise)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import operator
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from compscale.analyse.ops import BINARY, OpKind, targets
from compscale.analyse.probe import probed_rule
from compscale.layers import ELEMENTWISE
from compscale.registry import drop_path_attr, drop_path_types
from compscale.trace import module_path

if TYPE_CHECKING:
    from compscale.analyse.channels import RuleContext

__all__ = [
    "BUILTIN",
    "ChannelRules",
    "Desc",
    "FunctionRule",
    "GroupedView",
    "ModuleRule",
    "active_rules",
    "as_rules",
    "channel_rules",
    "elementwise",
    "fixed",
    "get_function_rule",
    "get_module_rule",
    "register_channel_rule",
    "unregister_channel_rule",
    "user_rules",
]

Desc = tuple[tuple[int, int], ...]


class GroupedView(NamedTuple):
    """A view of ``desc``'s channels as several dims, ``(N, *factors, *spatial)`` (``prod(factors)`` = channels),
    whose axes are in ``order`` (a channel shuffle transposes two; ResNeSt's radix softmax a unit one)."""

    desc: Desc
    factors: tuple[int, ...]
    order: tuple[int, ...]

    def shuffled(self) -> bool:
        """Whether the axes of size above 1 are out of their original order (the view permutes channels)."""
        long = [i for i in self.order if self.factors[i] != 1]
        return long != sorted(long)

ModuleRule = Callable[["RuleContext", "fx.Node", nn.Module], Desc]
FunctionRule = Callable[["RuleContext", "fx.Node"], "Desc | None"]

Target = Any  # a module type, a function, or a Tensor method name


class ChannelRules:
    """A registry of channel rules (module type or function -> rule) that can be scoped, copied and pickled.

    Look-ups fall through to ``parent``: the built-in rules are the root, the process-wide user rules
    (:func:`register_channel_rule`) sit on them, and :func:`channel_rules` scopes more on top for a ``with``
    block (per thread and per task, through a ``contextvars.ContextVar``). ``compscale.scale(..., rules=...)``
    and ``compscale.search`` carry a ``ChannelRules`` into their calls and worker processes; its rules must be
    picklable (module-level functions) for a process pool.
    """

    def __init__(self, rules: Mapping[Target, Callable[..., Desc | None]] | None = None,
                 parent: ChannelRules | None = None) -> None:
        self.modules: dict[type[nn.Module], Callable[..., Desc | None]] = {}
        self.functions: dict[Target, Callable[..., Desc | None]] = {}
        self.parent = parent
        for target, rule in (rules or {}).items():
            self.register(target, rule)

    def register(self, target: Target, rule: Callable[..., Desc | None]) -> None:
        if not callable(rule):
            raise TypeError(f"rule must be a function rule(ctx, node, module) -> channels (e.g. "
                            f"compscale.analyse.rules.elementwise), got {type(rule).__name__} {rule!r:.40}")
        if _is_module_type(target):
            self.modules[target] = rule
        else:
            self.functions[target] = rule

    def own(self, target: Target) -> Callable[..., Desc | None] | None:
        """The rule registered for exactly ``target`` here or in a parent (no subclass look-up)."""
        table: Mapping[Any, Any] = self.modules if _is_module_type(target) else self.functions
        if target in table:
            return table[target]
        return self.parent.own(target) if self.parent is not None else None

    def module_rule(self, module: nn.Module) -> Callable[..., Desc | None] | None:
        """The rule of ``module``'s class or its nearest base class, the innermost registry first."""
        for cls in type(module).__mro__:
            rule = self.own(cls)
            if rule is not None:
                return rule
        return None

    def function_rule(self, target: Target) -> Callable[..., Desc | None] | None:
        try:
            return self.own(target)
        except TypeError:  # an unhashable target
            return None

    def remove(self, target: Target) -> None:
        """Forget this registry's own rule for ``target`` (a parent's rule, if any, shows through again)."""
        table: dict[Any, Any] = self.modules if _is_module_type(target) else self.functions
        table.pop(target, None)

    def flatten(self, stop: ChannelRules | None = None) -> ChannelRules:
        """One registry holding what this one sees, parents included up to ``stop`` (a snapshot, for pickling)."""
        below = self.parent if self.parent is not stop else None
        flat = below.flatten(stop) if below is not None else ChannelRules()
        flat.modules.update(self.modules)
        flat.functions.update(self.functions)
        return flat

    def __len__(self) -> int:
        return len(self.modules) + len(self.functions)


def _is_module_type(target: Target) -> bool:
    return isinstance(target, type) and issubclass(target, nn.Module)


BUILTIN = ChannelRules()
_USER = ChannelRules(parent=BUILTIN)
_ACTIVE: contextvars.ContextVar[ChannelRules] = contextvars.ContextVar("compscale_channel_rules", default=_USER)


def active_rules() -> ChannelRules:
    """The rules in force here: the innermost :func:`channel_rules` scope, else the process-wide ones."""
    return _ACTIVE.get()


def register_channel_rule(target: type[nn.Module] | Callable[..., Any] | str,
                          rule: Callable[..., Desc | None]) -> None:
    """Tell compscale, for this process, how ``target`` (a module type, a function, or a ``Tensor`` method name)
    maps channels. Overriding a built-in rule warns: it changes every later call.

    For one call or one block of code, prefer ``compscale.scale(..., rules={target: rule})`` or
    ``with compscale.channel_rules({target: rule}):``.
    """
    _USER.register(target, rule)  # checks the rule first
    builtin = BUILTIN.own(target)
    if builtin is not None and builtin is not rule:
        warnings.warn(f"compscale: register_channel_rule({getattr(target, '__name__', target)!r}) overrides a "
                      f"built-in rule for every later call in this process; scope it with "
                      f"`with compscale.channel_rules(...)` or scale(..., rules=...)", stacklevel=2)


def unregister_channel_rule(target: type[nn.Module] | Callable[..., Any] | str) -> None:
    """Undo :func:`register_channel_rule` for ``target`` (a built-in rule it overrode applies again)."""
    _USER.remove(target)


def user_rules() -> ChannelRules:
    """The user's rules in force here (process-wide and scoped, without the built-ins), as one picklable registry."""
    return active_rules().flatten(stop=BUILTIN)


@contextlib.contextmanager
def channel_rules(rules: Mapping[Target, Callable[..., Desc | None]] | ChannelRules | None = None,
                  ) -> Iterator[ChannelRules]:
    """Rules in force inside the ``with`` block only (this thread or task), on top of those already in force.

    Example:
        >>> with channel_rules({MyGate: elementwise}):          # doctest: +SKIP
        ...     wider = compscale.scale(net, width=1.5)
    """
    scoped = as_rules(rules)
    token = _ACTIVE.set(ChannelRules(parent=_ACTIVE.get()) if scoped is None else _chain(scoped, _ACTIVE.get()))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def as_rules(rules: Mapping[Target, Callable[..., Desc | None]] | ChannelRules | None) -> ChannelRules | None:
    if rules is None or isinstance(rules, ChannelRules):
        return rules
    return ChannelRules(rules)


def _chain(top: ChannelRules, below: ChannelRules) -> ChannelRules:
    """``top``'s own rules over everything ``below`` sees (``top``'s parents are replaced by ``below``)."""
    flat = top.flatten()
    return ChannelRules({**flat.modules, **flat.functions}, parent=below)


def get_module_rule(module: nn.Module) -> Callable[..., Desc | None] | None:
    rule = active_rules().module_rule(module)
    if rule is None and drop_path_attr(module) is not None:  # a drop-path type registered after import
        return elementwise
    return rule


def get_function_rule(node: fx.Node) -> FunctionRule | None:
    return active_rules().function_rule(node.target)


# --- module rules -------------------------------------------------------------------------------


def elementwise(ctx: RuleContext, node: fx.Node, module: nn.Module | None = None) -> Desc | None:
    """Output channels are the input's: activations, dropout, pooling, identity (a map without channels stays one)."""
    src_node = ctx.input_node(node)
    if _channelless(ctx, src_node):
        ctx.grouped[node] = ctx.grouped[src_node]
        return None
    return ctx.desc(src_node)


def fixed(ctx: RuleContext, node: fx.Node, module: nn.Module | None = None) -> Desc:
    """A layer compscale must not widen through: its input width is pinned and its output is a fixed new space."""
    return _pinned_out(ctx, node, ctx.input_desc(node), f"input of {node.name}")


def conv(ctx: RuleContext, node: fx.Node, module: nn.Module) -> Desc | None:
    assert isinstance(module, nn.modules.conv._ConvNd)
    if not ctx.traced.has_shape(node):  # maps in and out that split its channels (an octave convolution)
        conv_maps(ctx, node, module)
        return None
    src_node = ctx.input_node(node)
    if ctx.channel_dim(src_node) != 1 and module.in_channels == module.out_channels == ctx.shape(src_node)[1]:
        # a conv sliding along the channels (ECA's Conv1d over (N, 1, C)): its weights do not depend on them
        if ctx.shape(node)[ctx.channel_dim(src_node)] != ctx.channels(src_node):
            ctx.unsupported(node, "a convolution along the channels that changes their number")
        ctx.sliding.append(str(node.target))
        return ctx.desc(src_node)
    ctx.channels_first(node, type(module).__name__)
    src = ctx.input_desc(node)
    ctx.expect_width(node, src, module.in_channels)
    path = str(node.target)
    g = module.groups
    if g > 1 and g == module.in_channels == module.out_channels:  # depthwise: one space through
        ctx.member(src, path, "depthwise")
        return src
    out = ctx.new_space(node, module.out_channels)
    ctx.layer(path, src, out, node)
    if g > 1:
        for desc in (src, out):
            ctx.divisor(desc, g, f"{path} (groups={g})")
        if g == module.in_channels:  # depthwise with a channel multiplier
            ctx.tie(out, src, module.out_channels // g, interleaved=True)
    return out


def conv_maps(ctx: RuleContext, node: fx.Node, module: nn.Module) -> None:
    """A convolution reading several maps and returning several (an octave convolution's high- and low-frequency
    maps, ``None`` where there is none), their channels summing to its ``in_channels`` and ``out_channels``: each map
    out is a new space, the layer writes their sum, and the channel counts at which ``forward`` cuts its weight
    between the maps (attributes it reads, as ``self.h_in_channels``) follow the maps' widths. Records
    ``ctx.multi[node]`` for the ``getitem`` of each map; returns ``None``.
    """
    assert isinstance(module, nn.modules.conv._ConvNd)
    path = str(node.target)
    src = tuple(p for a in node.all_input_nodes for p in ctx.desc(a))
    ctx.expect_width(node, src, module.in_channels)
    metas = node.meta["tensor_meta"]
    pieces = [ctx.new_space(node, m.shape[1]) if m is not None else () for m in metas]
    outs = tuple(p for piece in pieces for p in piece)
    out = outs if len(outs) == 1 else ctx.new_space(node, module.out_channels)
    for i, p in enumerate(outs if len(outs) > 1 else ()):  # the maps follow the layer's width, as it cuts it
        ctx.part((p,), out, i, [ctx.width((q,)) for q in outs])
    ctx.layer(path, src, out, node)
    taken: set[str] = {"in_channels", "out_channels"}
    for side, maps in (("in", [(a,) for a in ctx.refine(src)]), ("out", [(p,) for p in outs])):
        for k in range(1, len(maps) + 1):  # the bound after the k-th map: needed inside, kept current at the end
            ctx.follow_bound(node, module, maps[:k], side, taken, required=k < len(maps))
    for p in outs if len(outs) > 1 else ():  # each map's own width, where the layer keeps it (`l_out_channels`)
        ctx.follow_bound(node, module, [(p,)], "out", taken, required=False, read=False)
    ctx.multi[node] = [piece if piece else out for piece in pieces]


def norm(ctx: RuleContext, node: fx.Node, module: nn.Module) -> Desc:
    ctx.channels_first(node, type(module).__name__)
    src = ctx.input_desc(node)
    if isinstance(module, nn.GroupNorm):
        ctx.divisor(src, module.num_groups, f"{node.target} (num_groups={module.num_groups})")
    if any(p is not None for p in (getattr(module, "weight", None), getattr(module, "running_mean", None))):
        ctx.member(src, str(node.target), "norm")
    return src


def layer_norm(ctx: RuleContext, node: fx.Node, module: nn.Module) -> Desc:
    """A LayerNorm over the channels: of an ``(N, C)`` tensor, or of a channels-last ``(N, H, W, C)`` one."""
    assert isinstance(module, nn.LayerNorm)
    _check_layer_norm(ctx, node, tuple(module.normalized_shape))
    src = ctx.input_desc(node)
    ctx.member(src, str(node.target), "norm")  # its normalized_shape follows the width, affine or not
    return src


def _check_layer_norm(ctx: RuleContext, node: fx.Node, normalized: tuple[int, ...]) -> None:
    ctx.channels_last(node, "LayerNorm")
    if normalized != (ctx.channels(ctx.input_node(node)),):
        ctx.unsupported(node, f"LayerNorm over {normalized}, not over the channels alone")


def linear(ctx: RuleContext, node: fx.Node, module: nn.Module) -> Desc:
    """A Linear over the channels: of an ``(N, C)`` tensor, or of a channels-last ``(N, H, W, C)`` one."""
    assert isinstance(module, nn.Linear)
    ctx.channels_last(node, "Linear")
    src = ctx.input_desc(node)
    ctx.expect_width(node, src, module.in_features)
    out = ctx.new_space(node, module.out_features)
    ctx.layer(str(node.target), src, out, node)
    return out


def flatten_module(ctx: RuleContext, node: fx.Node, module: nn.Module | None = None) -> Desc:
    """``nn.Flatten``, ``torch.flatten``, ``x.flatten``: the channels repeated over the flattened spatial dims."""
    return ctx.flatten(node, ctx.input_node(node))


# --- function rules -----------------------------------------------------------------------------


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of a call, passed by position or as keyword ``name``."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _binary(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """add/sub/mul/div: channels of tensor operands are one space (broadcast size-1 channels excepted, and pinned
    to one channel).

    A tensor attribute operand (a layer scale ``gamma * x``) runs over the same channels along the dimension
    broadcasting aligns with the other operand's channels.
    """
    args = [*node.args[:2], *(v for k, v in node.kwargs.items() if k == "other")]
    operands = [a for a in args if isinstance(a, fx.Node) and ctx.is_tensor(a)]
    if operands and all(_channelless(ctx, a) for a in operands):  # max + mean of two maps without channels
        ctx.grouped[node] = ctx.grouped[operands[0]]
        return None
    wide = [a for a in operands if ctx.channels(a) > 1]
    if not operands:
        ctx.unsupported(node, "an arithmetic op without a tensor operand that carries channels")
    desc = ctx.desc((wide or operands)[0])
    for other in wide[1:]:
        ctx.union(desc, ctx.desc(other), node)
    for one in (a for a in operands if wide and ctx.channels(a) == 1):
        # a map of one channel broadcast over the others (a spatial attention gate): it must stay one channel
        ctx.pin(ctx.desc(one), f"one channel broadcast over {ctx.channels(wide[0])} at {node.name}")
    for attr in (a for a in args if isinstance(a, fx.Node) and a in ctx.attrs):
        _scale_param(ctx, node, attr, (wide or operands)[0], desc)
    return desc


def _attr_shape(node: fx.Node) -> tuple[int, ...]:
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(shape) if shape is not None else ()


def _scale_param(ctx: RuleContext, node: fx.Node, view: fx.Node, peer: fx.Node, desc: Desc) -> None:
    """Record the tensor attribute behind ``view``, broadcast against ``peer``, as a per-channel parameter.

    The attribute must have one dimension of size above 1 (a vector, however reshaped); it runs over
    ``peer``'s channels when broadcasting lines that dimension up with them (else it is per position, or
    a scalar, and does not depend on the width).
    """
    attr = ctx.attrs[view]
    shape, vshape = _attr_shape(attr), _attr_shape(view)
    long, vlong = [i for i, d in enumerate(shape) if d != 1], [i for i, d in enumerate(vshape) if d != 1]
    if not vlong:
        return
    if len(long) != 1 or len(vlong) != 1:
        ctx.unsupported(node, f"the tensor attribute {attr.target!r} of shape {shape} is not a vector")
    if vlong[0] - len(vshape) != ctx.channel_dim(peer) - len(ctx.shape(peer)):
        return  # broadcast along another dimension than the channels
    if vshape[vlong[0]] != shape[long[0]]:
        ctx.unsupported(node, f"a slice of the tensor attribute {attr.target!r} ({vshape[vlong[0]]} of its "
                        f"{shape[long[0]]} entries) scales the channels")
    if vshape[vlong[0]] != ctx.width(desc):
        ctx.unsupported(node, f"the tensor attribute {attr.target!r} has {vshape[vlong[0]]} entries along "
                        f"{ctx.width(desc)} channels")
    ctx.param(attr, desc, long[0])


# --- maps without a channel dimension -------------------------------------------------------------
# ``x.mean(dim=1)`` and ``x.max(dim=1)[0]`` (CBAM's spatial gate) reduce the channels away: an ``(N, H, W)`` map.
# It is kept as a grouped view of one fixed channel split into no dimension (``GroupedView(desc, (), ())``), so
# that every rule that does not expect it refuses it; ``unsqueeze``/``view``/``stack`` give it its channel back.


def _no_channels(ctx: RuleContext, node: fx.Node, why: str) -> None:
    """Record ``node`` as a map without a channel dimension (it has one fixed channel when given one back)."""
    ctx.grouped[node] = GroupedView(ctx.new_space(node, 1, fixed_reason=why), (), ())


def _channelless(ctx: RuleContext, node: Any) -> bool:
    return isinstance(node, fx.Node) and node in ctx.grouped and node not in ctx.descs \
        and ctx.grouped[node].factors == ()


def _channel_back(ctx: RuleContext, node: fx.Node, src_node: fx.Node) -> Desc:
    """A map without channels given a dimension of size 1 (``unsqueeze(1)``, ``view(N, 1, H, W)``): one channel."""
    src, out = ctx.shape(src_node), ctx.shape(node)
    new = [i for i in range(1, len(out)) if out[i] == 1 and tuple(out[:i]) + tuple(out[i + 1:]) == tuple(src)]
    if not new:
        ctx.unsupported(node, f"a view {tuple(src)} -> {tuple(out)} of a map whose channels were reduced away")
    ctx.cdim[node] = new[0]
    return ctx.grouped[src_node].desc


def _unsqueeze(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``unsqueeze(d)``: a dimension of size 1 before or after the channels (``att.unsqueeze(2).unsqueeze(3)``
    makes an SE gate of an ``(N, C)`` vector); of a map without channels, the new dimension holds its one channel."""
    src_node = ctx.input_node(node)
    if _channelless(ctx, src_node):
        return _channel_back(ctx, node, src_node)
    dim = _arg(node, 1, "dim")
    if not isinstance(dim, int):
        ctx.unsupported(node, f"an unsqueeze at {dim!r}")
    ndim, c = len(ctx.shape(src_node)), ctx.channel_dim(src_node)
    ctx.cdim[node] = c + 1 if dim % (ndim + 1) <= c else c
    return ctx.desc(src_node)


def _squeeze(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``squeeze(d)``: dimensions of size 1 dropped; the channels move back, or, one channel squeezed, go."""
    src_node = ctx.input_node(node)
    if _channelless(ctx, src_node):
        ctx.unsupported(node, "a squeeze of a map whose channels were reduced away")
    shape, c = ctx.shape(src_node), ctx.channel_dim(src_node)
    arg = _arg(node, 1, "dim")
    dims = [arg] if isinstance(arg, int) else list(arg) if isinstance(arg, (list, tuple)) else \
        list(range(len(shape))) if arg is None else None
    if dims is None or not all(isinstance(d, int) for d in dims):
        ctx.unsupported(node, f"a squeeze of {arg!r}")
    gone = {d % len(shape) for d in dims if shape[d] == 1}
    if 0 in gone:
        ctx.unsupported(node, "a squeeze of the batch dimension")
    if c in gone:
        ctx.pin(ctx.desc(src_node), f"one channel squeezed away by {node.name}")
        ctx.grouped[node] = GroupedView(ctx.desc(src_node), (), ())
        return None
    ctx.cdim[node] = c - sum(1 for d in gone if d < c)
    return ctx.desc(src_node)


def _expand(ctx: RuleContext, node: fx.Node) -> Desc:
    """``expand_as(y)``/``expand(*sizes)``: size-1 dims broadcast. Channels kept (new leading dims move them); one
    channel broadcast over ``y``'s channels (BAM's ``gate.expand_as(x)``) is ``y``'s channels, and stays one."""
    src_node = ctx.input_node(node)
    src, out = ctx.shape(src_node), ctx.shape(node)
    c = ctx.channel_dim(src_node) + len(out) - len(src)
    ctx.cdim[node] = c
    if out[c] == src[c - len(out) + len(src)]:
        return ctx.desc(src_node)
    target = _expanded_like(ctx, node, c)
    if target is None:
        ctx.unsupported(node, f"an expand of {src[c - len(out) + len(src)]} channel(s) to {out[c]} of no tensor "
                        "compscale follows")
    ctx.pin(ctx.desc(src_node), f"one channel broadcast over {out[c]} at {node.name}")
    return ctx.desc(target)


def _expanded_like(ctx: RuleContext, node: fx.Node, c: int) -> fx.Node | None:
    """The tensor whose channels an expand takes: ``expand_as``'s argument, or the tensor whose ``size(c)``
    (``x.size(1)``, ``x.size()[1]``, ``x.shape[1]``) gives the channel size of ``expand``."""
    if node.target == "expand_as":
        other = _arg(node, 1, "other")
        return other if isinstance(other, fx.Node) and ctx.is_tensor(other) and ctx.channel_dim(other) == c else None
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = tuple(sizes[0])
    size = sizes[c] if c < len(sizes) else None
    if not isinstance(size, fx.Node):
        return None
    if size.op == "call_method" and size.target == "size" and len(size.args) == 2 and size.args[1] == c:
        tensor = size.args[0]
    elif size.target is operator.getitem and size.args[1] == c and isinstance(size.args[0], fx.Node) and (
            size.args[0].target in ("size", "shape") or (size.args[0].target is getattr
                                                           and size.args[0].args[1] == "shape")):
        tensor = size.args[0].args[0]
    else:
        return None
    return tensor if isinstance(tensor, fx.Node) and ctx.is_tensor(tensor) and ctx.channel_dim(tensor) == c else None


def _permute(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``permute`` moves the channel dimension (``(0, 2, 3, 1)``: channels last), or swaps a shuffle's axes."""
    src_node = ctx.input_node(node)
    ndim = len(ctx.shape(src_node))
    raw = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),)
    dims_arg = raw[0] if len(raw) == 1 and isinstance(raw[0], (list, tuple)) else raw
    if not all(isinstance(d, int) for d in dims_arg) or len(dims_arg) != ndim:
        ctx.unsupported(node, f"a permute by {dims_arg!r}")
    dims = [d % ndim for d in dims_arg if isinstance(d, int)]
    if src_node in ctx.grouped:
        view = ctx.grouped[src_node]
        k = len(view.factors)
        if dims[0] != 0 or sorted(dims[1:k + 1]) != list(range(1, k + 1)) or dims[k + 1:] != list(range(k + 1, ndim)):
            if _only_laid_out(node):  # a detection head's (N, A, K, H, W) -> (N, H, W, A, K) before its outputs
                return _pinned_out(ctx, node, view.desc)
            ctx.unsupported(node, "a permute that mixes the axes of a grouped channel view with others")
        ctx.grouped[node] = view._replace(order=tuple(view.order[d - 1] for d in dims[1:k + 1]))
        return None
    if dims[0] != 0:
        ctx.unsupported(node, "a permute that moves the batch dimension")
    ctx.cdim[node] = dims.index(ctx.channel_dim(src_node))
    return ctx.desc(src_node)


def _reshape(ctx: RuleContext, node: fx.Node) -> Desc | None:
    src_node = ctx.input_node(node)
    src, out = ctx.shape(src_node), ctx.shape(node)
    if _channelless(ctx, src_node):
        return _channel_back(ctx, node, src_node)
    if src_node in ctx.grouped:
        return _ungroup(ctx, node, src_node)
    factors = _channel_factors(src, out) if ctx.channel_dim(src_node) == 1 else None
    if factors is not None:  # (N, g, C/g, H, W): a shuffle begins, or k branches (SK, ResNeSt)
        ctx.grouped[node] = GroupedView(ctx.desc(src_node), factors, tuple(range(len(factors))))
        return None
    unit_dims = _unit_dims_moved(src, out, ctx.channel_dim(src_node))
    if ctx.channel_dim(src_node) != 1:
        if _only_laid_out(node):  # moved channels flattened on their way out (FCOS's (N, H, W, 1, K) -> (N, HW, K))
            return _pinned_out(ctx, node, ctx.desc(src_node))
        if unit_dims is None:
            ctx.unsupported(node, "a reshape of a tensor whose channels are not dimension 1")
        ctx.cdim[node] = unit_dims
        return ctx.desc(src_node)
    if len(out) >= 2 and len(src) >= 2 and out[0] == src[0] and out[1] == src[1]:
        return ctx.desc(src_node)
    if len(out) == 2 and out[0] == src[0]:
        return ctx.flatten(node, src_node)
    if unit_dims is not None:  # (N, C) -> (N, 1, C): ECA lines the channels up for a Conv1d
        ctx.cdim[node] = unit_dims
        return ctx.desc(src_node)
    if _only_laid_out(node):
        return _pinned_out(ctx, node, ctx.desc(src_node))
    ctx.unsupported(node, f"reshape {tuple(src)} -> {tuple(out)} mixes the channel dimension with others")


_LAYOUT = frozenset({"reshape", "view", "permute", "flatten", "contiguous", "transpose", "cat", "stack", "getitem",
                     "unsqueeze", "squeeze"})


def _only_laid_out(node: fx.Node) -> bool:
    """Whether ``node``'s value only reaches the graph's outputs, rearranged (reshaped, permuted, concatenated) on the
    way: a detection head's per-anchor class scores, whose channels the outputs keep as they are."""
    seen, todo = set(), list(node.users)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "output":
            continue
        if n.op not in ("call_method", "call_function") or getattr(n.target, "__name__", n.target) not in _LAYOUT:
            return False
        todo.extend(n.users)
    return True


def _pinned_out(ctx: RuleContext, node: fx.Node, src: Desc, why: str | None = None) -> Desc:
    """Channels rearranged among other axes on their way to the outputs (or, with ``why``, into a layer compscale
    must not widen through): they keep their width, and so does what ``node`` makes of them."""
    ctx.pin(src, why or f"rearranged into output {node.name}")
    return ctx.new_space(node, ctx.channels(node), fixed_reason=f"output of {node.name}")


def _unit_dims_moved(src: tuple[int, ...], out: tuple[int, ...], cdim: int) -> int | None:
    """Where the channels land when a reshape only adds or drops dimensions of size 1 (batch kept first)."""
    if not src or not out or src[0] != out[0] or src[cdim] == 1:
        return None
    src_long = [i for i in range(1, len(src)) if src[i] != 1]
    out_long = [i for i in range(1, len(out)) if out[i] != 1]
    if [src[i] for i in src_long] != [out[i] for i in out_long]:
        return None
    return out_long[src_long.index(cdim)]


def _channel_factors(src: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...] | None:
    """The dims ``out`` splits ``src``'s channels (dim 1) into, when a reshape only does that (unit spatial dims
    may come and go): ``(N, 128, 1, 1) -> (N, 1, 2, 64)`` gives ``(1, 2, 64)``; ``None`` for any other reshape."""
    if len(src) < 2 or len(out) < 3 or out[0] != src[0]:
        return None
    product = 1
    for i in range(1, len(out)):
        product *= out[i]
        if product == src[1]:
            factors = tuple(out[1:i + 1])
            if sum(f > 1 for f in factors) < 2 or [d for d in out[i + 1:] if d != 1] != [d for d in src[2:] if d != 1]:
                return None
            return factors
        if product > src[1]:
            return None
    return None


def _ungroup(ctx: RuleContext, node: fx.Node, src_node: fx.Node) -> Desc:
    """Back from (N, g, C/g, H, W) to (N, C, H, W): a channel shuffle if the view was transposed."""
    view = ctx.grouped[src_node]
    desc, transposed = view.desc, view.shuffled()
    if tuple(ctx.shape(node))[1] != ctx.width(desc) or _channel_factors(ctx.shape(node), ctx.shape(src_node)) is None:
        ctx.unsupported(node, "a grouped channel view that does not come back to its channels")
    long = [f for f in view.factors if f != 1]
    if transposed and len(long) != 2:
        ctx.unsupported(node, f"a permutation of channels viewed as {view.factors}")
    g = long[0] if long else 1
    if not transposed or len(desc) == 1:
        ctx.divisor(desc, g, f"{node.name} (channel shuffle in {g} groups)")
        return desc  # channels permuted within one group: its width stays one width
    if len(desc) != g:
        ctx.unsupported(node, f"a shuffle of {len(desc)} concatenated parts in {g} groups")
    for part in desc[1:]:  # a shuffle interleaves the parts: they must keep one width
        ctx.union(desc[:1], (part,), node)
    out = ctx.new_space(node, ctx.width(desc))
    ctx.tie(out, desc[:1], g, interleaved=True)
    return out


def _transpose(ctx: RuleContext, node: fx.Node) -> Desc | None:
    src_node = ctx.input_node(node)
    dims = [d for d in node.args[1:3] if isinstance(d, int)]
    if src_node in ctx.grouped and len(dims) == 2:
        view = ctx.grouped[src_node]
        ndim = len(ctx.shape(src_node))
        a, b = sorted(d % ndim for d in dims)
        if 1 <= a < b <= len(view.factors):
            order = list(view.order)
            order[a - 1], order[b - 1] = order[b - 1], order[a - 1]
            ctx.grouped[node] = view._replace(order=tuple(order))
            return None
    if len(dims) != 2 or _channelless(ctx, src_node):
        ctx.unsupported(node, "a transpose compscale did not follow")
    ndim, c = len(ctx.shape(src_node)), ctx.channel_dim(src_node)
    a, b = (d % ndim for d in dims)
    if 0 in (a, b) and a != b:
        ctx.unsupported(node, "a transpose that moves the batch dimension")
    # the channels move with their dim (a shuffle in one group, (N, 1, C, H, W).transpose(1, 2), is no shuffle)
    ctx.cdim[node] = b if c == a else a if c == b else c
    return ctx.desc(src_node)


def _contiguous(ctx: RuleContext, node: fx.Node) -> Desc | None:
    src_node = ctx.input_node(node)
    if src_node in ctx.grouped:
        ctx.grouped[node] = ctx.grouped[src_node]
        return None
    return ctx.desc(src_node)


def _split(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``chunk``/``split`` along channels.

    Into equal parts (``chunk``, ``split`` by one size): each part is a space of 1/k of the source's width.
    Undoing a concat: each part is one of its segments. By a list of unequal sizes (MixConv's
    ``split(x, self.splits)``): each part is a piece of the source, cut as the sizes cut it (see
    :class:`compscale.analyse.channels.Part`). Sizes the model keeps as numbers follow the width: the attribute
    holding them (Res2Net's ``self.width``) is updated by the width pass; without one the source keeps its width.
    """
    src_node = ctx.input_node(node)
    shape = ctx.shape(src_node)
    dim = _arg(node, 2, "dim", 0)
    parts = node.meta["tensor_meta"]
    c = ctx.channel_dim(src_node)
    sizes = [p.shape[c] for p in parts] if isinstance(parts, (list, tuple)) else []
    if not isinstance(dim, int) or dim % len(shape) != c:
        ctx.multi[node] = [ctx.desc(src_node)] * len(sizes)  # a split over batch or space keeps channels
        return None
    src = ctx.refine(ctx.desc(src_node))
    size_arg = _arg(node, 1, "split_size_or_sections", node.kwargs.get("split_size"))
    literal = node.target in ("split", torch.split) and not isinstance(size_arg, fx.Node) and not (
        isinstance(size_arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in size_arg))
    if len(src) == len(sizes) and all(ctx.width((seg,)) == n for seg, n in zip(src, sizes)):
        pieces: list[Desc] = [(seg,) for seg in src]  # undoing a concat: each part is one of its segments
        if literal and not _follow_split(ctx, node, size_arg, pieces, src):
            ctx.pin(src, f"split into {sizes} channels at {node.name}")
        ctx.multi[node] = pieces
        return None
    if len(src) != 1:
        ctx.unsupported(node, f"a split of {ctx.width(src)} channels in {len(src)} concatenated parts into {sizes}")
    if literal and isinstance(size_arg, (list, tuple)):  # MixConv: the pieces follow the whole
        pieces = [ctx.new_space(node, n) for n in sizes]
        for i, piece in enumerate(pieces):
            ctx.part(piece, src, i, sizes)
        if not _follow_split(ctx, node, size_arg, pieces, src):
            ctx.pin(src, f"split into {sizes} channels at {node.name}")
        ctx.pieces[module_path(node)] = (src, pieces)
        ctx.multi[node] = pieces
        return None
    if len(set(sizes)) != 1:
        ctx.unsupported(node, f"a split of {ctx.width(src)} channels into {sizes}")
    k = len(sizes)
    ctx.divisor(src, k, f"{node.name} (split in {k})")
    first = ctx.new_space(node, sizes[0])
    ctx.tie(first, src, Fraction(1, k))
    if literal and not _follow_split(ctx, node, size_arg, [first] * k, src):
        ctx.pin(src, f"split into pieces of {size_arg} channels at {node.name}")
    ctx.multi[node] = [first] * k  # equal parts: one width
    return None


def _follow_split(ctx: RuleContext, node: fx.Node, size_arg: Any, pieces: Sequence[Desc], src: Desc) -> bool:
    """Find the attribute holding a split's sizes: the sizes themselves, or (one size) the source's width."""
    if isinstance(size_arg, (list, tuple)):
        return ctx.follow_literal(node, [(list(size_arg), tuple(pieces))], "a split")
    return ctx.follow_literal(node, [(size_arg, (pieces[0],)), (ctx.width(src), (src,))], "a split")


def _getitem(ctx: RuleContext, node: fx.Node) -> Desc | None:
    src_node, index = node.args[0], node.args[1]
    if isinstance(src_node, fx.Node) and src_node in ctx.multi and isinstance(index, int):
        return ctx.multi[src_node][index]
    if isinstance(src_node, fx.Node) and index in (0, 1) and _reduced_pair(src_node):
        return _max_along(ctx, node, src_node)  # x.max(dim=1)[0]: the values (or the indices) of a max over a dim
    if isinstance(src_node, fx.Node) and isinstance(index, tuple) and _only_new_dims(index):
        ctx.cdim[node] = _moved_channel_dim(index, len(ctx.shape(src_node)), ctx.channel_dim(src_node))
        return ctx.input_desc(node)  # x[:, :, None, None]: a view that only adds size-1 dims
    if isinstance(src_node, fx.Node) and isinstance(index, tuple):
        bounds = _channel_slice(ctx, src_node, index)
        if bounds is not None:
            return _slice(ctx, node, src_node, *bounds)
    ctx.unsupported(node, "indexing a tensor (slicing channels)")


def _channel_slice(ctx: RuleContext, src_node: fx.Node, index: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """``(start, stop)`` when ``index`` takes a range of channels and everything of the other dims."""
    c = ctx.channel_dim(src_node)
    if len(index) <= c or not all(i == _FULL for j, i in enumerate(index) if j != c):
        return None
    sl = index[c]
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        return None
    return sl.start, sl.stop


def _slice(ctx: RuleContext, node: fx.Node, src_node: fx.Node, start: Any, stop: Any) -> Desc:
    """``x[:, a:b]``: the segments of ``x`` it takes; a bound inside a space cuts that space in two (the space
    becomes the sum of its pieces, see ``RuleContext.cut``). Bounds the model keeps as numbers follow the width."""
    if isinstance(start, fx.Node) or isinstance(stop, fx.Node):
        ctx.unsupported(node, "a slice of channels at a bound computed in forward",
                        "compscale follows channel slices at numbers the module keeps as attributes "
                        "(`x[:, :self.out_chs]`); register a rule for the module.")
    src = ctx.desc(src_node)
    total = ctx.width(src)
    a, b = (slice(start, stop).indices(total))[:2]
    b = max(a, b)  # an empty slice (ReXNet's x[:, c:] of a block with c == out) has no channels
    for bound in (a, b):
        src = ctx.cut(src, bound, node)
    ends = [0, *itertools.accumulate(ctx.uf.size[s] * f for s, f in src[:-1])]
    taken = tuple(seg for seg, begin in zip(src, ends) if a <= begin < b)
    for value, bound in ((start, a), (stop, b)):
        if isinstance(value, int) and 0 < bound:
            before = tuple(seg for seg, begin in zip(src, ends) if begin < bound)
            if not ctx.follow_literal(node, [(value, (before,))], "a slice of channels"):
                ctx.pin(before, f"sliced at channel {value} by {node.name}")
    return taken


_FULL = slice(None)


def _only_new_dims(index: tuple[Any, ...]) -> bool:
    return all(i is None or i is Ellipsis or i == _FULL for i in index) and sum(i is Ellipsis for i in index) <= 1


def _moved_channel_dim(index: tuple[Any, ...], ndim: int, c: int) -> int:
    """Where dim ``c`` of an ``ndim``-d tensor lands after ``x[index]`` (full slices, ``None``, ``...``)."""
    items: list[Any] = []
    for i in index:
        if i is Ellipsis:
            items += [slice(None)] * (ndim - sum(j is not None and j is not Ellipsis for j in index))
        else:
            items.append(i)
    out = src = 0
    for i in items:
        if i is None:
            out += 1
            continue
        if src == c:
            return out
        src, out = src + 1, out + 1
    return out + (c - src)


def _reduce(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``x.mean(dim, keepdim)``, ``sum``, ``amax``: channels kept unless the channel dim is reduced."""
    return _reduction(ctx, node, _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False))


_MAX_MIN: tuple[Any, ...] = (torch.max, torch.min, "max", "min")


def _reduced_pair(node: fx.Node) -> bool:
    """A ``max``/``min`` over a dimension (``x.max(dim=1)``, ``torch.max(x, 1)``): a (values, indices) pair."""
    return (node.op in ("call_function", "call_method") and node.target in _MAX_MIN
            and isinstance(_arg(node, 1, "dim"), int))


def _max_along(ctx: RuleContext, node: fx.Node, pair: fx.Node) -> Desc | None:
    """The values or indices of ``x.max(dim, keepdim)``: a reduction of ``x`` over ``dim``."""
    return _reduction(ctx, node, _arg(pair, 1, "dim"), _arg(pair, 2, "keepdim", False), src=ctx.input_node(pair))


def _max_min(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``torch.max(a, b)``: elementwise, as ``a + b`` (over a dim, ``max`` returns a pair that ``getitem``
    follows)."""
    other = _arg(node, 1, "other")
    if isinstance(other, fx.Node) and ctx.is_tensor(other):
        return _binary(ctx, node)
    ctx.unsupported(node, f"a {node.target if isinstance(node.target, str) else node.target.__name__} of "
                    f"{other!r} compscale did not follow")


def _tensor_attribute(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``x.max(dim=1).values`` / ``.indices`` (as ``[0]`` / ``[1]``); any other tensor-valued attribute is probed
    as an op without a rule is."""
    src_node, name = node.args[0], node.args[1]
    if isinstance(src_node, fx.Node) and name in ("values", "indices") and _reduced_pair(src_node):
        return _max_along(ctx, node, src_node)
    desc = probed_rule(ctx, node)
    if desc is None:
        ctx.unsupported(node, f"no channel rule for the tensor attribute {name!r}")
    return desc


def _vector_norm(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``torch.linalg.vector_norm(x, ord, dim, keepdim)`` (ConvNeXt-V2's GRN: a norm over the spatial dims)."""
    return _reduction(ctx, node, _arg(node, 2, "dim"), _arg(node, 3, "keepdim", False))


def _pad(ctx: RuleContext, node: fx.Node) -> Desc:
    """``F.pad(x, pad)``: channels kept when the padded trailing dims do not include the channel dim."""
    pad = _arg(node, 1, "pad", ())
    src = ctx.input_node(node)
    ndim, c = len(ctx.shape(src)), ctx.channel_dim(src)
    if not isinstance(pad, (list, tuple)) or c >= ndim - len(pad) // 2:
        ctx.unsupported(node, "a padding of the channel dimension")
    return ctx.input_desc(node)


def _reduction(ctx: RuleContext, node: fx.Node, arg: Any, keepdim: Any, src: fx.Node | None = None) -> Desc | None:
    """A reduction of ``src`` (by default ``node``'s input) over the dims ``arg``.

    Over other dims than the channels it keeps them (they move back if dims before them go). Over the channels
    alone it is a statistic of them (a hand-written norm, CBAM's and BAM's spatial gates): with ``keepdim`` a map
    of one fixed channel (broadcast back over the channels), else a map without channels (``unsqueeze`` gives
    it its one channel back).
    """
    dims: tuple[int, ...] = (arg,) if isinstance(arg, int) else tuple(a for a in arg if isinstance(a, int)) \
        if isinstance(arg, (list, tuple)) else ()
    src = ctx.input_node(node) if src is None else src
    ndim, c = len(ctx.shape(src)), ctx.channel_dim(src)
    reduced = {d % ndim for d in dims}
    if reduced == {c} and keepdim:  # a statistic over channels (a hand-written norm): one channel, broadcast back
        return ctx.new_space(node, 1, fixed_reason=f"a reduction over channels ({node.name})")
    if reduced == {c} and len(ctx.shape(node)) == ndim - 1:
        _no_channels(ctx, node, f"a reduction over channels ({node.name})")
        return None
    if not dims or reduced & {0, c}:
        ctx.unsupported(node, "a reduction over the channel (or batch) dimension")
    out_c = c if keepdim else c - sum(1 for d in reduced if d < c)
    ctx.cdim[node] = out_c
    return ctx.desc(src)


def _cat(ctx: RuleContext, node: fx.Node) -> Desc:
    """A concat along channels makes a segmented descriptor; along another dim, one set of channels.

    In a module that split its input by a list of sizes (MixConv), a concat of as many single-space pieces is
    that module's output: one space, the unit that is rounded, whose pieces follow it as the input's did.
    """
    tensors = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    assert isinstance(tensors, (list, tuple))
    descs = [ctx.desc(t) for t in tensors]
    ndim = len(ctx.shape(node))
    if isinstance(dim, int) and isinstance(tensors[0], fx.Node) and dim % ndim == ctx.channel_dim(tensors[0]):
        split = ctx.pieces.get(module_path(node))
        if split is not None and len(split[1]) == len(descs) > 1 and all(len(d) == 1 and d[0][1] == 1 for d in descs):
            if [ctx.uf.find(d[0][0]) for d in descs] == [ctx.uf.find(p[0][0]) for p in split[1]]:
                return split[0]  # the pieces put back together (a depthwise MixConv)
            return _whole(ctx, node, descs)
        return tuple(seg for d in descs for seg in d)
    return functools.reduce(lambda desc, other: ctx.union(desc, other, node), descs)


def _whole(ctx: RuleContext, node: fx.Node, descs: list[Desc]) -> Desc:
    """The output of a MixConv: a new space whose pieces are the concatenated outputs."""
    sizes = [ctx.width(d) for d in descs]
    whole = ctx.new_space(node, sum(sizes))
    for i, d in enumerate(descs):
        ctx.part(d, whole, i, sizes)
    return whole


def _stack(ctx: RuleContext, node: fx.Node) -> Desc:
    """``torch.stack(branches, dim)``: the branches are one set of channels; a new dim before them moves them."""
    tensors = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    assert isinstance(tensors, (list, tuple))
    first = tensors[0]
    if not isinstance(dim, int) or not isinstance(first, fx.Node) or not all(isinstance(t, fx.Node) for t in tensors) \
            or not all(ctx.is_tensor(t) for t in tensors):
        ctx.unsupported(node, "a stack of tensors compscale did not follow")
    ndim = len(ctx.shape(node))
    if all(_channelless(ctx, t) for t in tensors) and dim % ndim != 0:  # stack([mean, max], 1): k fixed channels
        ctx.cdim[node] = dim % ndim
        return tuple(seg for t in tensors if isinstance(t, fx.Node) for seg in ctx.grouped[t].desc)
    c = ctx.channel_dim(first)
    if dim % ndim == 0 or any(ctx.channel_dim(t) != c for t in tensors if isinstance(t, fx.Node)):
        ctx.unsupported(node, "a stack along the batch dimension, or of tensors with channels in different dims")
    desc = functools.reduce(lambda d, t: ctx.union(d, ctx.desc(t), node), tensors[1:], ctx.desc(first))
    ctx.cdim[node] = c + 1 if dim % ndim <= c else c
    return desc


def _softmax(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """``softmax`` (and ``F.normalize``: SSD300's L2 norm over the channels) keeps the channels (over any dim: it
    rescales, never moves them); a grouped view stays one."""
    src_node = ctx.input_node(node)
    if src_node in ctx.grouped and src_node not in ctx.descs:
        ctx.grouped[node] = ctx.grouped[src_node]
        return None
    return ctx.desc(src_node)


def _layer_norm_function(ctx: RuleContext, node: fx.Node) -> Desc:
    """``F.layer_norm`` over the channels; a weight of an ``nn.LayerNorm`` (a LayerNorm2d) makes it that norm."""
    normalized = _arg(node, 1, "normalized_shape")
    shape = tuple(normalized) if isinstance(normalized, (list, tuple)) else (normalized,)
    _check_layer_norm(ctx, node, tuple(d if isinstance(d, int) else -1 for d in shape))
    src = ctx.input_desc(node)
    caller = module_path(node)
    if isinstance(ctx.traced.root.get_submodule(caller) if caller else ctx.traced.root, nn.LayerNorm):
        ctx.member(src, caller, "norm")  # a LayerNorm subclass (LayerNorm2d) permuting around F.layer_norm
        return src
    for i, name in ((2, "weight"), (3, "bias")):
        arg = _arg(node, i, name)
        if not isinstance(arg, fx.Node):
            continue
        if arg not in ctx.attrs or ctx.attrs[arg] is not arg:
            ctx.unsupported(node, f"a layer_norm whose {name} is computed in forward")
        ctx.param(arg, src, 0)
    if not isinstance(normalized, fx.Node) and not (
            isinstance(normalized, (list, tuple)) and any(isinstance(d, fx.Node) for d in normalized)):
        ctx.shape_owners[caller] = src  # a hand-written LayerNorm: its normalized-shape attribute follows the width
    return src


# pooling and padding of every rank (1-d audio, 2-d images, 3-d video) keep the channels
_WINDOW_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_PADS = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
         nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
         nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)
_WINDOW_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d)
_ADAPTIVE_FUNCTIONS = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                       F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
_REDUCTIONS = ("mean", torch.mean, "sum", torch.sum, "amax", torch.amax, "amin", torch.amin)
_ELEMENTWISE_FUNCTIONS: tuple[Any, ...] = (
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu,
    F.dropout, F.interpolate, *_WINDOW_FUNCTIONS, *_ADAPTIVE_FUNCTIONS,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.neg, torch.abs, torch.sqrt, torch.rsqrt, torch.exp,
    operator.neg, "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clone", "neg", "sqrt", "rsqrt", "exp",
)
_MULTI_OUTPUT: tuple[Any, ...] = ("chunk", "split", torch.chunk, torch.split)


_ATTR_READERS: tuple[Any, ...] = (*BINARY, F.layer_norm)  # rules that account for tensor attributes
_ATTR_VIEWS: tuple[Any, ...] = (operator.getitem, "reshape", "view", "unsqueeze", torch.reshape, torch.unsqueeze)


def _register_builtin() -> None:
    elementwise_modules = (*ELEMENTWISE, nn.Upsample, *_WINDOW_POOLS, *_ADAPTIVE_POOLS, nn.LPPool1d, nn.LPPool2d,
                           *_PADS, *drop_path_types())
    table: tuple[tuple[Sequence[Any], Callable[..., Desc | None]], ...] = (
        (elementwise_modules, elementwise),
        ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), conv),
        ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.SyncBatchNorm), norm),
        ((nn.LayerNorm,), layer_norm),
        ((nn.Linear,), linear),
        ((nn.Flatten, torch.flatten, "flatten"), flatten_module),
        (_ELEMENTWISE_FUNCTIONS, elementwise),
        (BINARY, _binary),
        (("view", "reshape", torch.reshape), _reshape),
        (("transpose", torch.transpose, "swapaxes", torch.swapaxes), _transpose),
        (("unsqueeze", torch.unsqueeze), _unsqueeze),
        (("squeeze", torch.squeeze), _squeeze),
        (("expand", "expand_as"), _expand),
        (_MAX_MIN, _max_min),
        ((getattr,), _tensor_attribute),
        (("contiguous",), _contiguous),
        (_MULTI_OUTPUT, _split),
        ((operator.getitem,), _getitem),
        (_REDUCTIONS, _reduce),
        ((torch.stack,), _stack),
        ((torch.softmax, F.softmax, "softmax", torch.log_softmax, F.log_softmax, "log_softmax", F.normalize), _softmax),
        (targets(OpKind.CAT), _cat),
        (("permute", torch.permute), _permute),
        ((F.layer_norm,), _layer_norm_function),
        ((F.pad, torch._C._nn.pad), _pad),
        ((torch.linalg.vector_norm,), _vector_norm),  # the same object as torch._C._linalg.linalg_vector_norm
    )
    for keys, rule in table:
        for key in keys:
            BUILTIN.register(key, rule)


_register_builtin()
