"""Another library's networks: timm's, whose classes compscale has never seen, scale into timm's own bigger ones.

timm builds EfficientNet-B1/B2 and MobileNetV2-140 from B0's and MobileNetV2-100's block definitions with
depth and channel multipliers, so they are the hand-built references here, compared layer for layer.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_architecture

import compscale

timm = pytest.importorskip("timm", reason="timm is in the test extra: pip install -e '.[test]'")


def test_timm_efficientnet_b0_with_b1_depth_is_timm_efficientnet_b1() -> None:
    scaled = compscale.scale(timm.create_model("efficientnet_b0"), depth=1.1)
    # blocks.0 holds one depthwise-separable block that never repeats: a stage by its place among the others
    assert [s.blocks_after for s in scaled.scaling.stages] == [2, 3, 3, 4, 4, 5, 2]
    assert_same_architecture(scaled, timm.create_model("efficientnet_b1"))


def test_timm_efficientnet_b0_with_b2_multipliers_is_timm_efficientnet_b2() -> None:
    scaled = compscale.scale(timm.create_model("efficientnet_b0"), width=1.1, depth=1.2)
    assert_same_architecture(scaled, timm.create_model("efficientnet_b2"))


def test_timm_mobilenetv2_100_width_1_4_is_timm_mobilenetv2_140() -> None:
    scaled = compscale.scale(timm.create_model("mobilenetv2_100"), width=1.4)
    assert_same_architecture(scaled, timm.create_model("mobilenetv2_140"))


def test_timm_resnet50_depth_2_is_timm_resnet_6_8_12_6() -> None:
    from timm.models.resnet import Bottleneck, ResNet

    scaled = compscale.scale(timm.create_model("resnet50"), depth=2)
    assert_same_architecture(scaled, ResNet(Bottleneck, [6, 8, 12, 6]))


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "resnet50d", "seresnext26d_32x4d", "ecaresnet26t", "res2net50_14w_8s", "regnety_002", "mobilenetv3_large_100",
    "tf_efficientnet_b0", "convnext_atto", "efficientnetv2_rw_t",
])
def test_timm_phi_1_runs_at_its_new_size_and_costs_the_compound_ratio(name: str) -> None:
    model = timm.create_model(name).eval()
    scaled = compscale.scale(model, phi=1)
    size = scaled.scaling.input_size
    ratio = compscale.profile(scaled, size).macs / compscale.profile(model, 224).macs
    assert 0.8 * 1.92 <= ratio <= 1.5 * 1.92, ratio
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, *size)).shape == (1, 1000)
