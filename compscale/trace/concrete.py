"""An fx tracer that knows every tensor's shape while it traces ("concrete-shape" tracing).

Plain ``torch.fx`` symbolic tracing fails on forwards that do ordinary Python on static shapes, as Hugging
Face's vision models do (``if pixel_values.shape[1] != self.num_channels: raise``, ``int(x.shape[-1])`` for
TF-style padding, ``for d in x.shape``, ``(self, *args, **kwargs)`` decorators, ``ModelOutput`` results).
:class:`ConcreteTracer` runs every op as it records it, on ``FakeTensorMode`` tensors (no data, no memory;
leaf modules run with their real parameters on fake inputs), and attaches the fake result to the node's
proxy. ``.shape``, ``.size()``, ``.dim()``, ``.ndim``, ``.dtype``, ``.device``, ``len()`` and iteration then
answer concrete Python values, so shape arithmetic and branches on shapes run as Python and leave only
tensor ops in the graph (their results are constants for the traced input size). ``bool()``/``int()`` of a
tensor's *values* still fails, naming the module and source line (that forward is data-dependent).

Prior art: ``torch.fx.experimental.meta_tracer.MetaTracer`` (meta tensors, ``orig_forward`` and
``_disable_module_getattr`` for leaves) and transformers' ``HFTracer`` (removed in transformers 5).

Example:
    >>> from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    >>> traced = trace_concrete(MobileNetV2ForImageClassification(MobileNetV2Config()))
    >>> traced.shape(traced.output_node)
    torch.Size([1, 1001])
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import Target
from torch.fx.passes.shape_prop import _extract_tensor_metadata
from torch.utils._pytree import tree_map

from compscale.errors import TraceError
from compscale.trace.tracer import (
    SHAPE_PRESERVING,
    TRACE_HINT,
    CompscaleTracer,
    Traced,
    as_meta,
    default_input_shape,
    eval_mode,
    graph_module,
    input_channels_of,
    propagate_shapes,
)

__all__ = ["ConcreteProxy", "ConcreteTracer", "OutputSpec", "trace_concrete"]

_NO_VALUE = object()  # a node whose value could not be computed (a data-dependent op): it traces symbolically
log = logging.getLogger("compscale")
_THIS_FILE = os.path.abspath(__file__)
_FX_DIR = os.path.dirname(os.path.abspath(fx.__file__))


class ConcreteProxy(fx.Proxy):
    """A proxy whose tensor's metadata is known: shape queries return Python values, not graph nodes."""

    tracer: ConcreteTracer

    def __repr__(self) -> str:
        return f"ConcreteProxy({self.node.name})"

    @property
    def value(self) -> Any:
        """The fake value of this node (a fake tensor, a tuple of them, a Python scalar...) or ``_NO_VALUE``."""
        return self.tracer.value_of(self.node)

    def _tensor(self) -> torch.Tensor | None:
        v = self.value
        return v if isinstance(v, torch.Tensor) else None

    def _ask(self, method: str, *args: Any) -> Any:
        """``tensor.method(*args)`` of the known tensor, else a ``call_method`` node."""
        t = self._tensor()
        if t is not None:
            return getattr(t, method)(*args)
        return self.tracer.create_proxy("call_method", method, (self, *args), {})

    @property
    def shape(self) -> Any:
        t = self._tensor()
        return t.shape if t is not None else self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})

    def size(self, dim: int | None = None) -> Any:
        return self._ask("size") if dim is None else self._ask("size", dim)

    def dim(self) -> Any:
        return self._ask("dim")

    @property
    def ndim(self) -> Any:
        return self.dim()

    def numel(self) -> Any:
        return self._ask("numel")

    def __len__(self) -> int:
        v = self.value
        if v is _NO_VALUE:
            raise self.tracer.unknown_value(self, "len()")
        return len(v)

    def __iter__(self) -> Iterator[fx.Proxy]:
        v = self.value
        if v is _NO_VALUE:
            raise self.tracer.unknown_value(self, "iteration")
        return (self[i] for i in range(len(v)))  # type: ignore[index]

    def __bool__(self) -> bool:
        return self.tracer.to_bool(self)

    def __int__(self) -> int:
        raise self.tracer.data_dependent(self, "int()")

    def __float__(self) -> float:
        raise self.tracer.data_dependent(self, "float()")

    def __index__(self) -> int:
        raise self.tracer.data_dependent(self, "use as an index")

    def __getattr__(self, k: str) -> Any:
        v = self.value
        if v is not _NO_VALUE and k in ("dtype", "device", "is_cuda", "layout", "requires_grad", "is_sparse"):
            return getattr(v, k)  # metadata: a concrete value, no node
        return ConcreteAttribute(self, k)


