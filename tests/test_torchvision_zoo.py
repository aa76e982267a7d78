"""Every torchvision model of the depth and width issues deepens and widens, runs, and costs what it should."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm

import compscale

MODELS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "regnet_y_400mf",
]

# MACs(scaled) / MACs(base) at 224, recorded so that a regression shows. Width 1.5 is about 1.5**2 = 2.25
# (regnet_y_400mf more: its grouped convs keep their group count, so widths round to lcm(8, groups)).
WIDTH_1_5_MACS_RATIO = {
    "resnet18": 2.201, "resnet34": 2.226, "resnet50": 2.228, "resnet101": 2.238, "resnet152": 2.242,
    "resnext50_32x4d": 2.229, "wide_resnet50_2": 2.242, "mobilenet_v2": 2.237, "mobilenet_v3_small": 2.148,
    "mobilenet_v3_large": 2.246, "efficientnet_b0": 2.237, "mnasnet1_0": 2.234, "regnet_y_400mf": 2.702,
}


# The default run covers one net of each kind (basic/grouped ResNet, MobileNetV3, EfficientNet, RegNet);
# the deeper and wider relatives, which only take longer, run with `pytest -m slow`.
FAST = {"resnet18", "resnext50_32x4d", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"}
CASES = [name if name in FAST else pytest.param(name, marks=pytest.mark.slow) for name in MODELS]


@pytest.fixture(scope="module")
def x224() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224)


@pytest.mark.parametrize("name", CASES)
def test_deepens_by_1_5_and_runs(name: str, x224: torch.Tensor) -> None:
    base = tvm.get_model(name)
    scaled = compscale.scale(base, depth=1.5)
    for stage in scaled.scaling.stages:
        assert stage.blocks_after == -(-stage.blocks_before * 3 // 2)  # ceil(n * 1.5)
    with torch.no_grad():
        assert scaled.eval()(x224).shape == (1, 1000)
    assert compscale.profile(scaled).macs > compscale.profile(base).macs


@pytest.mark.parametrize("name", CASES)
def test_widens_by_1_5_and_runs(name: str, x224: torch.Tensor) -> None:
    base = tvm.get_model(name)
    scaled = compscale.scale(base, width=1.5)
    with torch.no_grad():
        assert scaled.eval()(x224).shape == (1, 1000)
    ratio = compscale.profile(scaled).macs / compscale.profile(base).macs
    assert ratio == pytest.approx(WIDTH_1_5_MACS_RATIO[name], abs=0.002)
