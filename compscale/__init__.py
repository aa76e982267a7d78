"""compscale: EfficientNet's compound scaling for any ResNet or MobileNet, as a torch.fx graph rewriter.

>>> import compscale
>>> from torchvision.models import resnet50
>>> bigger = compscale.scale(resnet50(), phi=2)
>>> bigger.scaling.input_size
(296, 296)
>>> compscale.plan(resnet50(), phi=2).macs  # the same network's cost, without building it
16334706880

The public names are imported on first use (PEP 562), so that ``import compscale`` and
``compscale --help`` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from compscale.errors import (
    CompscaleError,
    GuessError,
    GuessWarning,
    NoStageError,
    NotACNNError,
    ResolutionError,
    RewriteError,
    TooLargeError,
    TraceError,
    UnsupportedOpError,
    WidthError,
)

if TYPE_CHECKING:
    from compscale.analyse.rules import ChannelRules, channel_rules, register_channel_rule, unregister_channel_rule
    from compscale.api import scale
    from compscale.grid import SearchResult, search
    from compscale.planner import Planner, plan
    from compscale.planning.options import ScaleOptions
    from compscale.planning.plan import ScalingPlan
    from compscale.planning.strategy import Compound, Shares, Strategy, fast
    from compscale.registry import register_drop_path
    from compscale.rewrite.metadata import MetadataError
    from compscale.transforms import image_processor
    from compscale.verify.latency import Latency, latency
    from compscale.verify.plot import plot_costs
    from compscale.verify.profile import Profile, profile

__version__ = "0.1.0"

# public name -> the module that defines it; imported by __getattr__ on first access
_LAZY = {
    "ChannelRules": "compscale.analyse.rules",
    "channel_rules": "compscale.analyse.rules",
    "register_channel_rule": "compscale.analyse.rules",
    "unregister_channel_rule": "compscale.analyse.rules",
    "scale": "compscale.api",
    "ScalingPlan": "compscale.planning.plan",
    "Planner": "compscale.planner",
    "plan": "compscale.planner",
    "register_drop_path": "compscale.registry",
    "MetadataError": "compscale.rewrite.metadata",
    "image_processor": "compscale.transforms",
    "SearchResult": "compscale.grid",
    "search": "compscale.grid",
    "Profile": "compscale.verify.profile",
    "profile": "compscale.verify.profile",
    "Latency": "compscale.verify.latency",
    "latency": "compscale.verify.latency",
    "plot_costs": "compscale.verify.plot",
    "ScaleOptions": "compscale.planning.options",
    "Strategy": "compscale.planning.strategy",
    "Compound": "compscale.planning.strategy",
    "Shares": "compscale.planning.strategy",
    "fast": "compscale.planning.strategy",
}

__all__ = [
    "ChannelRules",
    "Compound",
    "CompscaleError",
    "GuessError",
    "GuessWarning",
    "Latency",
    "MetadataError",
    "NoStageError",
    "NotACNNError",
    "Planner",
    "Profile",
    "ResolutionError",
    "RewriteError",
    "ScaleOptions",
    "ScalingPlan",
    "SearchResult",
    "Shares",
    "Strategy",
    "TooLargeError",
    "TraceError",
    "UnsupportedOpError",
    "WidthError",
    "channel_rules",
    "fast",
    "image_processor",
    "latency",
    "plan",
    "plot_costs",
    "profile",
    "register_channel_rule",
    "register_drop_path",
    "scale",
    "search",
    "unregister_channel_rule",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compscale' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
