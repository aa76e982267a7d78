"""Channels-last blocks: ConvNeXt (torchvision's, and the original code's style) scales like a hand-built one.

ConvNeXt runs its MLP on ``x.permute(0, 2, 3, 1)`` (LayerNorm and Linear over the last dimension), scales
each block by a per-channel parameter (``gamma * x``) and normalises its downsampling layers with a
hand-written LayerNorm over dimension 1. compscale follows the channel dimension through ``permute``
and widens the parameters with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_architecture
from torch import nn
from torchvision.models import convnext_tiny
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import compscale
from compscale.errors import UnsupportedOpError


def _convnext(dims: list[int], depths: list[int]) -> ConvNeXt:
    nexts = [*dims[1:], None]
    setting = [CNBlockConfig(d, nxt, n) for d, nxt, n in zip(dims, nexts, depths)]
    return ConvNeXt(setting, stochastic_depth_prob=0.1)


def _layer_scales(model: nn.Module) -> list[torch.Tensor]:
    return [m.layer_scale for m in model.modules() if hasattr(m, "layer_scale")]


def test_convnext_tiny_width_1_5_is_convnext_with_1_5x_channels() -> None:
    scaled = compscale.scale(convnext_tiny(), width=1.5)
    assert_same_architecture(scaled, _convnext([144, 288, 576, 1152], [3, 3, 9, 3]))
    scales = _layer_scales(scaled)
    assert [tuple(s.shape) for s in scales[:3]] == [(144, 1, 1)] * 3
    assert all(bool((s == 1e-6).all()) for s in scales)  # the constructor's constant, in every new entry
    assert scaled.features[0][1].normalized_shape == (144,)  # LayerNorm2d of the stem follows its channels


@pytest.mark.slow  # 5 s; width 1.5 and phi=1 of the same net run by default
def test_convnext_tiny_depth_1_5_is_convnext_5_5_14_5() -> None:
    scaled = compscale.scale(convnext_tiny(), depth=1.5)
    reference = _convnext([96, 192, 384, 768], [5, 5, 14, 5])
    assert_same_architecture(scaled, reference)
    rates = [m.p for m in scaled.modules() if type(m).__name__ == "StochasticDepth"]
    assert rates == pytest.approx([m.p for m in reference.modules() if type(m).__name__ == "StochasticDepth"])


@pytest.mark.slow  # 6 s; test_original_convnext_compound_cost_and_plan checks the same on a small ConvNeXt
def test_convnext_tiny_phi_1_runs_at_256_and_plan_equals_profile() -> None:
    model = convnext_tiny()
    scaled = compscale.scale(model, phi=1)
    assert scaled.scaling.input_size == (256, 256)
    assert [(s.blocks_before, s.blocks_after) for s in scaled.scaling.stages] == [(3, 4), (3, 4), (9, 11), (3, 4)]
    ratio = compscale.profile(scaled, 256).macs / compscale.profile(model, 224).macs
    assert 0.8 * 1.92 <= ratio <= 1.5 * 1.92, ratio  # 1.99
    plan = compscale.plan(model, phi=1)
    prof = compscale.profile(scaled, 256)
    assert (plan.macs, plan.params, plan.acts) == (prof.macs, prof.params, prof.acts)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


# The original ConvNeXt code's style (facebookresearch/ConvNeXt): a LayerNorm class of its own for both
# layouts, `gamma` as a 1-d parameter applied channels-last, blocks in nn.Sequential stages.
class LayerNorm(nn.Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-6, data_format: str = "channels_last") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))
        self.eps = eps
        self.data_format = data_format
        self.normalized_shape = (normalized_shape,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, dim: int, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return shortcut + x


class OriginalConvNeXt(nn.Module):
    def __init__(self, depths: tuple[int, ...] = (2, 2, 6, 2), dims: tuple[int, ...] = (40, 80, 160, 320),
                 num_classes: int = 10) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4),
                             LayerNorm(dims[0], eps=1e-6, data_format="channels_first"))
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm(dims[i], eps=1e-6, data_format="channels_first"),
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = nn.ModuleList([nn.Sequential(*(Block(dims[i]) for _ in range(depths[i]))) for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        return self.head(self.norm(x.mean([-2, -1])))


def test_original_convnext_code_scales_like_the_hand_built_one() -> None:
    torch.manual_seed(0)
    scaled = compscale.scale(OriginalConvNeXt(), depth=1.5, width=1.5, input_size=64)
    reference = OriginalConvNeXt(depths=(3, 3, 9, 3), dims=(64, 120, 240, 480))
    assert_same_architecture(scaled, reference, input_size=64)
    assert scaled.stages[0][0].norm.normalized_shape == (64,)  # F.layer_norm reads it in forward
    assert bool((scaled.stages[0][0].gamma == 1e-6).all())
    assert bool((scaled.downsample_layers[1][0].weight == 1).all())
    assert bool((scaled.downsample_layers[1][0].bias == 0).all())
    with torch.no_grad():
        assert scaled.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_original_convnext_compound_cost_and_plan() -> None:
    model = OriginalConvNeXt()
    scaled = compscale.scale(model, phi=1, input_size=64)
    assert scaled.scaling.input_size == (72, 72)
    after, before = compscale.profile(scaled, 72), compscale.profile(model, 64)
    assert 0.8 * 1.92 <= after.macs / before.macs <= 1.5 * 1.92, after.macs / before.macs
    plan = compscale.plan(model, phi=1, input_size=64)
    assert (plan.macs, plan.params, plan.acts) == (after.macs, after.params, after.acts)


class _ChannelMix(nn.Module):
    """A tensor attribute used as a matrix over channels: no per-channel rule can widen it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.mix = nn.Parameter(torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)
        return (x @ self.mix).mean((1, 2))


def test_a_tensor_attribute_used_otherwise_names_it_and_hints() -> None:
    with pytest.raises(UnsupportedOpError, match=r"'mix'.*\n.*Hint: .*register_channel_rule"):
        compscale.scale(_ChannelMix(16), width=2, input_size=32)


class _NormalisingNet(nn.Module):
    """Input normalisation inside the model, with buffers: attributes over the (fixed) input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv((x - self.mean) / self.std).mean((2, 3)))


def test_input_normalisation_buffers_keep_their_three_channels() -> None:
    scaled = compscale.scale(_NormalisingNet(), width=2, input_size=32)
    assert scaled.conv.out_channels == 64 and scaled.fc.in_features == 64
    assert torch.equal(scaled.mean, _NormalisingNet().mean)
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _PlainLayerNormHead(nn.Module):
    """A LayerNorm without affine parameters still has a normalized shape that must follow the width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16, elementwise_affine=False)
        self.gamma = nn.Parameter(torch.ones(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.mul(self.norm(self.conv(x).mean((2, 3))), other=self.gamma)  # an attribute as a keyword
        return self.fc(y)


def test_layer_norm_without_affine_and_a_keyword_scale_follow_the_width() -> None:
    scaled = compscale.scale(_PlainLayerNormHead(), width=2, input_size=16)
    assert scaled.norm.normalized_shape == (32,) and tuple(scaled.gamma.shape) == (32,)
    assert scaled(torch.randn(2, 3, 16, 16)).shape == (2, 10)


class _SlicedScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.p = nn.Parameter(torch.ones(32))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv(x) * self.p[:16, None, None]).mean((2, 3)))


def test_a_slice_of_an_attribute_as_a_scale_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedOpError, match=r"slice of the tensor attribute 'p'"):
        compscale.scale(_SlicedScale(), width=2, input_size=16)
