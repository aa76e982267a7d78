"""How a model is scaled, besides the multipliers: one object shared by ``scale``, ``plan``, ``Planner``, the CLI
and checkpoints.

Example:
    >>> opts = ScaleOptions.make(input_size=160, stages=["layer3"])
    >>> opts.input_size, opts.stages
    ((160, 160), ('layer3',))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compscale.analyse.rules import ChannelRules, as_rules
from compscale.analyse.stages import StageFilter
from compscale.arguments import check_count, check_example_inputs, check_paths
from compscale.errors import CompscaleError, TraceError
from compscale.planning.budget import check_divisor
from compscale.planning.plan import as_size
from compscale.planning.policy import RoundFn
from compscale.planning.rounding import make_divisible

__all__ = ["ScaleOptions"]


@dataclasses.dataclass(frozen=True)
class ScaleOptions:
    """Everything but the multipliers that decides the scaled network (see :func:`compscale.scale` for each).

    ``input_shape`` is the first input's full shape ``(1, C, *spatial)`` when ``example_inputs`` gave it, and
    ``extra_inputs`` the forward's further tensors.
    """

    input_size: tuple[int, ...] = (224, 224)
    input_shape: tuple[int, ...] | None = None
    extra_inputs: tuple[torch.Tensor, ...] = dataclasses.field(default=(), compare=False)
    resolution_divisor: int = 8
    round_width: RoundFn = make_divisible
    stages: StageFilter | None = None
    fixed: tuple[str, ...] = ()
    leaf_modules: tuple[type[nn.Module], ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    rules: ChannelRules | None = None
    strict: bool = False

    @classmethod
    def make(cls, *, input_size: int | Sequence[int] | None = None,
             example_inputs: tuple[torch.Tensor, ...] | None = None, resolution_divisor: int = 8,
             round_width: RoundFn = make_divisible, stages: StageFilter | None = None, fixed: Sequence[str] = (),
             leaf_modules: Iterable[type[nn.Module]] = (), autowrap_functions: Iterable[Callable[..., Any]] = (),
             rules: Mapping[Any, Callable[..., Any]] | ChannelRules | None = None, strict: bool = False,
             ) -> ScaleOptions:
        """The options from :func:`compscale.scale`'s keyword arguments, checked (:mod:`compscale.arguments`)."""
        shape, size, extra = _resolve_inputs(example_inputs, input_size)
        rank = len(shape) - 2 if shape else 2
        resolution_divisor = check_count(resolution_divisor, "resolution_divisor")
        check_divisor(resolution_divisor, as_size(size, rank))
        if not callable(round_width):
            raise TypeError(f"round_width must be a function round_width(channels, divisor) -> int, got "
                            f"{type(round_width).__name__}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be True or False, not {type(strict).__name__}")
        return cls(as_size(size, rank), shape, extra, resolution_divisor, round_width,
                   None if stages is None else check_paths(stages, "stages", predicate=True),
                   check_paths(fixed, "fixed"),  # type: ignore[arg-type]  # no predicate: a tuple of paths
                   _tuple_of(leaf_modules, "leaf_modules", _is_module_type, "nn.Module subclasses"),
                   _tuple_of(autowrap_functions, "autowrap_functions", callable, "functions"), _rules(rules), strict)

    def replace(self, **changes: Any) -> ScaleOptions:
        return dataclasses.replace(self, **changes)

    def stored(self) -> ScaleOptions:
        """These options as a plan keeps them: the example's other inputs as shapes (meta tensors), so that a scaled
        model does not hold the caller's batch."""
        if not self.extra_inputs:
            return self
        return self.replace(extra_inputs=tuple(torch.empty(t.shape, dtype=t.dtype, device="meta")
                                               for t in self.extra_inputs))

    def checkpoint(self, name: str = "the model") -> dict[str, Any]:
        """The options a checkpoint records (plain data), or :class:`CompscaleError` for those it cannot."""
        custom = [name for name in ("round_width", "leaf_modules", "autowrap_functions", "rules")
                  if getattr(self, name) not in (None, (), make_divisible)]
        if self.extra_inputs:
            custom.append("example_inputs")
        if callable(self.stages):
            custom.append("stages")
        if custom:
            raise CompscaleError(
                f"{name} was scaled with {', '.join(custom)}=, which a checkpoint cannot record",
                "save scaled.state_dict() and rebuild with compscale.scale(...) and the same arguments.",
            )
        return {"input_size": list(self.input_size), "resolution_divisor": self.resolution_divisor,
                "fixed": list(self.fixed),
                "stages": None if self.stages is None or callable(self.stages) else list(self.stages)}


def _resolve_inputs(example_inputs: tuple[torch.Tensor, ...] | None, input_size: int | Sequence[int] | None,
                    ) -> tuple[tuple[int, ...] | None, int | Sequence[int], tuple[torch.Tensor, ...]]:
    """The first input's full shape (when ``example_inputs`` give it), the spatial size to scale from, and the
    other inputs (which keep their shapes)."""
    example_inputs = check_example_inputs(example_inputs)
    if example_inputs is None:
        return None, 224 if input_size is None else input_size, ()
    shape = tuple(example_inputs[0].shape)
    if len(shape) < 3:
        raise TraceError(f"the example input has shape {shape}: compscale needs (N, C, *spatial)",
                         "give an input with a batch, a channel and at least one spatial dim.")
    if input_size is not None and as_size(input_size, len(shape) - 2) != shape[2:]:
        raise ValueError(f"input_size={input_size!r} disagrees with the example input's shape {shape}; give one")
    return (1, *shape[1:]), shape[2:], tuple(example_inputs[1:])


def _is_module_type(t: object) -> bool:
    return isinstance(t, type) and issubclass(t, nn.Module)


def _tuple_of(items: object, name: str, ok: Callable[[object], bool], form: str) -> tuple[Any, ...]:
    """``items`` (``leaf_modules``, ``autowrap_functions``) as a tuple, each item ``ok``."""
    found = tuple(items) if isinstance(items, Iterable) and not isinstance(items, str) else None
    if found is None or not all(ok(t) for t in found):
        raise TypeError(f"{name} must be a sequence of {form}, got {items!r:.60}")
    return found


def _rules(rules: object) -> ChannelRules | None:
    """``rules`` as a registry: ``None``, a ``ChannelRules``, or a mapping of targets to rules."""
    if rules is not None and not isinstance(rules, (Mapping, ChannelRules)):
        raise TypeError(f"rules must be a mapping {{module type or function: rule}} or a ChannelRules, got "
                        f"{type(rules).__name__} {rules!r:.60}")
    return as_rules(rules)
