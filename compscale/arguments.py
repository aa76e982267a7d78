"""The checks of the public functions' arguments, each stated once: ``scale``, ``plan``, ``Planner``, ``profile``,
``latency`` and :meth:`~compscale.planning.options.ScaleOptions.make` call these, so that one bad value gives the same
``TypeError`` (the wrong kind of value) or ``ValueError`` (the right kind, out of range) everywhere, naming the
argument and the form it takes.

Also the model argument as compscale needs it: a wrapped model (``torch.compile``, ``torch.jit.script``,
``nn.DataParallel``, ``DistributedDataParallel``) is refused with the hint to pass the module it wraps, and a model's
forward hooks are taken off compscale's copy while it traces it (:func:`take_hooks`), so that they never run on proxies.

Example:
    >>> check_input_size(160, "input_size")
    (160, 160)
    >>> check_input_size("224", "input_size")
    Traceback (most recent call last):
    ...
    TypeError: input_size must be a positive int or a sequence of positive ints (H, W), got str '224'
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compscale.errors import CompscaleError

__all__ = ["INPUT_LIMIT", "SEED_LIMIT", "as_hw", "check_count", "check_example_inputs", "check_forward_takes",
           "check_input_size", "check_number", "check_paths", "check_positive_number", "check_seed",
           "check_unwrapped", "give_hooks", "strip_hooks", "take_hooks"]

INPUT_LIMIT = 2**31
"""The most elements one channel of an input may have (46,340 x 46,340 pixels): an input size beyond it, given or
reached by a resolution multiplier, is refused rather than overflowing inside torch."""

SEED_LIMIT = 2**64
"""Seeds are ``0 <= seed < 2**64``, what ``torch.Generator.manual_seed`` takes."""


def _got(value: object) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def check_count(value: object, name: str, *, least: int = 1) -> int:
    """``value`` as an int of at least ``least``: a Python or numpy integer (``operator.index``); a bool refused.

    Raises:
        TypeError: not an integer.
        ValueError: below ``least``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {_got(value)}")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {_got(value)}") from None
    if n < least:
        raise ValueError(f"{name} must be {'0 or more' if least == 0 else f'at least {least}'}, got {n}")
    return n


def check_number(value: object, name: str, *, positive: bool = True, form: str | None = None) -> float:
    """``value`` as a float; a bool, a non-number (a string included), NaN, infinity (or, when ``positive``, a value
    <= 0) raises. ``form`` says what is accepted, in every message (``"a positive number of seconds"``).

    Raises:
        TypeError: not a real number.
        ValueError: not finite, or not > 0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {form or 'a real number'}, got {_got(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {form or 'finite'}, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be {form or '> 0'}, got {v}")
    return v


def check_positive_number(value: object, name: str, form: str | None = None) -> float:
    """``value`` as a finite float above 0 (a count of MACs, a number of seconds)."""
    return check_number(value, name, positive=True, form=form)


def check_seed(value: object, name: str = "seed") -> int | None:
    """``value`` as a seed (``None`` stays ``None``): an int, Python or numpy, with ``0 <= seed < 2**64``."""
    if value is None:
        return None
    seed = check_count(value, name, least=0)
    if seed >= SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed}")
    return seed


def check_input_size(value: object, name: str = "input_size", rank: int = 2) -> tuple[int, ...]:
    """The spatial size of an input (every dim after the channels): one positive int is a square (of ``rank`` dims), a
    non-empty sequence of positive ints is taken as it is (``(16000,)`` for audio, ``(16, 112, 112)`` for video).

    Raises:
        TypeError: neither an int nor a sequence of ints (a string, a float).
        ValueError: empty, a dim below 1, or more than :data:`INPUT_LIMIT` elements.
    """
    form = f"{name} must be a positive int or a sequence of positive ints (H, W)"
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{form}, got {_got(value)}")
    dims = tuple(value) if isinstance(value, Sequence) else (value,) * rank
    if not dims:
        raise ValueError(f"{form}, got an empty {type(value).__name__}")
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in dims):
        raise TypeError(f"{form}, got {_got(value)}")
    size = tuple(operator.index(d) for d in dims)  # type: ignore[arg-type]
    if any(d < 1 for d in size):
        raise ValueError(f"{form}, got {value!r:.60}")
    if math.prod(size) > INPUT_LIMIT:
        raise ValueError(f"{name}={value!r:.60} has more than {INPUT_LIMIT:,} elements per channel, more than "
                         "compscale plans for")
    return size


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from one int (a square) or a pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_paths(value: object, name: str, *, predicate: bool = False) -> tuple[str, ...] | Callable[[str], bool]:
    """Module paths: one str, or a sequence of str, as a tuple; with ``predicate``, also a callable ``path -> bool``
    (``stages=``).

    Raises:
        TypeError: anything else (a number, a sequence holding a non-string).
    """
    if isinstance(value, str):
        return (value,)
    if predicate and callable(value) and not isinstance(value, nn.Module):
        return value
    form = (f"{name} must be a module path (str), a sequence of module paths"
            f"{', or a predicate path -> bool' if predicate else ''}")
    if isinstance(value, (Sequence, set, frozenset)) and not isinstance(value, bytes):
        paths = tuple(value) if isinstance(value, Sequence) else tuple(sorted(value, key=str))
        if all(isinstance(p, str) for p in paths):
            return paths
    raise TypeError(f"{form}, got {_got(value)}")


def check_example_inputs(value: object, name: str = "example_inputs") -> tuple[torch.Tensor, ...] | None:
    """The inputs of one call, as ``torch.export`` takes them: a tuple (or list) of tensors, the first a floating one
    (the input that scales); one tensor is a tuple of one. ``None`` stays ``None``.

    Raises:
        TypeError: not tensors (a numpy array: convert it with ``torch.from_numpy``), or a first input that is not
            floating (integer, bool or complex).
        ValueError: an empty tuple.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = (value,)
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    numpy = [t for t in items if type(t).__module__ == "numpy" and type(t).__name__ == "ndarray"]
    if numpy:
        raise TypeError(f"{name} must be a tuple of tensors, as torch.export takes them; got a numpy.ndarray: "
                        "convert it with torch.from_numpy(array)")
    if not isinstance(value, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in items):
        raise TypeError(f"{name} must be a tuple of tensors, as torch.export takes them; got {type(value).__name__}"
                        f"{' holding ' + ', '.join(sorted({type(t).__name__ for t in items})) if items else ''}")
    if not items:
        raise ValueError(f"{name} must hold at least one tensor (the input that scales), got an empty "
                         f"{type(value).__name__}; give (torch.randn(1, 3, 224, 224),) or input_size=")
    first = items[0]
    if not first.is_floating_point():
        raise TypeError(f"{name}[0] must be a floating tensor (the input that scales: an image, a waveform), got "
                        f"dtype {first.dtype}; pass integer or boolean tensors after it")
    return items


