"""Plain networks: stages whose units do not carry their input (VGG, MobileNetV1, RepVGG, LCNet), one-block
stages with a projection (ResNeSt-14d), and cross-stage-partial stages whose blocks another tensor bypasses.

The references are the families' own builders: torchvision's VGG configurations, timm's MobileNetV1 builder
with ``depth_multiplier``/``channel_multiplier``, timm's ResNeSt-26d.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_architecture
from torch import nn
from torchvision.models import vgg11_bn, vgg16_bn, vgg19_bn

import compscale
from compscale.analyse.stages import find_stages
from compscale.trace import trace


def test_vgg11_stages_are_its_conv_runs_between_poolings() -> None:
    table = find_stages(trace(vgg11_bn(), (1, 3, 224, 224)))
    assert [len(s.blocks) for s in table] == [1, 1, 2, 2, 2]
    assert [(s.in_channels, s.out_channels) for s in table] == [(3, 64), (64, 128), (128, 256), (256, 512),
                                                                (512, 512)]
    assert table[2].blocks[0].type_name == "Conv2d-BatchNorm2d-ReLU"
    assert all(s.plain for s in table)


@pytest.mark.parametrize(("depth", "reference"), [(1.5, vgg16_bn),
                                                  pytest.param(2, vgg19_bn, marks=pytest.mark.slow)])
def test_vgg11_deepened_is_the_vgg_papers_own_deeper_net(depth: float, reference: type[nn.Module]) -> None:
    scaled = compscale.scale(vgg11_bn(), depth=depth)
    assert type(scaled).__name__ == "VGG"
    assert_same_architecture(scaled, reference())
    # [1, 1, 2, 2, 2] -> [2, 2, 3, 3, 3] (VGG-16) or [2, 2, 4, 4, 4] (VGG-19)
    assert [s.blocks_after for s in scaled.scaling.stages] == [2, 2, 3 if depth == 1.5 else 4, *[3 if depth == 1.5
                                                                                                  else 4] * 2]


class TinyPlain(nn.Module):
    """A user's plain net: units in containers, no residual, one stage with a single unit."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.stages = nn.Sequential(
            nn.Sequential(Unit(16, 24, 1)),
            nn.Sequential(Unit(24, 32, 2), Unit(32, 32, 1)),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.cin = cin
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def test_a_users_plain_net_deepens_with_units_of_its_own_class() -> None:
    scaled = compscale.scale(TinyPlain(), depth=2)
    first, second = scaled.stages[0], scaled.stages[1]
    assert [len(first), len(second)] == [2, 4]
    assert all(type(u) is Unit for u in [*first, *second])
    # the one-unit stage gains a stride-1 unit reading the stage's width; its constructor argument follows
    assert (first[1].conv.in_channels, first[1].conv.out_channels, first[1].conv.stride) == (24, 24, (1, 1))
    assert first[1].cin == 24
    assert all((u.conv.in_channels, u.conv.stride) == (32, (1, 1)) for u in second[1:])
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_plain_unit_output_rounds_on_its_own() -> None:
    scaled = compscale.scale(TinyPlain(), width=1.2)
    # 24 * 1.2 = 28.8 -> 32 and 32 * 1.2 = 38.4 -> 40, each made divisible by 8 as a stage width
    assert scaled.stages[0][0].conv.out_channels == 32
    assert scaled.stages[1][0].conv.out_channels == 40 and scaled.head.in_features == 40


class ByName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))


def test_layers_called_by_name_outside_any_container_are_no_stage() -> None:
    with pytest.raises(compscale.NoStageError, match="ByName has no stage to deepen"):
        compscale.scale(ByName(), depth=2, input_size=32)


timm = pytest.importorskip("timm", reason="timm is in the test extra: pip install -e '.[test]'")


def test_timm_mobilenetv1_depth_1_4_is_timms_builder_with_depth_multiplier_1_4() -> None:
    from timm.models.efficientnet import _gen_mobilenet_v1

    scaled = compscale.scale(timm.create_model("mobilenetv1_100"), depth=1.4)
    assert [s.blocks_after for s in scaled.scaling.stages] == [2, 3, 3, 9, 3]
    assert_same_architecture(scaled, _gen_mobilenet_v1("mobilenetv1_100", depth_multiplier=1.4))


def test_timm_mobilenetv1_compound_is_the_efficientnet_papers_table_3_net() -> None:
    """The paper scales MobileNetV1 by (d, w, r) = (1.4, 1.2, 1.3) to 2.3 B FLOPs; timm's builder gives the net."""
    from timm.models.efficientnet import _gen_mobilenet_v1

    scaled = compscale.scale(timm.create_model("mobilenetv1_100"), depth=1.4, width=1.2, resolution=1.3)
    assert scaled.scaling.input_size == (288, 288)
    reference = _gen_mobilenet_v1("mobilenetv1_100", depth_multiplier=1.4, channel_multiplier=1.2)
    assert_same_architecture(scaled, reference, input_size=288)
    assert round(compscale.profile(scaled, (288, 288)).macs / 1e9, 2) == 2.24


