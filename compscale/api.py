"""``compscale.scale``: the arguments checked, the multipliers chosen (from phi, a strategy or a target), then the
pipeline (:func:`compscale.pipeline.build`): trace -> analyse -> plan -> rewrite (depth, width) -> verify."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compscale.analyse.rules import ChannelRules
from compscale.analyse.stages import StageFilter
from compscale.arguments import check_forward_takes, check_number, check_seed, check_unwrapped
from compscale.detection import neck_arguments, scale_detector, with_neck
from compscale.errors import CompscaleError, TooLargeError, TraceError
from compscale.pipeline import build
from compscale.planner import Planner, target_planner
from compscale.planning.budget import params_limit, rough_params
from compscale.planning.options import ScaleOptions
from compscale.planning.plan import Multipliers, plan_input_size, resolve_multipliers
from compscale.planning.policy import RoundFn
from compscale.planning.rounding import make_divisible
from compscale.planning.search import pick_target, strategy_of
from compscale.planning.strategy import StrategyLike
from compscale.rewrite.preserve import Growth
from compscale.trace.tracer import check_module

__all__ = ["scale"]


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
    strategy: StrategyLike = "compound",
    target_macs: float | None = None,
    target_acts: float | None = None,
    target_latency: float | None = None,
    vary: str = "phi",
    max_params: int | None = None,
    rules: Mapping[Any, Callable[..., Any]] | ChannelRules | None = None,
    init: str = "fresh",
    noise: float = 0.0,
    seed: int | None = None,
    strict: bool = False,
    neck_width: float | None = None,
    head_depth: int | None = None,
) -> nn.Module:
    """Return ``model`` scaled in depth, width and resolution, as a hand-built variant would be.

    ``d = alpha**phi``, ``w = beta**phi``, ``r = gamma**phi`` (or another ``strategy``'s rule);
    ``depth``/``width``/``resolution`` override the phi-derived multiplier of their dimension (``scale(m, depth=2)``
    deepens only). The caller's model is not
    modified; the result is a new module on the same device and dtype, carrying its plan as
    ``result.scaling`` (``result.scaling.input_size`` is the ``(H, W)`` to run it at).

    Args:
        model: the network to scale.
        phi: compound coefficient.
        alpha, beta, gamma: per-dimension bases of the compound rule.
        strategy: how phi becomes the multipliers (:mod:`compscale.planning.strategy`): ``"compound"``
            (alpha, beta, gamma), ``"fast"`` (Dollar et al.'s width-dominant dWr: of a MACs factor ``s = 2**phi``,
            ``d = s**0.1``, ``w = s**0.4``, ``r = s**0.05``; ``compscale.planning.strategy.fast(alpha)`` for another
            share), ``"depth"``/``"width"``/``"resolution"`` (one dimension), a pycls type string (``"d1_w8_r1"``)
            or a :class:`~compscale.planning.strategy.Strategy`.
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
        target_macs: scale to about this many MACs instead of a given ``phi``: phi is searched along ``strategy``
            on the plan (:meth:`compscale.Planner.solve`; no weights are built while searching); explicit
            multipliers stay as given.
        target_acts: likewise, to about this many activations (conv output elements for one input).
        target_latency: likewise, to about this many seconds per call (batch 1) on the model's device: planned on
            activations, then confirmed by building and timing a few candidates
            (:func:`compscale.latency_search.solve_latency`); the result's ``scaling.latency`` is the measured figure.
        vary: ``"depth"``, ``"width"`` or ``"resolution"`` is ``strategy=`` that dimension (the older spelling).
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
        neck_width, head_depth: a detector's (:mod:`compscale.detection`) neck and heads width multiplier (by
            default EfficientDet's ``1.35**phi``) and the layers added to each head tower (``floor(phi / 3)``;
            negative removes, one kept). A model whose forward takes a list of images is scaled whole: its network
            part (backbone, feature pyramid, heads) by these rules, its transform's sizes by the resolution.
        strict: raise :class:`~compscale.GuessError` instead of warning (:class:`~compscale.GuessWarning`) when a
            stage would be deepened on a weaker signal than a repeat of the model's own (the stage table,
            ``compscale.analyse.stages.find_stages``, marks such stages ``guessed``).

    Raises:
        TypeError, ValueError: a bad argument, named with the form it takes (every one is checked before the model
            is traced: :mod:`compscale.arguments`), or a ``model`` that is not an ``nn.Module``.
        TooLargeError: the plan has more than ``max_params`` parameters.
        CompscaleError: the model cannot be scaled (its subclasses say why and give a hint); a wrapped model
            (``torch.compile``, scripted, DataParallel) is refused with the hint to pass the module it wraps.

    Example:
        >>> from torchvision.models import resnet50
        >>> deeper = scale(resnet50(), depth=2)
        >>> [len(s) for s in (deeper.layer1, deeper.layer2, deeper.layer3, deeper.layer4)]
        [6, 8, 12, 6]
    """
    check_unwrapped(model, "scale")
    check_module(model, "scale")
    seed = check_seed(seed)
    growth = _growth(init, noise, seed)
    if growth is not None and any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("init='preserve' grows the model's weights, and this model's are on the meta device "
                         "(shapes only): give it its weights, or use init='fresh'")
    options = ScaleOptions.make(input_size=input_size, example_inputs=example_inputs,
                                resolution_divisor=resolution_divisor, round_width=round_width, stages=stages,
                                fixed=fixed, leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                                rules=rules, strict=strict)
    check_forward_takes(model, 1 + len(options.extra_inputs))
    planner: Planner | None = None
    target = pick_target(target_macs, target_acts, target_latency)
    if target is not None:
        if options.extra_inputs:
            raise ValueError(f"target_{target[0]} plans on one input; with several example_inputs, give the "
                             "multipliers")
        if phi is not None:
            raise ValueError(f"target_{target[0]} searches phi (along strategy=): give no phi with it")
        planner = target_planner(model, options, target[0])
        solved = planner.solve(target[1], target[0], strategy=strategy, vary=vary, alpha=alpha, beta=beta,
                               gamma=gamma, depth=depth, width=width, resolution=resolution, max_params=max_params)
        mult = solved.multipliers
    else:
        mult = resolve_multipliers(phi, alpha, beta, gamma, depth, width, resolution, strategy_of(vary, strategy),
                                   rank=len(options.input_size))
        plan_input_size(options.input_size, mult.resolution, options.resolution_divisor)  # refuses one too large
    neck = neck_arguments(neck_width, head_depth)
    _check_size(model, mult, max_params, planner, options)
    try:
        result = build(model, mult, options, growth, seed, planner.base if planner is not None else None)
        if neck != (None, None):
            raise ValueError(f"neck_width= and head_depth= scale a detector's feature network and heads (a model whose "
                             f"forward takes a list of images); {type(model).__name__} is scaled as one network: "
                             "leave them out")
    except TraceError as e:  # a detector: its forward takes a list of images
        if target is not None:
            raise
        result = scale_detector(model, with_neck(mult, depth is not None, width is not None, *neck), options,
                                growth, seed, input_size is not None or example_inputs is not None, e)
    if target is not None and target[0] == "latency":
        result.scaling.latency = solved.latency  # type: ignore[union-attr]
        result.scaling.latency_iqr = solved.latency_iqr  # type: ignore[union-attr]
    return result


def _growth(init: str, noise: float, seed: int | None) -> Growth | None:
    """The ``init="preserve"`` state, or ``None`` for ``init="fresh"``; bad arguments raise (``seed`` is checked)."""
    if not isinstance(init, str):
        raise TypeError(f"init must be 'fresh' or 'preserve', not {type(init).__name__}")
    if init not in ("fresh", "preserve"):
        raise ValueError(f"init must be 'fresh' or 'preserve', not {init!r}")
    noise = check_number(noise, "noise", positive=False, form="a number")
    if noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, not {noise}")
    if noise and init != "preserve":
        raise ValueError("noise= breaks the symmetry of copied channels: it goes with init='preserve'")
    return Growth(float(noise), 0 if seed is None else seed) if init == "preserve" else None


def _check_size(model: nn.Module, mult: Multipliers, max_params: int | None, planner: Planner | None,
                options: ScaleOptions) -> None:
    """Raise ``TooLargeError`` before allocating a network with more than ``max_params`` parameters."""
    limit = params_limit(model, max_params)
    if limit is None:
        return
    first = next(model.parameters(), None)
    base = sum(p.numel() for p in model.parameters())
    rough = rough_params(base, mult.depth, mult.width)
    if rough * 1.5 <= limit:  # rounding (ceil of blocks, widths to 8) stays well within 1.5x of the rough figure
        return
    try:
        planned: float = (planner or Planner(model, options)).plan_for(mult).params or rough
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


