"""Whole detectors: compound scaling of the backbone, feature network, heads and input size in one call.

:func:`compscale.scale` comes here when the model's forward cannot be traced because it takes a list of images
(torchvision's detectors, a user's detector built from their pieces). Its network part
(:func:`compscale.trace.parts.network_part`: backbone -> neck -> heads, found from the recorded calls) is scaled
by the pipeline, with EfficientDet's rules for the part after the trunk (:func:`neck_rule`): the groups of the
neck and heads (:func:`compscale.analyse.levels.pyramid_groups`) widened by ``1.35**phi``, each head tower given
``floor(phi / 3)`` more layers; the trunk by the usual alpha/beta/gamma. The scaled units go back into a copy of
the detector, whose transform resizes to the new size (its ``min_size``/``max_size``/``fixed_size``/``size``).

Example:
    >>> from torchvision.models.detection import retinanet_resnet50_fpn
    >>> import compscale
    >>> big = compscale.scale(retinanet_resnet50_fpn(weights=None, weights_backbone=None), phi=3)
    >>> tower = big.head.classification_head.conv
    >>> big.transform.min_size, tower[0][0].out_channels, len(tower)
    ((1216,), 632, 5)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

from torch import nn

from compscale.arguments import check_count, check_number
from compscale.errors import CompscaleError, GuessWarning, RewriteError, TraceError
from compscale.layers import set_submodule
from compscale.pipeline import build
from compscale.planning.budget import check_multipliers
from compscale.planning.options import ScaleOptions
from compscale.planning.plan import Multipliers, ScalingPlan
from compscale.planning.rounding import make_divisible
from compscale.rewrite.preserve import Growth
from compscale.trace.parts import RESIZE_ATTRS, NotRunnable, network_part, record_calls

__all__ = ["NECK_BASE", "neck_arguments", "plan_detector", "refuse_target", "scale_detector", "with_neck"]

NECK_BASE = 1.35
"""EfficientDet's width base of the feature network and heads: ``W = 64 * 1.35**phi`` (its BiFPN)."""


def neck_arguments(neck_width: object, head_depth: object) -> tuple[float | None, int | None]:
    """``neck_width`` and ``head_depth`` checked: a multiplier as ``width=`` is, at most 64 layers either way."""
    wide = None if neck_width is None else check_number(neck_width, "neck_width")
    if wide is not None:
        check_multipliers({"neck_width": wide})
    layers = None if head_depth is None else check_count(head_depth, "head_depth", least=-64)
    if layers is not None and layers > 64:
        raise ValueError(f"head_depth={layers} adds more layers to a head tower than compscale builds (at most 64)")
    return wide, layers


def with_neck(mult: Multipliers, depth_given: bool, width_given: bool, neck_width: float | None = None,
              head_depth: int | None = None) -> Multipliers:
    """``mult`` with the neck/head width multiplier and the layers added per head tower.

    ``neck_width``/``head_depth`` when given; else EfficientDet's ``1.35**phi`` and ``floor(phi / 3)`` for a compound
    step, and ``floor(phi)`` more repeated neck cells (BiFPN layers: ``D = 3 + phi``); an explicit ``width=``
    (``depth=``) without them scales the neck as the trunk (adds no layer or cell), so that a one-dimension ablation
    changes one dimension.

    >>> m = with_neck(Multipliers(1.728, 1.331, 1.521, phi=3), False, False)
    >>> round(m.neck_width, 4), m.head_layers
    (2.4604, 1)
    """
    phi = mult.phi
    if neck_width is None:
        neck_width = NECK_BASE ** phi if phi is not None and not width_given else mult.width
    if head_depth is None:
        head_depth = math.floor(phi / 3) if phi is not None and not depth_given else 0
    cells = math.floor(phi) if phi is not None and not depth_given else 0  # BiFPN: D = 3 + phi
    return dataclasses.replace(mult, neck_width=neck_width, head_layers=head_depth, neck_layers=cells)


