"""Width scaling equals the wider network built directly (issue: width)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_architecture, resnet_by_hand
from torch import nn
from torchvision.models import (
    efficientnet_b0,
    efficientnet_b2,
    mobilenet_v2,
    resnet18,
    resnet50,
    resnext50_32x4d,
)
from torchvision.models.resnet import BasicBlock, Bottleneck

import compscale
from compscale.planning.rounding import make_divisible


@pytest.mark.parametrize("w", [1.4, 2.0])
def test_mobilenet_v2_width_is_width_mult(w: float) -> None:
    assert_same_architecture(compscale.scale(mobilenet_v2(), width=w), mobilenet_v2(width_mult=w))


def test_resnet50_width_2_doubles_every_width() -> None:
    scaled = compscale.scale(resnet50(), width=2)
    assert_same_architecture(scaled, resnet_by_hand(Bottleneck, [3, 4, 6, 3], 128, [128, 256, 512, 1024]))
    assert scaled.layer1[0].conv3.out_channels == 512 and scaled.fc.in_features == 4096


def test_resnet50_width_1_3_rounds_planes_and_keeps_the_expansion() -> None:
    planes = [make_divisible(p * 1.3) for p in (64, 128, 256, 512)]
    assert planes == [80, 168, 336, 664]
    scaled = compscale.scale(resnet50(), width=1.3)
    assert_same_architecture(scaled, resnet_by_hand(Bottleneck, [3, 4, 6, 3], make_divisible(64 * 1.3), planes))
    assert scaled.layer1[0].conv3.out_channels == 4 * 80  # not make_divisible(256 * 1.3) = 336


def test_resnet18_width_1_5() -> None:
    planes = [make_divisible(p * 1.5) for p in (64, 128, 256, 512)]
    assert_same_architecture(compscale.scale(resnet18(), width=1.5),
                             resnet_by_hand(BasicBlock, [2, 2, 2, 2], planes[0], planes))


def test_efficientnet_b0_width_1_1_depth_1_2_is_b2() -> None:
    scaled = compscale.scale(efficientnet_b0(), width=1.1, depth=1.2)
    assert_same_architecture(scaled, efficientnet_b2())
    assert sum(p.numel() for p in scaled.parameters()) == 9_109_994


def test_resnext_keeps_its_32_groups() -> None:
    scaled = compscale.scale(resnext50_32x4d(), width=1.3)
    grouped = [m for m in scaled.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 16 and {m.groups for m in grouped} == {32}
    assert all(m.in_channels % 32 == 0 and m.out_channels % 32 == 0 for m in grouped)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_width_plan_records_rules() -> None:
    plan = compscale.scale(mobilenet_v2(), width=1.4).scaling
    rules = {(g.before, g.after): g.rule for g in plan.groups}
    assert rules[(3, 3)] == "fixed" and rules[(1000, 1000)] == "fixed"
    assert rules[(96, 144)] == "expansion"  # 6 x the scaled 16 -> 24 input of features.2
    assert rules[(1280, 1792)] == "independent"  # the head, outside every block: make_divisible(1280 * 1.4)
    assert "width x1.4" in str(plan)


def test_se_squeeze_keeps_its_ratio() -> None:
    scaled = compscale.scale(efficientnet_b0(), width=2)
    se = scaled.features[2][0].block[2]  # MBConv(16 -> 24, t=6): squeeze = block input // 4
    assert (se.fc1.in_channels, se.fc1.out_channels) == (6 * 32, 32 // 4)


def test_changed_layers_are_initialised_like_the_constructor() -> None:
    scaled = compscale.scale(resnet50(), width=2)
    for path in ("conv1", "layer2.1.conv2", "layer4.0.downsample.0"):
        w = scaled.get_submodule(path).weight
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]  # ResNet: kaiming_normal_(mode="fan_out", relu)
        assert w.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    assert torch.all(scaled.layer3[2].bn2.weight == 1)
    fc = scaled.fc  # PyTorch's default Linear init: uniform, bound 1 / sqrt(in_features)
    assert fc.weight.abs().max().item() <= 1 / math.sqrt(fc.in_features)


@pytest.mark.parametrize("bad", [0, -2, math.nan])
def test_bad_width_raises_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match="width must be"):
        compscale.scale(resnet18(), width=bad)


def test_width_of_wrong_type_raises_type_error() -> None:
    with pytest.raises(TypeError, match="width must be a real number"):
        compscale.scale(resnet18(), width="wide")  # type: ignore[arg-type]


def test_a_width_that_empties_a_group_names_it() -> None:
    def floor_to_8(v: float, divisor: int) -> int:  # a user's rounding that can reach zero
        return int(v) // divisor * divisor

    with pytest.raises(compscale.WidthError, match=r"channel group \d+ \(64 channels: conv1.*would have 0(.|\n)*Hint"):
        compscale.scale(resnet18(), width=0.1, round_width=floor_to_8)
