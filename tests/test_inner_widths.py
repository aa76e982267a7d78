"""Inner widths an expert would choose: in the repeat synthesized for a one-block stage, and in blocks that narrow
their input by a ratio (BAM's spatial gate, ShuffleNet v1's bottleneck).

Each scaled network is compared, parameter for parameter, with the library's own class built by hand at the widths
and depths it stands for.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import compscale

WIDTHS = [1.5, 2.0, *(1.1**phi for phi in range(1, 5))]


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- repeats of one-block stages: inner widths follow what the network's other blocks of the class show ---------


@pytest.mark.parametrize("depth", [2, 3])
def test_hf_regnet_one_block_stages_repeat_as_the_config_builds_them(depth: int) -> None:
    """RegNetYLayer's middle is out / reduction and its SE squeeze round(in / 4): a 32 -> 128 block repeats as
    128 -> 128 -> 128 with a 32-wide squeeze, not with 4 x 128 (MBConv's t x in) or 8 (the squeeze's ratio to its
    own input)."""
    transformers = pytest.importorskip("transformers")
    config = functools.partial(transformers.RegNetConfig, hidden_sizes=[32, 48, 96, 160], embedding_size=16,
                               groups_width=16)
    torch.manual_seed(0)
    model = transformers.RegNetForImageClassification(config(depths=[1, 1, 2, 1]))
    scaled = compscale.scale(model, depth=depth, input_size=64)
    reference = transformers.RegNetForImageClassification(config(depths=[depth, depth, 2 * depth, depth]))
    assert shapes(scaled) == shapes(reference)


@pytest.mark.parametrize(("name", "depth"), [
    ("regnet_y_400mf", 1.2),
    pytest.param("regnet_y_400mf", 2.0, marks=pytest.mark.slow),
    pytest.param("regnet_x_400mf", 1.2, marks=pytest.mark.slow),
])
def test_torchvision_regnet_one_block_stage_repeats_as_regnet_builds_it(name: str, depth: float) -> None:
    """torchvision's ResBottleneckBlock: SE squeeze round(0.25 x width_in); block1 (one block, 32 -> 48) repeats
    48 -> 48 with a 12-wide squeeze."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models import regnet

    params = {"regnet_y_400mf": dict(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, se_ratio=0.25),
              "regnet_x_400mf": dict(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16)}[name]
    p = regnet.BlockParams.from_init_params(**params)
    deeper = regnet.BlockParams([math.ceil(n * depth) for n in p.depths], p.widths, p.group_widths,
                                p.bottleneck_multipliers, p.strides, p.se_ratio)
    scaled = compscale.scale(getattr(torchvision.models, name)(), depth=depth, input_size=64)
    reference = regnet.RegNet(deeper, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1))
    assert shapes(scaled) == shapes(reference)


# --- narrowing inner widths: channels // r of the width the block reads -------------------------------------------


def _bam_reference(width: float) -> nn.Module:
    from pytorchcv.models.bamresnet import BamResNet

    from compscale.planning.rounding import make_divisible

    channels = [[make_divisible(c * width)] * 2 for c in (64, 128, 256, 512)]
    return BamResNet(channels=channels, init_block_channels=make_divisible(64 * width), bottleneck=False)


@pytest.mark.parametrize("width", [1.5, 1.21, *(pytest.param(w, marks=pytest.mark.slow)
                                                 for w in (2.0, 1.1, 1.331, 1.4641))])
def test_bam_spatial_gate_is_channels_over_its_reduction_ratio(width: float) -> None:
    """BAM's spatial gate: mid = channels // 16, its dilated convs at that width (at x1.5: 96 // 16 = 6, not
    make_divisible(4 x 1.5) = 8)."""
    pytest.importorskip("pytorchcv")
    from pytorchcv.model_provider import get_model

    scaled = compscale.scale(get_model("bam_resnet18", pretrained=False), width=width)
    assert shapes(scaled) == shapes(_bam_reference(width))


def _shufflenet_at_its_widths(scaled: nn.Module, groups: int) -> nn.Module:
    """pytorchcv's ShuffleNet built with the stage widths of ``scaled``: the class derives every inner width."""
    from pytorchcv.models.shufflenet import ShuffleNet

    init = scaled.features.init_block.conv.out_channels
    channels, width = [], init
    for stage in (scaled.features.stage1, scaled.features.stage2, scaled.features.stage3):
        widths = []
        for unit in stage.children():
            width = unit.expand_bn3.num_features + (width if unit.downsample else 0)
            widths.append(width)
        channels.append(widths)
    return ShuffleNet(channels=channels, init_block_channels=init, groups=groups)


@pytest.mark.parametrize(("groups", "width"), [
    *((1, w) for w in WIDTHS), (3, 1.5), *(pytest.param(3, w, marks=pytest.mark.slow) for w in WIDTHS[1:])])
def test_shufflenet_bottleneck_is_a_quarter_of_the_unit_output(groups: int, width: float) -> None:
    """ShuffleNet v1's unit: mid = out_channels // 4, not rounded on its own (g1 at x1.5: 224 // 4 = 56)."""
    pytest.importorskip("pytorchcv")
    from pytorchcv.model_provider import get_model

    scaled = compscale.scale(get_model(f"shufflenet_g{groups}_w1", pretrained=False), width=width)
    assert shapes(scaled) == shapes(_shufflenet_at_its_widths(scaled, groups))


class _Gate(nn.Module):
    """A block whose branch narrows its input 8x (two convs at the narrow width), gating the input."""

    def __init__(self, channels: int, ratio: int = 8) -> None:
        super().__init__()
        mid = channels // ratio
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.mix = nn.Conv2d(mid, mid, 3, padding=1)
        self.gate = nn.Conv2d(mid, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * torch.sigmoid(self.gate(self.mix(torch.relu(self.reduce(x)))))


class _GateNet(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(_Gate(channels), _Gate(channels))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


@pytest.mark.parametrize("width", WIDTHS)
def test_a_narrowing_branch_keeps_its_ratio_to_the_width_it_reads(width: float) -> None:
    from compscale.planning.rounding import make_divisible

    scaled = compscale.scale(_GateNet(96), width=width, input_size=32)
    assert shapes(scaled) == shapes(_GateNet(make_divisible(96 * width)))

