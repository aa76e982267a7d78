"""The tracing entry point, :func:`trace`: symbolic tracing (:mod:`compscale.trace.tracer`) first, concrete-shape
tracing (:mod:`compscale.trace.concrete`) where it fails, shapes propagated and the result checked.

Both tracers sit below this module; each :class:`~compscale.trace.tracer.Traced` made here records :func:`retrace`,
which :meth:`~compscale.trace.tracer.Traced.retrace` and :meth:`~compscale.trace.tracer.Traced.retrace_graph` call,
so that the tracer module needs no import of the tracing entry point above it.

Example:
    >>> from torchvision.models import resnet18
    >>> traced = trace(resnet18())
    >>> traced.input_shape, traced.shape(traced.output_node)
    ((1, 3, 224, 224), torch.Size([1, 1000]))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from compscale.errors import CompscaleError, TraceError
from compscale.trace.concrete import trace_concrete
from compscale.trace.tracer import (
    CompscaleTracer,
    Traced,
    as_meta,
    check_layer_outputs,
    default_input_shape,
    default_kwargs,
    drop_specialized,
    eval_mode,
    graph_module,
    propagate_shapes,
    refuse_non_cnn,
)

__all__ = ["retrace", "trace"]

log = logging.getLogger("compscale")


def trace(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    input_size: Sequence[int] = (224, 224),
    shapes: bool = True,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    extra_inputs: Sequence[torch.Tensor] = (),
) -> Traced:
    """Trace ``model`` (in eval mode, restored afterwards) and propagate shapes on meta tensors.

    Args:
        model: the network; it is not modified.
        input_shape: ``(N, C, H, W)``; by default ``(1, C, *input_size)`` with ``C`` read off the first conv.
        input_size: ``(H, W)`` when ``input_shape`` is not given.
        shapes: propagate shapes (``node.meta["tensor_meta"]``).
        leaf_modules: module types fx should not trace into.
        autowrap_functions: functions fx should record as calls instead of tracing.
        extra_inputs: example tensors for the forward's inputs after the first (only their shapes and dtypes
            matter); they keep their shapes when the first input changes resolution.

    Symbolic tracing comes first (it is fast); a forward it cannot trace, because it does Python on shapes
    (``if x.shape[1] != 3``, ``int(x.size(-1))``, keyword inputs, ``ModelOutput`` results: Hugging Face's
    models), is traced again with :mod:`compscale.trace.concrete`, which knows every shape while it traces.

    Raises:
        TraceError: neither tracer can trace ``model.forward`` (a forward that branches on tensor *values*: the
            message names the source line), or shapes cannot be propagated.
    """
    with attributes_kept(model):
        return _trace(model, input_shape, input_size, shapes, tuple(leaf_modules), tuple(autowrap_functions),
                      extra_inputs)


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Within this block, what a forward stores on the modules of ``model`` is put back as it was afterwards:
    tracing runs the forward on proxies and fake tensors, and a forward that keeps a value on ``self`` (RAFT's
    correlation block keeps its pyramid) would otherwise leave proxies in the model it returns."""
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        yield
    finally:
        for m, before in saved:
            now = m.__dict__
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value


_MISSING = object()


