"""``compscale.plan``: what ``scale`` would build and what it would cost, without building weights.

A :class:`Planner` analyses the model once on the meta device (a copy whose parameters hold no
memory) and then answers for any multipliers in milliseconds, so that a table over phi = 0..8 is cheap.

Example:
    >>> from torchvision.models import resnet50
    >>> p = plan(resnet50(), phi=2)
    >>> p.input_size, round(p.macs / p.base_macs, 2)
    ((296, 296), 3.99)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from compscale.analyse.channels import analyse_channels
from compscale.analyse.stages import StageTable, find_stages
from compscale.errors import NoStageError
from compscale.planning.cost import CostModel
from compscale.planning.plan import (
    GroupPlan,
    Multipliers,
    ScalingPlan,
    StagePlan,
    plan_input_size,
    resolve_multipliers,
)
from compscale.planning.policy import RoundFn, default_independent, derive, resolve_widths
from compscale.planning.rounding import make_divisible, repeats
from compscale.trace import trace

__all__ = ["Planner", "meta_copy", "no_stage_error", "plan"]


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device (no memory, no copy)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class Planner:
    """The analysis of one model, reused for every plan asked of it."""

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int | Sequence[int] = 224,
        resolution_divisor: int = 8,
        round_width: RoundFn = make_divisible,
        stages: Sequence[str] | None = None,
        leaf_modules: Iterable[type[nn.Module]] = (),
        autowrap_functions: Iterable[Callable[..., Any]] = (),
    ) -> None:
        from compscale.rewrite.depth import deepen  # the probe is built by the depth pass itself

        self.model_name = type(model).__name__
        self.base_size = (input_size, input_size) if isinstance(input_size, int) else (int(input_size[0]),
                                                                                         int(input_size[1]))
        self.resolution_divisor = resolution_divisor
        self.round_width = round_width
        probe = meta_copy(model)
        traced = trace(probe, input_size=self.base_size, leaf_modules=leaf_modules,
                       autowrap_functions=autowrap_functions)
        self.table: StageTable = find_stages(traced, stages)
        added = deepen(probe, traced, self.table, {s.index: len(s.blocks) + 1 for s in self.table}, None)
        self.traced = traced.retrace(probe, traced.input_shape)
        self.cg = analyse_channels(self.traced)
        self.derivations = derive(self.cg, [b.path for s in find_stages(self.traced, stages) for b in s.blocks])
        self.cost = CostModel(self.traced, self.cg, {s: paths[0] for s, paths in added.items()})
        base_widths = {g.id: g.base for g in self.cg.groups}
        self.base_macs, self.base_params = self.cost.cost(base_widths, {}, self.base_size)

    def plan(self, phi: float | None = None, *, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
             depth: float | None = None, width: float | None = None,
             resolution: float | None = None) -> ScalingPlan:
        """The plan (and its estimated MACs and params) for these multipliers; see :func:`compscale.scale`."""
        return self.plan_for(resolve_multipliers(phi, alpha, beta, gamma, depth, width, resolution))

    def plan_for(self, mult: Multipliers) -> ScalingPlan:
        if mult.depth != 1.0 and not len(self.table):
            raise no_stage_error(self.model_name)
        counts = {s.index: repeats(len(s.blocks), mult.depth) for s in self.table}
        if mult.width == 1.0:
            widths = {g.id: g.base for g in self.cg.groups}
        else:
            independent = default_independent(mult.width, self.round_width)
            widths = resolve_widths(self.cg, independent, derivations=self.derivations)
        size = plan_input_size(self.base_size, mult.resolution, self.resolution_divisor)
        extra = {s.index: counts[s.index] - len(s.blocks) for s in self.table}
        macs, params = self.cost.cost(widths, extra, size)
        return ScalingPlan(
            mult, self.base_size, size,
            stages=[StagePlan(s.name, len(s.blocks), counts[s.index], s.in_channels, s.out_channels, s.stride)
                    for s in self.table],
            groups=[GroupPlan(g.id, g.base, widths[g.id], self.derivations[g.id].rule,
                              tuple(p for p, _ in g.members)) for g in self.cg.groups],
            macs=macs, params=params, base_macs=self.base_macs, base_params=self.base_params,
        )


def no_stage_error(name: str) -> NoStageError:
    """The error for a depth multiplier on a model without stages (shared with ``scale``)."""
    return NoStageError(
        f"{name} has no stage to deepen: no block of its graph adds its own input back "
        "(a residual block with stride 1 and in == out channels)",
        "name the blocks to repeat with `stages=['path.to.container']`, or scale width/resolution only.",
    )


def plan(model: nn.Module, phi: float | None = None, *, alpha: float = 1.2, beta: float = 1.1, gamma: float = 1.15,
         depth: float | None = None, width: float | None = None, resolution: float | None = None,
         **options: Any) -> ScalingPlan:
    """What ``compscale.scale`` would build, with its MACs and params, allocating no weight.

    ``options`` are :class:`Planner`'s (``input_size``, ``round_width``, ``stages``, ``leaf_modules``...).
    """
    return Planner(model, **options).plan(phi, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width,
                                          resolution=resolution)
