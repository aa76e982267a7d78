"""Compound scaling end to end: phi, resolution, EfficientNet B1-B4, the paper's MACs (issue: compound)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from conftest import assert_same_architecture, resnet_by_hand
from torch import nn
from torchvision.models import efficientnet_b0, get_model, mobilenet_v2, resnet50
from torchvision.models.resnet import Bottleneck

import compscale
from compscale.planning.rounding import make_divisible

MOBILENET_V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                        [6, 320, 1, 1]]


@pytest.mark.parametrize(("phi", "size"), [pytest.param(1, 256, marks=pytest.mark.slow), (2, 296)])
def test_resnet50_phi_is_the_hand_built_compound_resnet(phi: int, size: int) -> None:
    d, w = 1.2**phi, 1.1**phi
    scaled = compscale.scale(resnet50(), phi=phi)
    assert scaled.scaling.input_size == (size, size)
    layers = [math.ceil(n * d) for n in (3, 4, 6, 3)]
    planes = [make_divisible(p * w) for p in (64, 128, 256, 512)]
    reference = resnet_by_hand(Bottleneck, layers, make_divisible(64 * w), planes)
    assert_same_architecture(scaled, reference, input_size=size)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, size, size)).shape == (1, 1000)


@pytest.mark.parametrize(("phi", "size"), [pytest.param(1, 256, marks=pytest.mark.slow), (2, 296)])
def test_mobilenet_v2_phi_is_the_hand_built_compound_mobilenet(phi: int, size: int) -> None:
    d, w = 1.2**phi, 1.1**phi
    scaled = compscale.scale(mobilenet_v2(), phi=phi)
    setting = [[t, c, math.ceil(n * d), s] for t, c, n, s in MOBILENET_V2_SETTING]
    assert_same_architecture(scaled, mobilenet_v2(width_mult=w, inverted_residual_setting=setting), input_size=size)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, size, size)).shape == (1, 1000)


EFFICIENTNETS = [  # (name, width, depth, resolution, paper GMACs)
    pytest.param("efficientnet_b1", 1.0, 1.1, 240, 0.70, marks=pytest.mark.slow),  # test_depth: b0 -> b1 too
    pytest.param("efficientnet_b2", 1.1, 1.2, 260, 1.0, marks=pytest.mark.slow),  # test_width: b0 -> b2 too
    pytest.param("efficientnet_b3", 1.2, 1.4, 300, 1.8, marks=pytest.mark.slow),
    pytest.param("efficientnet_b4", 1.4, 1.8, 380, 4.2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "w", "d", "res", "paper_gmacs"), EFFICIENTNETS)
def test_efficientnet_b0_scaled_to_each_variant(name: str, w: float, d: float, res: int, paper_gmacs: float) -> None:
    scaled = compscale.scale(efficientnet_b0(), width=w, depth=d, resolution=res / 224)
    assert_same_architecture(scaled, get_model(name), input_size=res)
    assert scaled.scaling.input_size == (8 * round(res / 8),) * 2  # the default rounds to a multiple of 8
    macs = compscale.profile(scaled, res).macs
    assert macs / 1e9 == pytest.approx(paper_gmacs, rel=0.06)


@pytest.mark.parametrize(("kwargs", "gmacs", "size"), [
    ({"depth": 4}, 1.22, 224),
    ({"width": 2}, 1.14, 224),
    ({"resolution": 2}, 1.20, 448),
])
def test_mobilenet_v2_single_dimension_costs(kwargs: dict[str, float], gmacs: float, size: int) -> None:
    scaled = compscale.scale(mobilenet_v2(), **kwargs)
    assert scaled.scaling.input_size == (size, size)
    assert compscale.profile(scaled, size).macs / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_explicit_multipliers_override_phi_per_dimension() -> None:
    plan = compscale.scale(resnet50(), phi=2, depth=1.0).scaling
    assert (plan.depth, plan.width, plan.resolution) == (1.0, pytest.approx(1.21), pytest.approx(1.3225))
    assert all(s.blocks_before == s.blocks_after for s in plan.stages)


def test_custom_alpha_beta_gamma_and_resolution_divisor() -> None:
    plan = compscale.plan(resnet50(), phi=1, alpha=1.0, beta=1.0, gamma=1.3)
    assert plan.input_size == (288, 288)  # 224 * 1.3 = 291.2 -> nearest multiple of 8
    scaled = compscale.scale(resnet50(), resolution=1.3, resolution_divisor=32)
    assert scaled.scaling.input_size == (288, 288)


def test_plan_prints_a_readable_table() -> None:
    text = str(compscale.scale(resnet50(), phi=1).scaling)
    assert "phi=1: depth x1.2, width x1.1, resolution x1.15" in text
    assert "input size 224x224 -> 256x256" in text
    assert "layer3  6 -> 8" in text
    assert re.search(r"256 -> 288 +expansion", text)  # block outputs: 4 x the rounded planes (72), not md(281.6)


def test_transforms_produce_the_new_input_size() -> None:
    plan = compscale.scale(resnet50(), resolution=1.15).scaling
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8)
    assert plan.eval_transform()(image).shape == (3, 256, 256)
    out = plan.train_transform()(image)
    assert out.shape == (3, 256, 256) and out.dtype == torch.float32


class _FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def test_fixed_linear_head_is_adapted_to_the_new_size_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"fc takes 16384 features at input \(64, 64\) instead of 4096"):
        scaled = compscale.scale(_FlattenHead(), resolution=2, input_size=32)
    assert scaled.fc.in_features == 16 * 32 * 32
    assert scaled(torch.randn(2, 3, 64, 64)).shape == (2, 10)


class _FixedUpsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + nn.functional.interpolate(self.down(x), size=(32, 32))


def test_a_constant_size_that_cannot_follow_resolution_is_an_error() -> None:
    with pytest.raises(compscale.ResolutionError, match=r"cannot run at input \(48, 48\)(.|\n)*add(.|\n)*Hint: "):
        compscale.scale(_FixedUpsample(), resolution=1.5, input_size=32)


def test_global_pooling_models_change_no_weight_for_resolution() -> None:
    base = resnet50()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = compscale.scale(base, resolution=1.5)
    for name, value in base.state_dict().items():
        assert torch.equal(scaled.state_dict()[name], value)
