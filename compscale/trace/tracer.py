"""Trace a model with torch.fx and propagate shapes on fake tensors.

The tracer follows torchvision's ``NodePathTracer`` idea: every node knows the module it runs in
(fx records ``node.meta["nn_module_stack"]``; :func:`module_path` reads it). Shapes come from
``torch.fx.passes.shape_prop.ShapeProp`` on a meta-device copy of the module (its parameters copied as
shapes only), so no real forward runs and no activation memory is allocated.

The entry point, :func:`compscale.trace.trace` (:mod:`compscale.trace.entry`), traces symbolically with
:class:`CompscaleTracer` and falls back to :mod:`compscale.trace.concrete`; both build on this module.

Example:
    >>> from torchvision.models import resnet18
    >>> from compscale.trace import trace
    >>> traced = trace(resnet18())
    >>> traced.shape(traced.output_node)
    torch.Size([1, 1000])
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import math
import operator
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.utils._pytree import tree_flatten, tree_map

from compscale.errors import NotACNNError, TraceError, UnsupportedOpError
from compscale.layers import SHAPE_PRESERVING, channels, copy_module, resize
from compscale.registry import drop_path_types

__all__ = ["CompscaleTracer", "Retracer", "Traced", "check_module", "eval_mode", "module_path", "splits_channels"]

TRACE_HINT = (
    "make the offending submodule a leaf with `leaf_modules=[ThatModule]` (compscale will not look inside it), "
    "or wrap the data-dependent function with `autowrap_functions=[fn]`; see torch.fx's 'Limitations of Symbolic "
    "Tracing'."
)


# Subclasses of these stay leaves: another library's conv with its own padding (timm's Conv2dSame) or a
# BatchNorm followed by its activation (timm's BatchNormAct2d) maps channels as the layer it extends, and
# the passes resize it keeping its class. LayerNorm subclasses are traced through: some permute around it.
_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.Linear,
)


# torch.fx patches nn.Module.__call__ and __getattr__ process-wide while it traces. Two traces at once in two
# threads would each save the other's patch as "the original" and could leave it installed for good, so compscale
# traces one model at a time (reentrant: a trace may start another, as the depth pass does); and a module called
# in another thread meanwhile (an eager forward, another scale()'s shape propagation) runs as if unpatched.
_TRACE_LOCK = threading.RLock()


class CompscaleTracer(fx.Tracer):
    """An fx tracer whose leaves are torch's own modules and their conv/norm/linear subclasses, drop-path
    modules and the user's ``leaf_modules``. One trace runs at a time in a process (see ``_TRACE_LOCK``)."""

    def __init__(
        self,
        leaf_modules: Iterable[type[nn.Module]] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
        leaf_paths: Iterable[str] = (),
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = tuple(leaf_modules) + drop_path_types()
        self.leaf_paths = frozenset(leaf_paths)
        self._thread = threading.get_ident()

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _TRACE_LOCK:
            self._thread = threading.get_ident()
            return super().trace(root, concrete_args)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:  # another thread's module call, through fx's global patch
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or module_qualified_name in self.leaf_paths:
            return True
        if isinstance(m, _LAYER_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


Retracer = Callable[["Traced", nn.Module, Sequence[int], bool], "Traced"]
"""Trace another model with a trace's options: ``(traced, model, input_shape, shapes)`` (see :class:`Traced`)."""


@dataclasses.dataclass
class Traced:
    """A traced model: the model, its ``GraphModule`` (sharing the model's leaf modules) and the input shape.

    ``gm`` holds only the leaves the graph calls, under plain ``nn.Module`` parents; look containers
    (blocks, stages) up in ``root``.
    """

    root: nn.Module
    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    leaf_modules: tuple[type[nn.Module], ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    extra_inputs: tuple[torch.Tensor, ...] = ()  # the forward's other inputs (meta tensors), which never scale
    # what retrace and retrace_graph call: compscale.trace.entry's, which records itself on every trace it makes
    # (it sits above this module: its concrete fallback builds on this tracer)
    retracer: Retracer | None = dataclasses.field(default=None, repr=False, compare=False)
    _leaves: dict[str, nn.Module] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def retrace(self, model: nn.Module, input_shape: Sequence[int]) -> Traced:
        """Trace another model (a rewritten one, a block) with the same tracer options, shapes included."""
        return self._retracer()(self, model, input_shape, True)

    def rebind(self, model: nn.Module, input_shape: Sequence[int], shapes: bool = True) -> Traced:
        """This graph over ``model``'s current layers (the same module paths: ``model`` rewritten in place, without
        a new trace), its shapes propagated at ``input_shape`` unless ``shapes`` is false. Only for a graph that
        still describes ``model`` (its forward calls the same leaves in the same order), traced symbolically (a
        concrete trace bakes the input's size in)."""
        gm = graph_module(model, copy.deepcopy(self.graph), type(model).__name__)
        gm.meta.update(self.gm.meta)
        new = Traced(model, gm, tuple(input_shape), self.leaf_modules, self.autowrap_functions, self.extra_inputs,
                     self.retracer)
        if shapes:
            propagate_shapes(new)
        return new

    def retrace_graph(self, model: nn.Module, input_shape: Sequence[int]) -> Traced:
        """As :meth:`retrace`, without propagating shapes (the caller does, with its own options). A model traced
        with concrete values (its symbolic graph computes ``None + None`` where Python skipped a branch: an octave
        network's missing low-frequency map) is traced so again."""
        return self._retracer()(self, model, input_shape, False)

    def _retracer(self) -> Retracer:
        if self.retracer is None:
            raise TraceError(f"this trace of {type(self.root).__name__} cannot trace another model",
                             "trace the model with compscale.trace.trace, whose result can.")
        return self.retracer

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def output_node(self) -> fx.Node:
        """The node of the one tensor the model returns (see :attr:`output_nodes` for tuples and dicts)."""
        outputs = self.output_nodes
        if len(outputs) != 1:
            raise TraceError(
                f"{type(self.gm).__name__}: the model returns {len(outputs)} tensors where one was expected",
                "compscale synthesizes blocks that return one tensor; leave this block out with `stages=`.",
            )
        return outputs[0]

    @property
    def output_nodes(self) -> list[fx.Node]:
        """The nodes of every tensor the model returns, in the order of its (pytree) output: a tuple, a dict, a
        dataclass such as Hugging Face's ``ModelOutput``."""
        out = next(n for n in reversed(self.graph.nodes) if n.op == "output")
        leaves, _ = tree_flatten(out.args[0])
        nodes = [a for a in leaves if isinstance(a, fx.Node)]
        if not nodes:
            raise TraceError(f"{type(self.gm).__name__}: the model returns no tensor",
                             "compscale scales models whose forward returns tensors.")
        return nodes

    def module(self, node: fx.Node) -> nn.Module:
        """The submodule a ``call_module`` node calls (the graph module's leaves are set when it is made)."""
        assert node.op == "call_module", node.format_node()
        if self._leaves is None:
            self._leaves = dict(self.gm.named_modules())
        found = self._leaves.get(str(node.target))
        return found if found is not None else self.gm.get_submodule(str(node.target))

    def shape(self, node: fx.Node) -> torch.Size:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise TraceError(f"node {node.format_node()} has no tensor shape", "it does not produce one tensor.")
        return meta.shape

    def has_shape(self, node: fx.Node) -> bool:
        return hasattr(node.meta.get("tensor_meta"), "shape")

    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.graph.nodes)


def check_module(model: object, caller: str) -> None:
    """``TypeError`` unless ``model`` is an ``nn.Module`` (a model name is a common slip)."""
    if not isinstance(model, nn.Module):
        hint = (f"; build it first, e.g. torchvision.models.get_model({model!r}) or compscale.models.load_model"
                if isinstance(model, str) else "")
        raise TypeError(f"compscale.{caller}() takes an nn.Module, got {type(model).__name__} {model!r:.60}{hint}")


def module_path(node: fx.Node) -> str:
    """The qualified name of the innermost module ``node`` runs in ("" at the top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return str(next(reversed(stack.values()))[0])


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


# products of two activations (attention's q @ k^T and weights @ v), in all their spellings
_PRODUCTS: tuple[Any, ...] = (torch.matmul, operator.matmul, torch.bmm, torch.einsum, torch.baddbmm, "matmul", "bmm",
                              nn.functional.scaled_dot_product_attention)
_CONVS: tuple[Any, ...] = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)
_TOKEN_LINEARS = 4  # a transformer block has at least q/k/v, its projection and its MLP's two linears


def refuse_non_cnn(traced: Traced) -> None:
    """Refuse a network that is not made of convolutional stages, from its graph: one whose body has no
    convolution after its patch embedding (ViT, Swin: linear layers over tokens), or whose attention (products of
    two activations, ``nn.MultiheadAttention``) is at least half as frequent as its convolutions (MaxViT).

    Raises:
        NotACNNError: with what was found and a hint.
    """
    convs = [n for n in traced.graph.nodes if (n.op == "call_module" and isinstance(
        traced.module(n), nn.modules.conv._ConvNd)) or (n.op == "call_function" and n.target in _CONVS)]
    attention = sum(_attention_weight(traced, n) for n in traced.graph.nodes)
    tokens = sum(1 for n in traced.graph.nodes if _linear_over_tokens(traced, n))
    name = type(traced.root).__name__
    hint = ("compscale scales convolutional networks of stages; scale a transformer with its own constructor "
            "(its number of layers, embedding width and patch count).")
    if len(convs) <= 1 and tokens >= _TOKEN_LINEARS:
        first = f" after its patch embedding {convs[0].target}" if convs else ""
        raise NotACNNError(f"{name} is not a CNN of stages: no convolution{first}, {tokens} linear layers over "
                           "tokens", hint)
    if attention >= 2 and 2 * attention >= len(convs):
        raise NotACNNError(f"{name} is not a CNN of stages: attention over tokens ({attention} products of "
                           f"activations) against {len(convs)} convolutions", hint)


def _attention_weight(traced: Traced, node: fx.Node) -> int:
    """2 for a ``MultiheadAttention`` call (q @ k^T and weights @ v), 1 for a product of two activations, else 0."""
    if node.op == "call_module":
        return 2 if isinstance(traced.module(node), nn.MultiheadAttention) else 0
    if node.op not in ("call_function", "call_method") or not _is_product(node.target):
        return 0
    operands = [a for a in node.all_input_nodes if a.op != "get_attr" and traced.has_shape(a)]
    return 1 if len(operands) >= 2 else 0


def _is_product(target: Any) -> bool:
    try:
        return target in _PRODUCTS
    except TypeError:  # an unhashable target
        return False


def _linear_over_tokens(traced: Traced, node: fx.Node) -> bool:
    """A ``Linear`` applied to a tensor of three or more dimensions (tokens ``(N, L, C)``, or a channels-last map)."""
    linear = (node.op == "call_module" and isinstance(traced.module(node), nn.Linear)) or (
        node.op == "call_function" and node.target is nn.functional.linear)
    src = node.args[0] if node.args else None
    return linear and isinstance(src, fx.Node) and traced.has_shape(src) and len(traced.shape(src)) >= 3


def check_layer_outputs(traced: Traced) -> None:
    """Refuse a layer compscale would resize (a conv, norm or linear, or a subclass) that returns several values,
    unless it is a convolution whose maps in and out split its channels (an octave convolution: its high- and
    low-frequency maps, whose channels sum to its ``in_channels`` and ``out_channels``), which the channel analysis
    follows as several channel groups.

    Raises:
        UnsupportedOpError: naming the first such layer.
    """
    for node in traced.graph.nodes:
        if node.op != "call_module" or traced.has_shape(node) or not isinstance(node.meta.get("tensor_meta"),
                                                                                 (list, tuple)):
            continue
        module = traced.module(node)
        if isinstance(module, _LAYER_TYPES) and not splits_channels(node, module):
            base = next(c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
            raise UnsupportedOpError(
                f"cannot resize {node.target} ({type(module).__name__}, a {base}): it returns "
                f"{len(node.meta['tensor_meta'])} values (node %{node.name}), not one tensor, and they do not "
                "split its channels",
                "compscale resizes layers that return one tensor, or a convolution whose input and output maps "
                "(tensors or None) together hold its in_channels and out_channels (an octave convolution); scale "
                "this network with its constructor's width argument.")


def splits_channels(node: fx.Node, module: nn.Module) -> bool:
    """Whether conv ``module``, called at ``node``, reads and returns maps (or ``None``) whose channels add up to its
    ``in_channels`` and ``out_channels``, each map in one dimension 1 (an octave convolution's ``(high, low)``)."""
    metas = node.meta.get("tensor_meta")
    if (not isinstance(module, nn.modules.conv._ConvNd) or module.groups != 1 or hasattr(metas, "shape")
            or not isinstance(metas, (list, tuple))):
        return False
    outs = [m for m in metas if m is not None]
    ins = [a.meta["tensor_meta"] for a in node.all_input_nodes if hasattr(a.meta.get("tensor_meta"), "shape")]
    if not outs or not all(hasattr(m, "shape") and len(m.shape) >= 2 for m in outs + ins) or len(ins) != len(
            node.all_input_nodes):
        return False
    return (sum(m.shape[1] for m in ins) == module.in_channels
            and sum(m.shape[1] for m in outs) == module.out_channels)


def graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` that generates its Python code when first called or printed.

    compscale reads a trace's graph and calls none of its code, whose generation (and ``compile``) takes a fifth
    of a trace; torch's ``_LazyGraphModule`` defers it (a plain ``GraphModule`` where torch has none).
    """
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # pragma: no cover - torch < 2.3
        return fx.GraphModule(root, graph, class_name=class_name)
    return _LazyGraphModule(root, graph, class_name=class_name)


def as_meta(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in tensors)


def default_kwargs(model: nn.Module, skip: int = 0) -> dict[str, Any]:
    """The parameters of ``model.forward`` after the first that have defaults, bound to them.

    ``model(x)`` runs with these defaults, so the trace does too: ``forward(x, drop_connect_rate=None)`` (a block
    traced alone) or ``forward(pixel_values, return_dict=None)`` traces as that call, not with proxies for them.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1 + skip:]  # the first input, and ``skip`` more the caller passes
            if p.kind in kinds and p.default is not inspect.Parameter.empty}


def drop_specialized(graph: fx.Graph, concrete: Mapping[str, Any]) -> None:
    """Remove the placeholders fx makes for ``concrete_args`` and the asserts that guard them.

    The analysis sees the graph of ``model(x)``: one placeholder per tensor input, no guard nodes.
    """
    if not concrete:
        return
    specialized = [n for n in graph.nodes if n.op == "placeholder" and n is not next(iter(graph.nodes))
                   and any(re.fullmatch(rf"{re.escape(name)}(_\d+)?", str(n.target)) for name in concrete)]
    doomed: list[fx.Node] = []
    stack = list(specialized)
    while stack:
        node = stack.pop()
        if node not in doomed:
            doomed.append(node)
            stack.extend(node.users)
    for node in sorted(doomed, key=_position(graph), reverse=True):
        graph.erase_node(node)


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def meta_copy(model: nn.Module) -> Any:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no memory, no data copy).

    A tree of torch's own layers (a conv, a norm: what shape propagation copies, once per leaf and per trace) is
    copied as shells that share the layers' other attributes, which their forwards only read: a deep copy of
    each attribute costs ten times more than running the layer on meta tensors.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    if all(type(m).__module__.startswith(_TORCH_LAYERS) for m in model.modules()):
        return _shell_copy(model, memo)
    return copy_module(model, memo)


_TORCH_LAYERS = "torch.nn.modules."


def _shell_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A copy of ``module`` whose parameters, buffers and children are ``memo``'s (children copied alike), sharing
    every other attribute with ``module``; a module met twice is copied once, as ``copy.deepcopy`` does."""
    if id(module) in memo:
        return memo[id(module)]
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    new.__dict__.update(module.__dict__)
    new.__dict__["_parameters"] = {k: None if p is None else memo[id(p)] for k, p in module._parameters.items()}
    new.__dict__["_buffers"] = {k: None if b is None else memo[id(b)] for k, b in module._buffers.items()}
    new.__dict__["_modules"] = {k: None if m is None else _shell_copy(m, memo) for k, m in module._modules.items()}
    return new


class _ShapeProp(ShapeProp):
    """fx's ShapeProp run on meta-device copies of the called modules, with two additions.

    A leaf module whose forward depends on data (``if x.mean() > 0``) cannot run on meta tensors, so that
    one module runs, for real, on zeros of its input's shape. With ``tolerate_inputs``, a conv, BatchNorm or
    ``Linear`` fed another number of channels (a flatten head at another input size, the layers after a dense
    block that grew) is recorded in ``mismatched`` as ``(in, out)`` and runs as if resized: a BatchNorm to its
    input, a conv or ``Linear`` in ``keep_ratio`` to ``floor(in * ratio)`` outputs, any other to its own.
    """

    def __init__(self, gm: fx.GraphModule, tolerate_inputs: bool = False,
                 keep_ratio: Mapping[str, Fraction] | None = None) -> None:
        super().__init__(gm)  # runs gm's own graph, so that its nodes receive the shapes
        self.tolerate_inputs = tolerate_inputs
        self.keep_ratio = dict(keep_ratio or {})
        self.mismatched: dict[str, tuple[int, int]] = {}
        self._meta: dict[str, Any] = {}
        self._leaves = dict(gm.named_modules())  # the called modules by path, not walked to at each call

    def _real(self, target: str) -> Any:
        found = self._leaves.get(target)
        return found if found is not None else super().fetch_attr(target)

    def _on_meta(self, target: str) -> Any:
        """A meta-device copy of attribute ``target`` (a leaf module or a tensor), made once."""
        if target not in self._meta:
            real = self._real(target)
            if isinstance(real, nn.Module):
                self._meta[target] = real if _on_meta(real) else meta_copy(real)
            elif isinstance(real, torch.Tensor):
                self._meta[target] = torch.empty_like(real, device="meta")
            else:
                self._meta[target] = real
        return self._meta[target]

    def fetch_attr(self, target: str) -> Any:
        return self._on_meta(target)

    def run_node(self, n: fx.Node) -> Any:
        """ShapeProp's, recording a tensor's shape, dtype and strides but not the memory formats it is contiguous in
        (which ShapeProp tests each output for: a third of the propagation's time, and nothing here reads them)."""
        try:  # fx.Interpreter.run_node, less its context that names the current node for fx's own tracebacks
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception as e:
            raise RuntimeError(f"ShapeProp error for: node={n.format_node()} with meta={n.meta}") from e
        found = False

        def described(obj: Any) -> Any:
            nonlocal found
            if not isinstance(obj, torch.Tensor):
                return obj
            found = True
            return TensorMetadata(obj.shape, obj.dtype, obj.requires_grad, obj.stride(), None, False, {})

        meta = map_aggregate(result, described)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        real = self._real(str(target))
        x = args[0] if args else None
        several = sum(isinstance(a, torch.Tensor) for a in args) > 1  # an octave conv's maps: no one input to follow
        fed = _fed_mismatch(real, x) if self.tolerate_inputs and not several else None
        if fed is not None:
            out = _fed_output(real, fed, self.keep_ratio.get(str(target)))
            self.mismatched[str(target)] = (fed, out)
            return resize(meta_copy(real), fed, out)(*args, **kwargs)
        if isinstance(real, SHAPE_PRESERVING) and isinstance(x, torch.Tensor) and len(args) == 1 and not kwargs:
            return empty_like(x)  # norms and activations keep their input's shape (meta batch_norm is slow)
        try:
            return self._on_meta(str(target))(*args, **kwargs)
        except (NotImplementedError, RuntimeError):
            if _on_meta(real):  # a planner's meta probe: run an uninitialised CPU copy (only shapes matter)
                real = copy.deepcopy(real).to_empty(device="cpu")
            device = _device(real)
            with torch.no_grad():
                real_args, real_kwargs = tree_map(
                    lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device) if isinstance(t, torch.Tensor) else t,
                    (args, kwargs))
                out = real(*real_args, **real_kwargs)
            return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, out)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)``, the same tensor, without the Python meta kernel it runs for a meta ``x``.

    ``empty_like`` gives a dense ``x``'s strides to its result: on meta, its decomposition spends a hundred
    times longer finding that out than ``empty_strided`` takes to make the tensor.
    """
    dense = x.layout == torch.strided and x.numel() > 0 and (
        x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        or (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)))
    if x.device.type != "meta" or not dense:
        return torch.empty_like(x)
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)


def _fed_mismatch(module: nn.Module, x: Any) -> int | None:
    """The channels ``x`` feeds a (non-grouped) conv, BatchNorm or linear that expects another number, else ``None``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    conv = isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1
    if not (conv or isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm))):
        return None
    fed = int(x.shape[-1] if isinstance(module, nn.Linear) else x.shape[1])
    return fed if fed != channels(module)[0] else None


def _fed_output(module: nn.Module, fed: int, ratio: Fraction | None) -> int:
    """Outputs of a conv/norm/linear fed ``fed`` channels: a norm's follow them, a conv's keep ``ratio`` if given."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return fed
    return max(1, math.floor(fed * ratio)) if ratio is not None else channels(module)[1]




def _on_meta(module: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in module.parameters())


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def propagate_shapes(traced: Traced, tolerate_inputs: bool = False,
                     keep_ratio: Mapping[str, Fraction] | None = None) -> dict[str, tuple[int, int]]:
    """Fill ``node.meta["tensor_meta"]`` by running the graph on meta tensors (no real compute, no memory).

    Returns the conv/BatchNorm/``Linear`` layers fed another number of channels (path -> (channels fed, output
    channels)) when ``tolerate_inputs`` is set; otherwise such a layer fails like any other. The convs and linears
    in ``keep_ratio`` (path -> out / in) keep that ratio when fed another number; the others keep their outputs.
    """
    prop = _ShapeProp(traced.gm, tolerate_inputs, keep_ratio)
    x = torch.empty(traced.input_shape, device="meta", dtype=_float_dtype(traced.gm))
    with eval_mode(traced.gm), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints its tracebacks
        try:
            prop.propagate(x, *traced.extra_inputs)
        except Exception as e:
            raise TraceError(
                f"shape propagation through {type(traced.gm).__name__} at input {tuple(traced.input_shape)} failed: "
                f"{_first_line(e)}",
                "check that the model accepts this input size; a model whose layers expect one size (fixed-size "
                "pooling, constant interpolate sizes) cannot change resolution: make them adaptive.",
            ) from e
    return prop.mismatched


def _first_line(e: BaseException) -> str:
    """The innermost cause's type and first line, and the node ShapeProp names."""
    inner: BaseException = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    node = str(e).split(" with meta=")[0].removeprefix("ShapeProp error for: ")
    text = f"{type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}"
    return f"{text} (at {node})" if node != str(e) else text


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first conv or linear (path, module) the graph calls (of a ``GraphModule``), else among the modules."""
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            if node.op == "call_module":
                m = model.get_submodule(str(node.target))
                if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                    return str(node.target), m
    return next(((p, m) for p, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))),
                None)


_EXAMPLE_SIZE = {1: (224,), 2: (224, 224), 3: (16, 112, 112)}  # what to suggest for a conv of so many spatial dims


def default_input_shape(model: nn.Module, input_size: Sequence[int]) -> tuple[int, ...]:
    """``(1, C, *input_size)``, ``C`` the first conv's (or linear's) input channels.

    Raises:
        TraceError: the first layer is a convolution over another number of dimensions than ``input_size`` has
            (a ``Conv3d`` of a video network given the default ``(224, 224)``): the message says what it takes.
    """
    first = _first_layer(model)
    if first is None:
        return (1, 3, *input_size)
    path, layer = first
    channels = input_channels_of(layer)
    if isinstance(layer, nn.modules.conv._ConvNd) and len(layer.kernel_size) != len(input_size):
        rank = len(layer.kernel_size)
        size = _EXAMPLE_SIZE.get(rank, (32,) * rank)
        example = ", ".join(str(d) for d in (1, channels, *size))
        raise TraceError(
            f"{type(model).__name__} cannot run on an input of size {tuple(input_size)}: its first layer "
            f"{path or '<root>'} is a {type(layer).__name__} over {rank} dimension(s), taking {channels} channels",
            f"pass example_inputs=(torch.randn({example}),) or input_size={size!r}.")
    return (1, channels, *input_size)


def input_channels_of(model: nn.Module) -> int:
    """``in_channels`` of the first conv (or ``in_features`` of the first linear) among ``model``'s modules."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    return 3
