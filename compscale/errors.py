"""The exceptions compscale raises.

Every error names the module path or graph node at fault and ends with a ``Hint:`` line
telling the user what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CompscaleError",
    "GuessError",
    "GuessWarning",
    "NoStageError",
    "NotACNNError",
    "ResolutionError",
    "RewriteError",
    "TooLargeError",
    "TraceError",
    "UnsupportedOpError",
    "WidthError",
]


class CompscaleError(Exception):
    """Base class of every error compscale raises on purpose."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(f"{message}\nHint: {hint}" if hint else message)


class TraceError(CompscaleError):
    """torch.fx could not trace the model."""


class UnsupportedOpError(CompscaleError):
    """A graph node whose effect on channels compscale does not know."""


class NoStageError(CompscaleError):
    """Depth scaling was asked for but the model has no stage to deepen."""


class GuessError(CompscaleError):
    """``strict=True``: a stage would be deepened on a weaker signal than a repeat of the model's own."""


class GuessWarning(UserWarning):
    """compscale decided something on a weaker signal than the model's own evidence (a stage it guessed); the
    warning and the stage table (``Stage.evidence``, ``Stage.guessed``) say which. ``strict=True`` makes it a
    :class:`GuessError`."""


class WidthError(CompscaleError):
    """A width plan that cannot be built (a channel group would be empty, a divisor cannot hold)."""


class RewriteError(CompscaleError):
    """A rewrite produced a graph that does not verify."""


class ResolutionError(CompscaleError):
    """The model cannot run at the new input size (its shapes depend on the input size)."""


class TooLargeError(CompscaleError):
    """The planned network has more parameters than ``max_params`` (by default, what fits in free memory)."""


class NotACNNError(NoStageError):
    """The model is not a convolutional network of stages (a vision transformer: attention and MLPs over tokens)."""
