"""Inputs of any rank (``example_inputs=``, 1-d audio and 3-d video nets) and outputs that are not one tensor
(a detection backbone's dict of feature maps, a segmentation backbone)."""

from __future__ import annotations

import pytest
import torch
from conftest import leaf_layers
from torch import nn
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.segmentation import deeplabv3_resnet50
from torchvision.models.video import r3d_18
from torchvision.models.video.resnet import BasicBlock, BasicStem, Conv3DSimple, VideoResNet

import compscale


class Block1d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)
        self.conv2, self.bn2 = nn.Conv1d(c, c, 3, padding=1, bias=False), nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def audio_resnet() -> nn.Sequential:
    """A small 1-d ResNet on raw 16 kHz audio, (N, 1, 16000) -> 10 classes."""
    return nn.Sequential(
        nn.Conv1d(1, 32, 80, stride=16, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(4),
        Block1d(32), Block1d(32), nn.Conv1d(32, 64, 3, stride=2, bias=False), Block1d(64), Block1d(64),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def test_a_1d_resnet_scales_from_its_example_input() -> None:
    net = audio_resnet()
    scaled = compscale.scale(net, phi=1, example_inputs=(torch.randn(1, 1, 16000),))
    assert scaled.scaling.input_size == (21160,)  # 16000 x 1.15**2 (gamma**(2/k) per dim for k dims), a multiple of 8
    assert [(s.blocks_before, s.blocks_after) for s in scaled.scaling.stages] == [(2, 3), (2, 3)]
    convs = [m for m in scaled if isinstance(m, nn.Conv1d)]
    assert [c.out_channels for c in convs] == [32, 72]  # 32 x 1.1 rounds back to 32; 64 x 1.1 -> 72
    x = torch.randn(2, 1, *scaled.scaling.input_size)
    assert scaled.eval()(x).shape == (2, 10)
    planned = compscale.plan(net, phi=1, input_size=(16000,))
    counted = compscale.profile(scaled, scaled.scaling.input_size)
    assert (planned.macs, planned.acts) == (counted.macs, counted.acts)


def test_r3d_18_depth_2_is_the_4_4_4_4_video_resnet() -> None:
    scaled = compscale.scale(r3d_18(), depth=2, example_inputs=(torch.randn(1, 3, 16, 112, 112),))
    reference = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [4, 4, 4, 4], BasicStem)
    assert leaf_layers(scaled) == leaf_layers(reference)
    assert sum(p.numel() for p in scaled.parameters()) == sum(p.numel() for p in reference.parameters())
    a = compscale.profile(scaled, (16, 112, 112))
    assert a.macs == compscale.profile(reference, (16, 112, 112)).macs


@pytest.mark.slow  # 5-9 s on 2 cores
def test_video_resolution_scales_every_dim_after_the_channels() -> None:
    scaled = compscale.scale(r3d_18(), resolution=1.5, input_size=(16, 112, 112))
    assert scaled.scaling.input_size == (24, 168, 168)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, *scaled.scaling.input_size)).shape == (1, 400)


@pytest.mark.slow  # 5-9 s on 2 cores
def test_a_detection_backbone_returning_a_dict_deepens_with_the_same_keys() -> None:
    body = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone.body
    deeper = compscale.scale(body, depth=2)
    assert type(deeper) is type(body)
    assert [len(getattr(deeper, f"layer{i}")) for i in range(1, 5)] == [6, 8, 12, 6]
    with torch.no_grad():
        out = deeper.eval()(torch.randn(1, 3, 224, 224))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (1, 256, 56, 56), "1": (1, 512, 28, 28), "2": (1, 1024, 14, 14), "3": (1, 2048, 7, 7)}


@pytest.mark.slow  # 5-9 s on 2 cores
def test_a_dilated_segmentation_backbone_keeps_its_dilation() -> None:
    backbone = deeplabv3_resnet50(weights=None, weights_backbone=None).backbone
    deeper = compscale.scale(backbone, depth=2)
    assert len(deeper.layer3) == 12 and len(deeper.layer4) == 6
    assert [b.conv2.dilation for b in deeper.layer4] == [(2, 2)] + [(4, 4)] * 5  # as the layer's own repeats
    assert [b.conv2.dilation for b in deeper.layer3][-1] == (2, 2)
    with torch.no_grad():
        assert deeper.eval()(torch.randn(1, 3, 224, 224))["out"].shape == (1, 2048, 28, 28)


class Conditioned(nn.Module):
    """Two inputs: an image and a class-conditioning vector added after the stem (a FiLM-like bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.Sequential(*(_Res2d(16) for _ in range(2)))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) + self.embed(condition)[:, :, None, None]
        return self.fc(self.blocks(x).mean((2, 3)))


class _Res2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


def test_a_forward_of_two_inputs_scales_the_first_and_passes_the_second() -> None:
    inputs = (torch.randn(1, 3, 32, 32), torch.randn(1, 8))
    scaled = compscale.scale(Conditioned(), phi=1, width=1.5, example_inputs=inputs)
    assert scaled.scaling.input_size == (40, 40)
    assert len(scaled.blocks) == 3 and scaled.embed.in_features == 8  # the condition keeps its 8 features
    assert scaled.embed.out_features == scaled.stem[0].out_channels == 24  # added to the stem: widened with it
    assert scaled.eval()(torch.randn(2, 3, 40, 40), torch.randn(2, 8)).shape == (2, 10)
    before = compscale.profile(Conditioned(), example_inputs=inputs)
    after = compscale.profile(scaled, example_inputs=(torch.randn(1, 3, 40, 40), inputs[1]))
    assert after.input_size == (40, 40) and 4 < after.macs / before.macs < 6.5  # 1.5 (3 of 2 blocks) x 1.5^2 x 1.25^2


def test_example_inputs_mistakes() -> None:
    with pytest.raises(TypeError, match="example_inputs must be a tuple of tensors"):
        compscale.scale(audio_resnet(), phi=1, example_inputs=([1, 2, 3],))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disagrees with the example input"):
        compscale.scale(audio_resnet(), phi=1, input_size=(8000,), example_inputs=(torch.randn(1, 1, 16000),))


class OptionalCondition(Conditioned):
    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x = self.stem(x)
        if condition is not None:
            x = x + self.embed(condition)[:, :, None, None]
        return self.fc(self.blocks(x).mean((2, 3)))


def test_an_optional_input_that_is_given_is_traced_not_defaulted() -> None:
    inputs = (torch.randn(1, 3, 32, 32), torch.randn(1, 8))
    scaled = compscale.scale(OptionalCondition(), width=1.5, example_inputs=inputs)
    assert scaled.embed.out_features == scaled.stem[0].out_channels == 24  # the condition's branch widened too
    assert scaled.eval()(*inputs).shape == (1, 10)