def check_forward_takes(model: nn.Module, inputs: int, name: str = "example_inputs") -> None:
    """``TypeError`` when ``model.forward`` takes fewer positional inputs than the ``inputs`` given in ``name``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature (a builtin): let the call decide
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if inputs > len(positional):
        raise TypeError(f"{name} has {inputs} tensors, but {type(model).__name__}.forward takes {len(positional)} "
                        f"({', '.join(positional)}); give one tensor per input of the forward")


def check_unwrapped(model: nn.Module, caller: str) -> None:
    """Refuse a model wrapped by ``torch.compile``, ``torch.jit.script``/``trace`` or (Distributed)DataParallel, with
    the hint to pass the module it wraps: compscale rebuilds the module's layers, which a wrapper hides or fixes."""
    name = type(model).__name__
    if hasattr(model, "_orig_mod") and type(model).__module__.startswith("torch._dynamo"):
        hint = ("scale the original module, model._orig_mod (or the nn.Module before torch.compile), then compile the "
                "result: torch.compile(compscale.scale(model._orig_mod, ...)).")
        what = "a torch.compile'd module (OptimizedModule)"
    elif isinstance(model, torch.jit.ScriptModule):
        hint = ("scale the original nn.Module (the unscripted one) before scripting, then script the result: "
                "torch.jit.script(compscale.scale(model, ...)).")
        what = "a TorchScript module (torch.jit.script or torch.jit.trace)"
    elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        hint = (f"pass the module it wraps, model.module, and wrap the result again: {name}(compscale.scale("
                "model.module, ...)).")
        what = f"an nn.{name} wrapper" if isinstance(model, nn.DataParallel) else f"a {name} wrapper"
    else:
        return
    raise CompscaleError(f"compscale.{caller}() got {what}, whose layers it cannot rebuild", hint)


_HOOK_TABLES = {"_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
                "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",)}  # each table, and the flags of its hooks

Hooks = dict[str, dict[str, dict[int, Any]]]  # module path -> table or flags -> hook id -> hook or flag


def _structural(hook: object) -> bool:
    """A hook compscale put there (``compscale.rewrite.depth.RunAfter``: the blocks appended after a block that
    ``forward`` calls by name) is part of the network and stays."""
    return type(hook).__module__.startswith("compscale.")


def take_hooks(model: nn.Module) -> Hooks:
    """Take the forward hooks and pre-hooks off ``model`` (compscale's own copy, never the caller's) and its
    submodules, but those compscale put there, so that tracing runs none of them on proxies; what was taken, by
    module path, for :func:`give_hooks`. The tables are replaced, not emptied: a shallow copy's are the model's."""
    taken: Hooks = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for table, flags in _HOOK_TABLES.items():
            hooks = getattr(module, table, None)
            away = {k: h for k, h in (hooks or {}).items() if not _structural(h)}
            if not away:
                continue
            entry = taken.setdefault(path, {})
            for name in (table, *flags):
                current = getattr(module, name)
                entry[name] = {k: v for k, v in current.items() if k in away}
                setattr(module, name, OrderedDict((k, v) for k, v in current.items() if k not in away))
    return taken


def give_hooks(model: nn.Module, taken: Hooks) -> None:
    """Give each module path of ``model`` the hooks :func:`take_hooks` took from it, on the module that is there now
    (a layer resized in place or rebuilt alike), before any compscale added meanwhile (so that a hook on a block
    still sees that block's own output); blocks added meanwhile have none, a layer now gone none either."""
    for path, entry in taken.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        for name, items in entry.items():
            setattr(module, name, OrderedDict([*items.items(), *getattr(module, name).items()]))


def strip_hooks(model: nn.Module) -> nn.Module:
    """``model`` (a copy of compscale's own, never the caller's) without the forward hooks :func:`take_hooks` takes."""
    take_hooks(model)
    return model