class ConcreteAttribute(ConcreteProxy):
    """``proxy.attr``: a method about to be called (a ``call_method`` node) or an attribute (a ``getattr`` node,
    added only when used); its value is the attribute of the root's value."""

    def __init__(self, root: ConcreteProxy, attr: str) -> None:
        self.root = root
        self.attr = attr
        self.tracer = root.tracer
        self._node: fx.Node | None = None

    @property
    def node(self) -> fx.Node:  # type: ignore[override]
        if self._node is None:
            self._node = self.tracer.create_proxy("call_function", getattr, (self.root, self.attr), {}).node
        return self._node

    @property
    def value(self) -> Any:
        if self._node is not None:
            return self.tracer.value_of(self._node)
        root = self.root.value
        return _NO_VALUE if root is _NO_VALUE else getattr(root, self.attr, _NO_VALUE)

    def __call__(self, *args: Any, **kwargs: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_method", self.attr, (self.root, *args), kwargs)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """How the forward's result maps to the graph's output.

    ``kind`` is ``"tensor"`` (the output is one node), ``"mapping"`` (a dict of nodes under ``keys``; the model
    returned ``type_name``, a dict, dataclass or ``ModelOutput``) or ``"other"`` (a tuple/list, kept as fx does).
    ``selected`` is the key kept when the result was reduced to one tensor.
    """

    kind: str
    type_name: str
    keys: tuple[str, ...] = ()
    selected: str | None = None


class ConcreteTracer(CompscaleTracer):
    """A :class:`~compscale.trace.tracer.CompscaleTracer` (same leaves) that computes each node's value on fake
    tensors as it creates the node, so that Python code on shapes runs during tracing.

    Args:
        leaf_modules, autowrap_functions, leaf_paths: as for ``CompscaleTracer``.
        strict: raise when an op cannot run on fake tensors (otherwise that node, and those computed from it,
            trace symbolically as plain fx would).
    """

    def __init__(
        self,
        leaf_modules: Iterable[type[nn.Module]] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
        leaf_paths: Iterable[str] = (),
        strict: bool = False,
    ) -> None:
        super().__init__(leaf_modules, autowrap_functions, leaf_paths)
        self.strict = strict
        self.fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.values: dict[fx.Node, Any] = {}
        self.failures: dict[str, str] = {}  # node name -> why its value is unknown
        self.output_spec: OutputSpec | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._output_key: str | None = None
        self._running = 0  # > 0 while a leaf runs on fake tensors: module calls and attributes are not traced
        self._leaf_forward: Callable[..., Any] | None = None

    # --- entry points -------------------------------------------------------------------------

    def trace(  # type: ignore[override]
        self,
        root: nn.Module,
        inputs: Mapping[str, torch.Tensor] | None = None,
        *,
        kwargs: Mapping[str, Any] | None = None,
        output: str | None = None,
    ) -> fx.Graph:
        """Trace ``root.forward`` called with ``inputs`` (name -> example tensor, real or fake; only its shape,
        dtype and device matter) as placeholders and ``kwargs`` as constants; every other parameter keeps its
        default. ``output`` picks one key of a dict/``ModelOutput`` result (by default a result with one tensor
        is reduced to it)."""
        if inputs is None:
            name = _main_input_name(root)
            inputs = {name: torch.empty(1, input_channels_of(root), 224, 224)}
        self._inputs = {k: self.fake_mode.from_tensor(v, static_shapes=True) for k, v in inputs.items()}
        self._constant_kwargs = dict(kwargs or {})
        self._output_key = output
        self.values.clear()
        self.failures.clear()
        return super().trace(root)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: Any = None) -> tuple[Callable[..., Any], list[Any]]:
        """Placeholders for the tensor inputs only; the forward (decorators included) is called with them and
        the constant kwargs by keyword, so that its other parameters take their defaults."""
        sig = inspect.signature(inspect.unwrap(root_fn))
        params = list(sig.parameters.values())[1:] if is_module else list(sig.parameters.values())
        names = {p.name for p in params}
        has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        for name in (*self._inputs, *self._constant_kwargs):
            if name not in names and not has_var_kw:
                raise TraceError(f"{getattr(root_fn, '__qualname__', root_fn)} has no parameter {name!r}",
                                 f"its parameters: {[p.name for p in params]}")
        missing = [p.name for p in params if p.default is inspect.Parameter.empty
                   and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                   and p.name not in self._inputs and p.name not in self._constant_kwargs]
        if missing:
            raise TraceError(f"forward parameters {missing} have no default", "pass them as inputs or kwargs.")
        input_names = list(self._inputs)
        constants = self._constant_kwargs

        def entry(*args: Any) -> Any:
            head, tensors = (args[:1], args[1:]) if is_module else ((), args)
            return self._record_output(root_fn(*head, **dict(zip(input_names, tensors)), **constants))

        placeholders = [self.create_proxy("placeholder", name, (), {}) for name in input_names]
        return entry, ([self.root] if is_module else []) + placeholders

    # --- node values --------------------------------------------------------------------------

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def value_of(self, node: fx.Node) -> Any:
        return self.values.get(node, _NO_VALUE)

    def create_proxy(self, kind: str, target: Target, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any | None = None,
                     proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None) -> fx.Proxy:
        # parameters get our proxy too (fx would make a ParameterProxy): its shape is concrete all the same
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)
        try:
            value = self._compute(kind, target, args, kwargs)
        except _UnknownInput as e:
            self.failures[proxy.node.name] = f"its input {e} has no value"
            value = _NO_VALUE
        except Exception as e:  # an op that needs data (nonzero, item) or that fake tensors do not support
            if self.strict:
                raise TraceError(f"cannot compute {proxy.node.format_node()} on fake tensors at "
                                 f"{self._where()}: {type(e).__name__}: {e}", TRACE_HINT) from e
            self.failures[proxy.node.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            value = _NO_VALUE
        if value is None and kind in ("call_function", "call_method"):
            # an absent branch (an octave conv's `(x_h, None)`, `self.shortcut(x) if ... else None`): the forward
            # sees the None itself, so that its `if x_l is not None` runs as Python, and the graph has no node for it
            self.graph.erase_node(proxy.node)
            return None  # type: ignore[return-value]
        if value is not _NO_VALUE:
            self.values[proxy.node] = value
        return proxy

    def _compute(self, kind: str, target: Target, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The fake value of a node about to be created (``_NO_VALUE`` if one of its inputs has none)."""
        if kind == "placeholder":
            return self._inputs[str(target)]
        if kind == "output":
            return _NO_VALUE
        if kind == "get_attr":
            self._running += 1
            try:
                attr: Any = self.root
                for atom in str(target).split("."):
                    attr = getattr(attr, atom)
            finally:
                self._running -= 1
            return self.fake_mode.from_tensor(attr, static_shapes=True) if isinstance(attr, torch.Tensor) else attr
        unknown = False

        def unwrap(a: Any) -> Any:
            nonlocal unknown
            if isinstance(a, fx.Proxy):
                v = a.value if isinstance(a, ConcreteProxy) else _NO_VALUE
                unknown = unknown or v is _NO_VALUE
                return v
            return a

        fargs, fkwargs = tree_map(unwrap, (args, kwargs), is_leaf=lambda a: isinstance(a, fx.Proxy))
        if unknown:
            raise _UnknownInput(next(a.node.name for a in _proxies((args, kwargs)) if a.value is _NO_VALUE))
        self._running += 1
        try:
            with self.fake_mode, _fake_log_to_debug():
                if kind == "call_function":
                    return target(*fargs, **fkwargs)  # type: ignore[operator]
                if kind == "call_method":
                    return getattr(fargs[0], str(target))(*fargs[1:], **fkwargs)
                if kind == "call_module":
                    module = self.root.get_submodule(str(target))
                    if isinstance(module, SHAPE_PRESERVING) and len(fargs) == 1 and not fkwargs \
                            and isinstance(fargs[0], torch.Tensor):
                        return torch.empty_like(fargs[0])  # norms, activations: skip their (slow) fake kernels
                    assert self._leaf_forward is not None
                    return self._leaf_forward(*fargs, **fkwargs)  # real parameters, fake inputs
        finally:
            self._running -= 1
        raise AssertionError(kind)

    # --- module calls and attributes while a leaf runs on fake tensors -----------------------------

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        if self._running or threading.get_ident() != self._thread:
            # a child of a leaf running on fakes, or another thread's call through fx's global patch: run it
            return forward(*args, **kwargs)
        self._leaf_forward = forward
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # --- errors ---------------------------------------------------------------------------------

    def to_bool(self, obj: fx.Proxy) -> bool:
        raise self.data_dependent(obj, "bool() (an `if`, `and`, `or`, `not` or `assert` on a tensor)")

    def data_dependent(self, obj: fx.Proxy, use: str) -> fx.proxy.TraceError:
        """The error for a Python use of a tensor's values: it names the node and the source line."""
        return fx.proxy.TraceError(
            f"data-dependent control flow: {use} of the value of {obj.node.format_node()} at {self._where(False)}")

    def unknown_value(self, obj: fx.Proxy, use: str) -> fx.proxy.TraceError:
        """The error for a Python use of a node whose value could not be computed on fake tensors."""
        why = self.failures.get(obj.node.name, "")
        while why.startswith("its input ") and why.endswith(" has no value"):  # up to the op that failed
            name = why.removeprefix("its input ").removesuffix(" has no value")
            why = f"{name}: " + self.failures.get(name, "?")
        return fx.proxy.TraceError(
            f"{use} of {obj.node.format_node()} at {self._where(False)}: its value is unknown ({why})")

    def _where(self, module: bool = True) -> str:
        """The innermost module being traced (with ``module``) and the model's source line that is running."""
        path = ""
        if module and self.module_stack:
            qual, mtype = next(reversed(self.module_stack.values()))
            path = f"module {qual or '<root>'!r} ({getattr(mtype, '__name__', mtype)}), "
        for frame in reversed(traceback.extract_stack()):
            fname = os.path.abspath(frame.filename)
            if fname != _THIS_FILE and not fname.startswith(_FX_DIR):
                return f"{path}{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
        return path.rstrip(", ")

    # --- outputs --------------------------------------------------------------------------------

    def _record_output(self, out: Any) -> Any:
        """Reduce a dict/dataclass/``ModelOutput`` result to what fx can put in the graph's output: the tensor
        under ``output`` (or the only tensor), else a plain dict of the tensor-valued fields."""
        type_name = type(out).__name__
        if isinstance(out, fx.Proxy):
            self.output_spec = OutputSpec("tensor", type_name)
            return out
        if dataclasses.is_dataclass(out) and not isinstance(out, Mapping):
            out = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        if isinstance(out, Mapping):
            items = {str(k): v for k, v in out.items() if v is not None}
            keys = tuple(items)
            if self._output_key is not None:
                if self._output_key not in items:
                    raise TraceError(f"the model returns {type_name} without {self._output_key!r}", f"keys: {keys}")
                self.output_spec = OutputSpec("mapping", type_name, keys, self._output_key)
                return items[self._output_key]
            tensors = [k for k, v in items.items() if isinstance(v, fx.Proxy)]
            if len(tensors) == 1:
                self.output_spec = OutputSpec("mapping", type_name, keys, tensors[0])
                return items[tensors[0]]
            self.output_spec = OutputSpec("mapping", type_name, keys)
            return dict(items)
        self.output_spec = OutputSpec("other", type_name)
        return out

    # --- after tracing ------------------------------------------------------------------------

    def annotate(self, graph: fx.Graph) -> None:
        """Copy the traced values' shapes into ``node.meta["tensor_meta"]`` (ShapeProp's format) and drop the
        fake tensors."""
        for node in graph.nodes:
            v = self.values.get(node, _NO_VALUE)
            if isinstance(v, torch.Tensor):
                node.meta["tensor_meta"] = _extract_tensor_metadata(v)
        self.values.clear()


class _ToDebug(logging.Filter):
    """Turns a record into one DEBUG line of compscale's log (dropping it where it was logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        log.debug("fake tensors: %s", record.getMessage())
        return False


_TO_DEBUG = _ToDebug()
_FAKE_LOG = logging.getLogger("torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _fake_log_to_debug() -> Iterator[None]:
    """While an op runs on fake tensors: torch logs, with its traceback, at ERROR level every op whose meta kernel
    fails; the tracer records that failure itself (the node traces symbolically), so the log goes to DEBUG."""
    _FAKE_LOG.addFilter(_TO_DEBUG)
    try:
        yield
    finally:
        _FAKE_LOG.removeFilter(_TO_DEBUG)


class _UnknownInput(Exception):
    """An op's input has no value (its message: the input node's name)."""


def _proxies(a: Any) -> list[ConcreteProxy]:
    found: list[ConcreteProxy] = []
    fx.node.map_aggregate(a, lambda x: found.append(x) if isinstance(x, ConcreteProxy) else None)
    return found


def _required_inputs(model: nn.Module) -> list[str]:
    """The forward's parameters without defaults, in order (the inputs of a call)."""
    params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def _main_input_name(model: nn.Module) -> str:
    """The forward's tensor input: Hugging Face's ``main_input_name``, else the first parameter."""
    name = getattr(model, "main_input_name", None)
    if isinstance(name, str):
        return name
    params = list(inspect.signature(inspect.unwrap(type(model).forward)).parameters)
    if len(params) < 2:
        raise TraceError(f"{type(model).__name__}.forward takes no input",
                         "compscale scales models called with at least one tensor input.")
    return params[1]