@pytest.mark.slow
def test_timm_mobilenetv1_width_2_costs_the_papers_2_2_billion() -> None:
    scaled = compscale.scale(timm.create_model("mobilenetv1_100"), width=2)
    assert round(compscale.profile(scaled, (224, 224)).macs / 1e9, 2) == 2.22


def test_timm_resnest14d_depth_1_5_is_resnest26d() -> None:
    # one projection block per stage: the repeat is a ResNestBottleneck without its downsample
    scaled = compscale.scale(timm.create_model("resnest14d"), depth=1.5)
    assert scaled.layer1[1].downsample is None
    assert_same_architecture(scaled, timm.create_model("resnest26d"))


@pytest.mark.slow
def test_timm_cspresnet50_deepens_the_blocks_its_split_bypasses() -> None:
    model = timm.create_model("cspresnet50")
    scaled = compscale.scale(model, depth=1.5)
    assert [(s.name, s.blocks_before, s.blocks_after) for s in scaled.scaling.stages] == [
        ("stages.0.blocks", 3, 5), ("stages.1.blocks", 3, 5), ("stages.2.blocks", 5, 8), ("stages.3.blocks", 2, 3)]
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.slow
def test_timm_repvgg_units_keep_their_identity_bn_and_1x1_branches() -> None:
    scaled = compscale.scale(timm.create_model("repvgg_a0"), depth=1.5)
    assert [s.blocks_after for s in scaled.scaling.stages] == [3, 6, 21, 2]
    new = scaled.stages[3][1]
    assert type(new).__name__ == "RepVggBlock" and isinstance(new.identity, nn.BatchNorm2d)
    assert new.conv_1x1 is not None and new.conv_kxk.conv.stride == (1, 1)


def test_hugging_face_mobilenetv1_repeats_its_depthwise_pointwise_pairs() -> None:
    """HF keeps each depthwise and pointwise conv as its own layer of one list: the unit is the pair."""
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    model = transformers.MobileNetV1ForImageClassification(transformers.MobileNetV1Config(num_labels=10))
    scaled = compscale.scale(model, depth=1.4)
    assert [(s.blocks_before, s.blocks_after) for s in scaled.scaling.stages] == [(1, 2), (2, 3), (2, 3), (6, 9),
                                                                                  (2, 3)]
    layers = scaled.mobilenet_v1.layer
    assert len(layers) == 2 * (2 + 3 + 3 + 9 + 3)
    depthwise = [c.groups == c.in_channels for c in (layer.convolution for layer in layers)]
    assert depthwise == [True, False] * 20  # pairs all along, none cut in half
    # the one-pair first stage gains a 64 -> 64 pair
    assert [(c.in_channels, c.out_channels, c.stride) for c in (layers[2].convolution, layers[3].convolution)] == [
        (64, 64, (1, 1)), (64, 64, (1, 1))]
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, 224, 224)).logits.shape == (1, 10)


def _cbr(cin: int, cout: int, stride: int = 1, depthwise: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3 if depthwise or cin == 3 else 1, stride, 1 if depthwise or cin == 3 else 0,
                      groups=cin if depthwise else 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def flat_mobilenet_v1() -> nn.Sequential:
    """MobileNetV1 written as one flat nn.Sequential: a stem conv, then depthwise and pointwise conv runs."""
    return nn.Sequential(
        *_cbr(3, 8, 2),
        *_cbr(8, 8, depthwise=True), *_cbr(8, 16),
        *_cbr(16, 16, 2, depthwise=True), *_cbr(16, 32), *_cbr(32, 32, depthwise=True), *_cbr(32, 32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def test_a_flat_mobilenet_v1_repeats_depthwise_pointwise_pairs_and_leaves_its_stem() -> None:
    table = find_stages(trace(flat_mobilenet_v1(), (1, 3, 32, 32)))
    assert [(s.name, len(s.blocks)) for s in table] == [("0..2", 1), ("3..8", 1), ("9..20", 2)]
    scaled = compscale.scale(flat_mobilenet_v1(), depth=2, input_size=32)
    convs = [m for m in scaled if isinstance(m, nn.Conv2d)]
    # stem 3 -> 8 gains a dense 8 -> 8 conv; the pair 8 -> 16 gains a 16 -> 16 pair; the 32-wide stage two pairs
    assert [(c.in_channels, c.out_channels, c.groups > 1) for c in convs] == [
        (3, 8, False), (8, 8, False),
        (8, 8, True), (8, 16, False), (16, 16, True), (16, 16, False),
        (16, 16, True), (16, 32, False), (32, 32, True), (32, 32, False), (32, 32, True), (32, 32, False),
        (32, 32, True), (32, 32, False)]
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_plan_costs_a_flat_nets_new_runs_exactly() -> None:
    """compscale.plan counts each new run's layers (a probe adds one run per stage) as the built model has them."""
    for phi in (1, 2):
        plan = compscale.plan(flat_mobilenet_v1(), phi=phi, input_size=32)
        scaled = compscale.scale(flat_mobilenet_v1(), phi=phi, input_size=32)
        assert plan.macs == compscale.profile(scaled, scaled.scaling.input_size).macs
