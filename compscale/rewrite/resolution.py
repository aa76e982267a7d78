"""Adapt layers to the channels they are now fed: after a resolution change, or a dense block that grew.

A model ending in global pooling needs nothing. A head that flattens a spatial map into a ``Linear``
with fixed ``in_features`` is found by shape propagation at the new size; the ``Linear`` takes the new
number of features and fresh weights, with a warning. Anything else that cannot take the new size
(fixed-size pooling feeding an add, constant interpolate sizes) fails shape propagation with a
``ResolutionError`` that names the node.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from fractions import Fraction

from torch import nn

from compscale.errors import ResolutionError, TraceError
from compscale.rewrite.init import InitRules, reinit
from compscale.rewrite.modules import channels, resize, set_submodule
from compscale.trace import Traced
from compscale.trace.tracer import propagate_shapes

__all__ = ["adapt_inputs"]


def adapt_inputs(
    root: nn.Module, traced: Traced, input_shape: Sequence[int], rules: InitRules | None, warn: bool = True,
    keep_ratio: Mapping[str, Fraction] | None = None, notes: dict[str, str] | None = None,
) -> list[str]:
    """Resize the layers of ``root`` fed a different number of channels at ``input_shape``.

    A flatten head's ``Linear`` at a new input size (with a warning, ``warn``), and the layers after a dense
    block that grew (its transition, final norm and classifier). A layer keeps its outputs, except a norm (they
    follow its input) and a conv or linear of ``keep_ratio`` (path -> out / in: a DenseNet transition's
    compression), whose new outputs feed the layers after it in turn. Returns the paths of the layers changed.
    Given ``notes`` (``init="preserve"``'s record of what is not exact), a rebuilt head is noted there instead of
    warned about.
    """
    probe = traced.retrace_graph(root, input_shape)
    try:
        mismatched = propagate_shapes(probe, tolerate_inputs=True, keep_ratio=keep_ratio)
    except TraceError as e:
        if not warn:  # adapting to a dense block that grew, at the same input size
            raise
        raise ResolutionError(
            f"{type(root).__name__} cannot run at input {tuple(input_shape[2:])}: {str(e).splitlines()[0]}",
            "the model's shapes depend on its input size: use adaptive pooling (nn.AdaptiveAvgPool2d) and sizes "
            "relative to the input, or keep `resolution=1`.",
        ) from e
    for path, (features, out) in mismatched.items():
        old = root.get_submodule(path)
        before = channels(old)[0]
        new = resize(old, features, out)
        reinit(new, rules, template=old)
        set_submodule(root, path, new)
        if warn and notes is not None:
            notes.setdefault(path, f"takes {features} features at input {tuple(input_shape[2:])} instead of "
                                   f"{before}: fresh weights")
        elif warn:
            warnings.warn(
                f"compscale: {path} takes {features} features at input {tuple(input_shape[2:])} instead of "
                f"{before}; it was rebuilt with fresh weights",
                stacklevel=3,
            )
    return list(mismatched)