def trace_concrete(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                   input_size: Sequence[int] = (224, 224), shapes: bool = True,
                   leaf_modules: Iterable[type[nn.Module]] = (), autowrap_functions: Iterable[Callable[..., Any]] = (),
                   input_name: str | None = None, kwargs: Mapping[str, Any] | None = None, output: str | None = None,
                   extra_inputs: Sequence[torch.Tensor] = ()) -> Traced:
    """As :func:`compscale.trace.trace`, with :class:`ConcreteTracer`: trace ``model`` (in eval mode) at
    ``input_shape`` and, with ``shapes``, propagate shapes with compscale's ShapeProp (as ``trace`` does).

    The graph is valid for ``input_shape`` only where the forward computed Python values from shapes.
    ``kwargs`` are forward arguments bound as constants (``return_dict=True``...); ``output`` picks a key of a
    dict/``ModelOutput`` result.
    """
    leaf_modules, autowrap_functions = tuple(leaf_modules), tuple(autowrap_functions)
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(model, input_size)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tracer = ConcreteTracer(leaf_modules, autowrap_functions)
    name = type(model).__name__
    with eval_mode(model), torch.no_grad():
        example = torch.empty(shape, dtype=dtype, device=device)  # only its metadata is used (made fake)
        try:
            inputs = {input_name or _main_input_name(model): example}
            inputs.update(zip(_required_inputs(model)[1:], (torch.empty(t.shape, dtype=t.dtype, device=device)
                                                            for t in extra_inputs)))
            graph = tracer.trace(model, inputs, kwargs=kwargs, output=output)
        except TraceError:
            raise
        except Exception as e:  # worded as compscale's trace() words it
            where = f"{name}.forward"
            if tracer.module_stack:
                path, mtype = next(reversed(tracer.module_stack.values()))
                if path:
                    where += f", inside submodule {path!r} ({getattr(mtype, '__name__', mtype)}.forward)"
            raise TraceError(f"torch.fx cannot trace {where}: {type(e).__name__}: {e}", TRACE_HINT) from e
    tracer.annotate(graph)
    gm = graph_module(model, graph, name)
    gm.meta["output_spec"] = tracer.output_spec
    gm.meta["fake_failures"] = dict(tracer.failures)
    traced = Traced(model, gm, shape, leaf_modules, autowrap_functions, as_meta(extra_inputs))
    if shapes:
        propagate_shapes(traced)
    return traced
