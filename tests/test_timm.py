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


BEYOND_THE_RESIDUAL_BLOCK = [
    pytest.param("lcnet_050", id="lcnet_050"),  # plain: depthwise-separable units, no residual
    *(pytest.param(name, id=name, marks=pytest.mark.slow) for name in (
        "mixnet_s",  # mixed-kernel convs on channel splits, concatenated, under SE
        "skresnet18",  # torch.stack of branches, softmax across them
        "resnest14d",  # split attention over radix groups; one projection block per stage
        "ghostnet_100",  # slices x[:, :c] of concatenations
        "rexnet_100",  # a residual onto the first channels only; widths grow block by block
        "cspresnet50",  # cross-stage partial: half the channels bypass the stage's blocks
        "repvgg_a0",  # plain: stride-1 blocks whose skip is a BatchNorm, beside a 1x1 branch
        "dpn68",  # dual path: a residual and a growing dense part; slices of concatenations
    )),
]


def test_timm_dpn68_stages_open_with_a_projection_and_grow() -> None:
    """DPN's stages are its k_sec = (3, 4, 12, 3): a strided projection block, then blocks that each add channels."""
    from compscale.analyse.stages import find_stages
    from compscale.trace import trace

    table = find_stages(trace(timm.create_model("dpn68"), (1, 3, 224, 224)))
    assert [len(s.blocks) for s in table] == [3, 4, 12, 3]
    assert all(s.grows and s.blocks[0].residual == "projection" for s in table)


@pytest.mark.parametrize("name", BEYOND_THE_RESIDUAL_BLOCK)
def test_timm_beyond_the_residual_block_scales_at_phi_1(name: str) -> None:
    model = timm.create_model(name).eval()
    scaled = compscale.scale(model, phi=1)
    plan = scaled.scaling
    assert type(scaled) is type(model)
    assert not [path for path, m in scaled.named_modules() if isinstance(m, torch.fx.GraphModule)]  # own classes
    assert sum(s.blocks_after for s in plan.stages) > sum(s.blocks_before for s in plan.stages)  # deeper
    assert any(g.after > g.before for g in plan.groups)  # wider
    ratio = compscale.profile(scaled, plan.input_size).macs / compscale.profile(model, 224).macs
    assert 0.8 * 1.92 <= ratio <= 1.5 * 1.92, ratio
    with torch.no_grad():
        assert scaled(torch.randn(1, 3, *plan.input_size)).shape == (1, 1000)
