"""Small registries a user extends for layers compscale does not know (timm's register/get/list style)."""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["drop_path_attr", "drop_path_types", "register_drop_path"]

_DROP_PATH: dict[type[nn.Module], str] = {}


def register_drop_path(module_type: type[nn.Module], rate_attr: str) -> None:
    """Declare ``module_type`` a stochastic-depth ("drop path") layer whose rate lives in ``rate_attr``.

    Drop-path layers are traced as leaves (their eval-mode trace is an identity and would vanish) and
    their rates are re-spread over the new number of blocks when a network deepens.
    """
    _DROP_PATH[module_type] = rate_attr


def drop_path_types() -> tuple[type[nn.Module], ...]:
    _register_optional()
    return tuple(_DROP_PATH)


def drop_path_attr(module: nn.Module) -> str | None:
    """The rate attribute of a drop-path module, or ``None`` if ``module`` is not one."""
    _register_optional()
    for t, attr in _DROP_PATH.items():
        if isinstance(module, t):
            return attr
    return None


def _register_known() -> None:
    from torchvision.ops import StochasticDepth

    register_drop_path(StochasticDepth, "p")


_OPTIONAL_DONE: set[str] = set()


def _register_optional() -> None:
    """Register other libraries' drop-path layers once those libraries are imported (never import them here).

    A model holding timm's ``DropPath`` was built by timm, so timm is in ``sys.modules`` by then.
    """
    if "timm" in sys.modules and "timm" not in _OPTIONAL_DONE:
        _OPTIONAL_DONE.add("timm")
        try:
            from timm.layers import DropPath  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            return
        _DROP_PATH.setdefault(DropPath, "drop_prob")


_register_known()