def _trace(model: nn.Module, input_shape: Sequence[int] | None, input_size: Sequence[int], shapes: bool,
           leaf_modules: tuple[type[nn.Module], ...], autowrap_functions: tuple[Callable[..., Any], ...],
           extra_inputs: Sequence[torch.Tensor]) -> Traced:
    tracer = CompscaleTracer(leaf_modules, autowrap_functions)
    with eval_mode(model):
        try:
            defaults = default_kwargs(model, skip=len(extra_inputs))
            graph = tracer.trace(model, concrete_args=defaults or None)
            drop_specialized(graph, defaults)
        except Exception as e:  # fx raises TraceError, TypeError, AttributeError... for untraceable code
            log.debug("symbolic tracing of %s failed (%s: %s); tracing with concrete shapes", type(model).__name__,
                      type(e).__name__, e)
            return _recorded(trace_concrete(model, input_shape, input_size=input_size, shapes=shapes,
                                            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                                            extra_inputs=extra_inputs), shapes)
    gm = graph_module(model, graph, type(model).__name__)
    gm.meta["compscale_symbolic"] = True  # the graph reads no shape: it holds for the model's layers at any width
    shape = tuple(input_shape) if input_shape is not None else default_input_shape(gm, input_size)
    traced = Traced(model, gm, shape, leaf_modules, autowrap_functions, as_meta(extra_inputs))
    if shapes:
        try:
            propagate_shapes(traced)
        except TraceError as e:
            if not _python_value_error(e):
                raise
            traced = _concrete_or_raise(model, shape, e, leaf_modules, autowrap_functions, extra_inputs)
    return _recorded(traced, shapes)


def retrace(traced: Traced, model: nn.Module, input_shape: Sequence[int], shapes: bool) -> Traced:
    """``model`` (a rewritten one, a block) traced with ``traced``'s tracer options (its extra inputs too, for the
    same model): :meth:`Traced.retrace <compscale.trace.tracer.Traced.retrace>` (``shapes``) and
    :meth:`Traced.retrace_graph <compscale.trace.tracer.Traced.retrace_graph>` (not: the caller propagates them,
    with its own options). Without shapes, a model traced with concrete values (its symbolic graph computes
    ``None + None`` where Python skipped a branch: an octave network's missing low-frequency map) is traced so
    again."""
    extra_inputs = traced.extra_inputs if model is traced.root else ()
    if not shapes and not traced.gm.meta.get("compscale_symbolic") and model is traced.root:
        try:
            with attributes_kept(model):
                return _recorded(trace_concrete(model, input_shape, shapes=False, leaf_modules=traced.leaf_modules,
                                                autowrap_functions=traced.autowrap_functions,
                                                extra_inputs=traced.extra_inputs))
        except CompscaleError:  # a layer fed other channels: the caller's shape propagation may tolerate it
            log.debug("concrete retrace of %s failed; tracing symbolically", type(model).__name__)
    return trace(model, input_shape, leaf_modules=traced.leaf_modules, autowrap_functions=traced.autowrap_functions,
                 shapes=shapes, extra_inputs=extra_inputs)


def _recorded(traced: Traced, checked: bool = False) -> Traced:
    """``traced``, its retraces made by :func:`retrace`; with ``checked`` (its shapes propagated), refused where a
    layer to resize returns several values or the network is not a CNN."""
    if checked:
        check_layer_outputs(traced)
        refuse_non_cnn(traced)
    traced.retracer = retrace
    return traced


def _python_value_error(e: BaseException) -> bool:
    """Whether shape propagation failed on a Python value where the graph expected a tensor (``None + None``,
    ``None.size()``): a branch symbolic tracing could not see, such as ``if x_l is not None`` on a layer's second
    output, which is ``None`` in some blocks. Shape errors of torch ops are ``RuntimeError``s."""
    inner: BaseException = e
    while inner.__cause__ is not None:
        inner = inner.__cause__
    return isinstance(inner, (TypeError, AttributeError))


def _concrete_or_raise(model: nn.Module, shape: tuple[int, ...], error: TraceError,
                       leaf_modules: tuple[type[nn.Module], ...], autowrap_functions: tuple[Callable[..., Any], ...],
                       extra_inputs: Sequence[torch.Tensor]) -> Traced:
    """The model traced with concrete values (its Python branches on ``None`` run as Python), else ``error``."""
    log.debug("shape propagation of the symbolic trace of %s failed (%s); tracing with concrete shapes",
              type(model).__name__, error)
    try:
        return trace_concrete(model, shape, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                              extra_inputs=extra_inputs)
    except CompscaleError:
        raise error from None
