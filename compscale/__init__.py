"""compscale: EfficientNet's compound scaling for any ResNet or MobileNet, as a torch.fx graph rewriter.

>>> import compscale
>>> from torchvision.models import resnet50
>>> bigger = compscale.scale(resnet50(), phi=2)
>>> bigger.scaling.input_size
(296, 296)
>>> compscale.plan(resnet50(), phi=2).macs  # the same network's cost, without building it
16334706880
"""

from compscale.analyse.rules import register_channel_rule
from compscale.api import scale
from compscale.errors import (
    CompscaleError,
    NoStageError,
    ResolutionError,
    RewriteError,
    TraceError,
    UnsupportedOpError,
    WidthError,
)
from compscale.planning.plan import ScalingPlan
from compscale.planning.planner import Planner, plan
from compscale.registry import register_drop_path
from compscale.search import SearchResult, search
from compscale.verify.profile import Profile, profile

__version__ = "0.1.0"

__all__ = [
    "CompscaleError",
    "NoStageError",
    "Planner",
    "Profile",
    "ResolutionError",
    "RewriteError",
    "ScalingPlan",
    "SearchResult",
    "TraceError",
    "UnsupportedOpError",
    "WidthError",
    "plan",
    "profile",
    "register_channel_rule",
    "register_drop_path",
    "scale",
    "search",
]