def scale_detector(model: nn.Module, mult: Multipliers, options: ScaleOptions, growth: Growth | None,
                   seed: int | None, size_given: bool, error: TraceError) -> nn.Module:
    """``model`` (whose forward takes a list of images) scaled whole by ``mult``, or ``error`` raised again when it is
    no such model."""
    work = copy.deepcopy(model)
    try:
        part = network_part(work)
    except NotRunnable as e:  # no detector: the tracer's error says why the model cannot be scaled
        raise error from e
    if part.unscaled:
        warnings.warn(f"compscale: {len(part.unscaled)} modules of {type(model).__name__} with parameters ran in no "
                      f"recorded call (eval mode, one image) and keep their widths: {', '.join(part.unscaled[:5])}"
                      f"{', ...' if len(part.unscaled) > 5 else ''}; a training-only branch that reads the scaled "
                      "features would fail", GuessWarning, stacklevel=3)
    if part.input_size is not None and not size_given:
        options = options.replace(input_size=part.input_size)
    scaled = build(part.gm, mult, options, growth, seed)
    for path in part.units:
        set_submodule(work, path, scaled.get_submodule(path))
    plan: ScalingPlan = scaled.scaling  # type: ignore[assignment]
    if part.resizer is not None and plan.input_size != plan.base_input_size:
        _resize(work.get_submodule(part.resizer), plan.input_size[0] / plan.base_input_size[0],
                options.resolution_divisor)
    _check_runs(work)
    work.scaling = plan  # type: ignore[assignment]
    return work


def refuse_target(model: nn.Module, what: str, error: TraceError) -> None:
    """Raise a ``CompscaleError`` saying that ``what`` (a target search) is not built for detectors, when ``model``
    is one (its network part can be found); else return, and the caller raises ``error``."""
    try:
        network_part(model)
    except CompscaleError:
        return
    raise CompscaleError(f"{what}= searches phi on a network compscale traces whole; {type(model).__name__} is a "
                         "detector, scaled by its parts", "give phi= (or depth=/width=/resolution=), and compare "
                         "compscale.profile() of the results to choose one.") from error


def plan_detector(model: nn.Module, mult: Multipliers, options: ScaleOptions, size_given: bool,
                  error: TraceError) -> ScalingPlan:
    """The plan of ``model`` (a detector) scaled by ``mult``, with the MACs, parameters and activations of its network
    part before and after. A detector is planned by building it (its parts are found by running it)."""
    from compscale.verify.profile import profile

    scaled = scale_detector(model, mult, options, None, None, size_given, error)
    plan: ScalingPlan = scaled.scaling  # type: ignore[assignment]
    before, after = profile(model, plan.base_input_size), profile(scaled, plan.input_size)
    return dataclasses.replace(plan, macs=after.macs, params=after.params, acts=after.acts, base_macs=before.macs,
                               base_params=before.params, base_acts=before.acts)


def _resize(transform: nn.Module, ratio: float, divisor: int) -> None:
    """The sizes ``transform`` resizes to (:data:`~compscale.trace.parts.RESIZE_ATTRS`) times ``ratio``, each a
    multiple of ``divisor``."""
    def scaled(v: object) -> object:
        if isinstance(v, int) and not isinstance(v, bool):
            return max(divisor, make_divisible(v * ratio, divisor))
        if isinstance(v, (tuple, list)):
            return type(v)(scaled(x) for x in v)
        return v

    for name in RESIZE_ATTRS:
        if getattr(transform, name, None) is not None:
            setattr(transform, name, scaled(getattr(transform, name)))


def _check_runs(model: nn.Module) -> None:
    """The scaled detector runs on a list of images, as the model did."""
    try:
        record_calls(model)
    except CompscaleError as e:
        raise RewriteError(f"the scaled {type(model).__name__} no longer runs: {str(e).splitlines()[0]}",
                           "report this with the model; meanwhile scale its backbone alone.") from e
