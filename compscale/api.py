"""``compscale.scale``: trace -> analyse -> plan -> rewrite (depth, width) -> verify."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compscale.analyse.channels import ChannelGraph, analyse_channels
from compscale.analyse.rules import ChannelRules, as_rules, channel_rules
from compscale.analyse.stages import StageFilter, StageTable, find_stages
from compscale.errors import CompscaleError, RewriteError, TooLargeError, TraceError, WidthError
from compscale.planning.budget import available_params, rough_params
from compscale.planning.depth import dense_costs, stage_counts, transition_ratios
from compscale.planning.plan import (
    GroupPlan,
    Multipliers,
    ScalingPlan,
    StagePlan,
    as_size,
    plan_input_size,
    resolve_multipliers,
)
from compscale.planning.planner import Planner, derive_widths, no_stage_error
from compscale.planning.policy import RoundFn, default_independent, resolve_widths
from compscale.planning.rounding import make_divisible
from compscale.rewrite.depth import deepen
from compscale.rewrite.init import InitRules
from compscale.rewrite.padding import follow_same_padding
from compscale.rewrite.preserve import Growth, cancel_new_channels
from compscale.rewrite.resolution import adapt_inputs
from compscale.rewrite.width import apply_widths
from compscale.trace import trace
from compscale.trace.tracer import Traced, check_module
from compscale.verify.function import output_error

__all__ = ["scale"]

log = logging.getLogger("compscale")


def scale(
    model: nn.Module,
    phi: float | None = None,
    *,
    alpha: float = 1.2,
    beta: float = 1.1,
    gamma: float = 1.15,
    depth: float | None = None,
    width: float | None = None,
    resolution: float | None = None,
    input_size: int | Sequence[int] | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    resolution_divisor: int = 8,
    round_width: RoundFn = make_divisible,
    stages: StageFilter | None = None,
    fixed: Sequence[str] = (),
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    target_macs: float | None = None,
    vary: str = "phi",
    max_params: int | None = None,
    rules: Mapping[Any, Callable[..., Any]] | ChannelRules | None = None,
    init: str = "fresh",
    noise: float = 0.0,
    seed: int | None = None,
) -> nn.Module:
    """Return ``model`` scaled in depth, width and resolution, as a hand-built variant would be.

    ``d = alpha**phi``, ``w = beta**phi``, ``r = gamma**phi``; ``depth``/``width``/``resolution`` override the
    phi-derived multiplier of their dimension (``scale(m, depth=2)`` deepens only). The caller's model is not
    modified; the result is a new module on the same device and dtype, carrying its plan as
    ``result.scaling`` (``result.scaling.input_size`` is the ``(H, W)`` to run it at).

    Args:
        model: the network to scale.
        phi: compound coefficient.
        alpha, beta, gamma: per-dimension bases of the compound rule.
        depth, width, resolution: explicit multipliers.
        input_size: the base model's input size: ``(H, W)`` or one int (224 by default); for inputs of another
            rank every dim after the channels (``(16000,)`` for audio, ``(16, 112, 112)`` for video).
        example_inputs: the inputs of one call, as ``torch.export`` takes them (``(torch.randn(1, 1, 16000),)``):
            the input shape, its channels and its rank come from the first tensor; resolution scales every dim
            after its channel dim. Further tensors (a mask, a conditioning vector) are passed as they are.
        resolution_divisor: the new input size is a multiple of it.
        round_width: ``round_width(channels, divisor) -> int`` for independent channel groups.
        stages: restrict depth scaling to blocks under these module paths, or to blocks whose path a
            predicate accepts.
        fixed: layers (module paths) whose output width must not change; widths derived from them follow.
        leaf_modules, autowrap_functions: passed to the torch.fx tracer.
        target_macs: scale to about this many MACs instead of a given ``phi``: ``vary`` (``"phi"``, or one of
            ``"depth"``, ``"width"``, ``"resolution"`` with the other multipliers as given, 1 by default) is
            searched on the plan (:meth:`compscale.Planner.solve`; no weights are built while searching).
        max_params: refuse, before allocating anything, a plan with more parameters than this; by default what
            fits in half the free memory of the model's device.
        rules: channel rules for this call only (``{MyGate: compscale.analyse.rules.elementwise}``), on top of
            those in force (see :func:`compscale.channel_rules`).
        init: ``"fresh"``: resized layers and new blocks are drawn anew as the model's constructor draws them
            (a network to train from scratch). ``"preserve"``: grow the given (trained) model so that, in eval mode
            at its base input size, it computes the same function: Net2Net widening (new channels copy channels of
            their group, their readers divide by the copies), new residual blocks whose branch starts at zero, new
            plain units as identity convs, new dense layers cancelled in their readers. What cannot be grown
            exactly is named in one warning and in ``result.scaling.inexact``; ``result.scaling.init_error`` is the
            measured output difference (relative to the output's largest value).
        noise: with ``init="preserve"``, the std of noise added to the incoming weights of copied channels,
            relative to each layer's weight std (Net2Net's symmetry breaking; 0 keeps the function exact).
        seed: seeds every random draw of this call (which channels the new ones copy, the noise, the weights of
            new layers), without touching torch's global generator; by default ``init="preserve"`` uses 0 (the same
            model grows the same way every time) and ``init="fresh"`` draws from the global generator.

    Raises:
        TypeError, ValueError: a bad multiplier, or a ``model`` that is not an ``nn.Module``.
        TooLargeError: the plan has more than ``max_params`` parameters.
        CompscaleError: the model cannot be scaled (its subclasses say why and give a hint).

    Example:
        >>> from torchvision.models import resnet50
        >>> deeper = scale(resnet50(), depth=2)
        >>> [len(s) for s in (deeper.layer1, deeper.layer2, deeper.layer3, deeper.layer4)]
        [6, 8, 12, 6]
    """
    check_module(model, "scale")
    growth = _growth(init, noise, seed)
    if growth is not None and any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("init='preserve' grows the model's weights, and this model's are on the meta device "
                         "(shapes only): give it its weights, or use init='fresh'")
    input_shape, input_size, extra_inputs = resolve_inputs(example_inputs, input_size)
    with channel_rules(rules), contextlib.ExitStack() as rng:  # rng: seeded draws, restored even on error
        planner: Planner | None = None
        if target_macs is not None:
            if extra_inputs:
                raise ValueError("target_macs plans on one input; with several example_inputs, give the multipliers")
            if phi is not None or fixed:
                raise ValueError("target_macs searches phi (or one multiplier): give no phi, and no fixed= with it")
            planner = Planner(model, input_size=input_size, resolution_divisor=resolution_divisor,
                              round_width=round_width, stages=stages, leaf_modules=leaf_modules,
                              autowrap_functions=autowrap_functions)
            solved = planner.solve(target_macs, vary, alpha=alpha, beta=beta, gamma=gamma, depth=depth, width=width,
                                   resolution=resolution)
            phi, depth, width, resolution = solved.multipliers.phi, solved.depth, solved.width, solved.resolution
        mult = resolve_multipliers(phi, alpha, beta, gamma, depth, width, resolution)
        base = as_size(input_size)
        _check_size(model, mult, max_params, planner, dict(
            input_size=input_size, resolution_divisor=resolution_divisor, round_width=round_width, stages=stages,
            leaf_modules=leaf_modules, autowrap_functions=autowrap_functions))
        if seed is not None or growth is not None:
            rng.enter_context(_seeded(model, 0 if seed is None else seed))
        work = copy.deepcopy(model)
        kept = {id(p) for p in work.parameters()}
        if growth is not None:
            growth.kept = kept
        traced = trace(work, input_shape, input_size=base, leaf_modules=leaf_modules,
                       autowrap_functions=autowrap_functions, extra_inputs=extra_inputs)
        plan = ScalingPlan(mult, base, plan_input_size(base, mult.resolution, resolution_divisor))
        plan.options = {"resolution_divisor": resolution_divisor, "fixed": list(fixed),
                        "stages": stages if stages is None or callable(stages) else list(stages),
                        "round_width": round_width, "leaf_modules": tuple(leaf_modules),
                        "autowrap_functions": tuple(autowrap_functions), "rules": as_rules(rules)}
        init_rules = InitRules(model)
        table = find_stages(traced, stages)
        work, plan.stages = _scale_depth(work, traced, table, mult.depth, init_rules, growth)
        if mult.width != 1.0:
            if any(s.blocks_before != s.blocks_after for s in plan.stages):
                traced = traced.retrace(work, traced.input_shape)
            cg = analyse_channels(traced)
            derivations = derive_widths(traced, cg)
            widths = resolve_widths(cg, default_independent(mult.width, round_width), derivations=derivations,
                                    seeds=_fixed_widths(cg, fixed))
            apply_widths(work, cg, widths, init_rules, growth)
            plan.groups = [GroupPlan(g.id, g.base, widths[g.id], derivations[g.id].rule, tuple(p for p, _ in g.members))
                           for g in cg.groups]
        rng.close()
        if growth is not None:
            plan.init, plan.init_error = "preserve", output_error(model, work, traced.input_shape, extra_inputs)
        if plan.input_size != base:
            follow_same_padding(work, traced, (*traced.input_shape[:2], *plan.input_size))
            adapt_inputs(work, traced, (*traced.input_shape[:2], *plan.input_size), init_rules,
                         notes=growth.inexact if growth is not None else None)
        _verify(work, traced, plan)
        _unfreeze_new(work, kept | (growth.grown if growth is not None else set()))
        if growth is not None:
            plan.inexact = dict(growth.inexact)
            _warn_inexact(type(model).__name__, plan, noise)
        work.scaling = plan  # type: ignore[assignment]
        log.info("scaled %s:\n%s", type(model).__name__, plan)
        return work


def resolve_inputs(example_inputs: tuple[torch.Tensor, ...] | None, input_size: int | Sequence[int] | None,
                   ) -> tuple[tuple[int, ...] | None, int | Sequence[int], tuple[torch.Tensor, ...]]:
    """The first input's full shape (when ``example_inputs`` give it), the spatial size to scale from, and the
    other inputs (which keep their shapes)."""
    if example_inputs is None:
        return None, 224 if input_size is None else input_size, ()
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError(f"example_inputs must be a tuple of tensors, as torch.export takes them; got "
                        f"{type(example_inputs).__name__}")
    shape = tuple(example_inputs[0].shape)
    if len(shape) < 3:
        raise TraceError(f"the example input has shape {shape}: compscale needs (N, C, *spatial)",
                         "give an input with a batch, a channel and at least one spatial dim.")
    if input_size is not None and as_size(input_size, len(shape) - 2) != shape[2:]:
        raise ValueError(f"input_size={input_size!r} disagrees with the example input's shape {shape}; give one")
    return (1, *shape[1:]), shape[2:], tuple(example_inputs[1:])


@contextlib.contextmanager
def _seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Draw from torch's generators seeded with ``seed`` (the model's device's too), then restore their states."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _growth(init: str, noise: float, seed: int | None) -> Growth | None:
    """The ``init="preserve"`` state, or ``None`` for ``init="fresh"``; bad arguments raise."""
    if not isinstance(init, str):
        raise TypeError(f"init must be 'fresh' or 'preserve', not {type(init).__name__}")
    if init not in ("fresh", "preserve"):
        raise ValueError(f"init must be 'fresh' or 'preserve', not {init!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)):
        raise TypeError(f"noise must be a number, not {type(noise).__name__}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, not {noise}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if noise and init != "preserve":
        raise ValueError("noise= breaks the symmetry of copied channels: it goes with init='preserve'")
    return Growth(float(noise), 0 if seed is None else seed) if init == "preserve" else None


def _warn_inexact(name: str, plan: ScalingPlan, noise: float) -> None:
    """One warning naming what ``init="preserve"`` could not grow exactly, or a measured difference it cannot
    explain."""
    err = plan.init_error if plan.init_error is not None else 0.0
    if plan.inexact:
        items = [f"{path} ({why})" for path, why in plan.inexact.items()]
        warnings.warn(
            f"compscale: init='preserve' grew {name} exactly except {len(items)} layers or blocks, so its outputs "
            f"differ by {err:.3g} of their largest value: {'; '.join(items[:6])}{'; ...' if len(items) > 6 else ''}; "
            "they are listed in result.scaling.inexact",
            stacklevel=3,
        )
    elif err > 1e-4 and not noise:
        warnings.warn(
            f"compscale: init='preserve' grew {name}, but its outputs differ by {err:.3g} of their largest value and "
            "compscale cannot tell which layer is to blame; please report this with the model",
            stacklevel=3,
        )


def _check_size(model: nn.Module, mult: Multipliers, max_params: int | None, planner: Planner | None,
                options: dict[str, Any]) -> None:
    """Raise ``TooLargeError`` before allocating a network with more than ``max_params`` parameters."""
    first = next(model.parameters(), None)
    if max_params is not None:
        limit: int | None = int(max_params)
    elif first is not None:
        limit = available_params(first.device, first.dtype)
    else:
        limit = None
    if limit is None:
        return
    base = sum(p.numel() for p in model.parameters())
    rough = rough_params(base, mult.depth, mult.width)
    if rough * 1.5 <= limit:  # rounding (ceil of blocks, widths to 8) stays well within 1.5x of the rough figure
        return
    try:
        planned: float = (planner or Planner(model, **options)).plan_for(mult).params or rough
        about = ""
    except CompscaleError:  # the planner cannot cost this model: go by the rough figure
        planned, about = rough, "about "
    if planned > limit:
        size = torch.empty((), dtype=first.dtype).element_size() * planned if first is not None else 0
        raise TooLargeError(
            f"{type(model).__name__} scaled by depth x{mult.depth:.4g}, width x{mult.width:.4g} would have "
            f"{about}{planned / 1e9:.2f} G parameters ({size / 1e9:.1f} GB), more than max_params={limit:,}",
            "scale by a smaller phi or multipliers; pass max_params= if the memory is there (compscale.plan() "
            "gives the size without building anything).",
        )


def _unfreeze_new(work: nn.Module, kept: set[int]) -> None:
    """Re-initialised parameters of frozen layers become trainable, with one warning naming them.

    A frozen layer whose weights compscale drew anew (it changed width, or it is a new block) would otherwise
    stay random forever.
    """
    frozen = [name for name, p in work.named_parameters() if id(p) not in kept and not p.requires_grad]
    if not frozen:
        return
    for p in work.parameters():
        if id(p) not in kept:
            p.requires_grad_(True)
    layers = sorted({name.rpartition(".")[0] for name in frozen})
    warnings.warn(
        f"compscale: {len(layers)} layers of {type(work).__name__} were frozen (requires_grad=False) and are "
        f"re-initialised, so they are now trainable: {', '.join(layers[:5])}{', ...' if len(layers) > 5 else ''}; "
        "freeze them again if that is what you want",
        stacklevel=3,
    )


def _scale_depth(work: nn.Module, traced: Traced, table: StageTable, d: float,
                 rules: InitRules, growth: Growth | None) -> tuple[nn.Module, list[StagePlan]]:
    counts = stage_counts(table, d, dense_costs(traced, table))
    if d != 1.0 and not len(table):
        raise no_stage_error(type(work).__name__, table)
    work, added = deepen(work, traced, table, counts, rules, growth) if d != 1.0 else (work, {})
    if any(s.grows and counts[s.index] != len(s.blocks) for s in table):  # dense blocks feed more channels on
        before = dict(work.named_modules()) if growth is not None else {}
        changed = adapt_inputs(work, traced, traced.input_shape, rules, warn=False,
                               keep_ratio=transition_ratios(traced, table))
        if growth is not None:  # the new dense layers' channels are cancelled where the old layers read them
            new_layers = [p for s in table if s.grows for p in added.get(s.index, ())]
            cancel_new_channels(work, analyse_channels(traced.retrace(work, traced.input_shape)), before, changed,
                                new_layers, growth)
    return work, [StagePlan(s.name, len(s.blocks), counts[s.index], s.in_channels, s.out_channels, s.stride,
                      tuple(added.get(s.index, ()))) for s in table]


def _fixed_widths(cg: ChannelGraph, fixed: Sequence[str]) -> dict[int, int]:
    """Seeds that keep the output group of each layer in ``fixed`` at its width."""
    seeds = {}
    for path in fixed:
        if path not in cg.layers and path not in cg.norms and path not in cg.depthwise:
            raise WidthError(f"fixed={path!r} names no conv, linear or norm layer of the model",
                             "give module paths as in model.named_modules(), e.g. 'layer4.2.conv3'.")
        g = cg.group_of(path)
        seeds[g.id] = g.base
    return seeds


def _verify(work: nn.Module, traced: Traced, plan: ScalingPlan) -> None:
    """Re-trace the result at its new input size and lint the graph; the output keeps its shape."""
    before = [tuple(traced.shape(n)) for n in traced.output_nodes]
    after_traced = traced.retrace(work, (*traced.input_shape[:2], *plan.input_size))
    after_traced.graph.lint()
    after = [tuple(after_traced.shape(n)) for n in after_traced.output_nodes]
    if [s[:2] for s in after] != [s[:2] for s in before]:
        raise RewriteError(
            f"the scaled {type(work).__name__} returns {after} where the model returned {before}",
            "report this with the model; meanwhile scale the dimensions one at a time to find the culprit.",
        )
