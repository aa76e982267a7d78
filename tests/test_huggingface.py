"""Hugging Face transformers CNNs, built from their configs and passed as they are: Python on static shapes,
keyword inputs and ModelOutput results are captured (compscale.trace.concrete), and the result keeps the model's
class, its call signature and its output type."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import leaf_layers
from torch import nn

import compscale

transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")


def _quiet(factory):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory()


def efficientnet(width: float = 1.0, depth: float = 1.0, size: int = 224) -> nn.Module:
    config = transformers.EfficientNetConfig(width_coefficient=width, depth_coefficient=depth, image_size=size,
                                             hidden_dim=1280, dropout_rate=0.2, num_labels=1000)
    return transformers.EfficientNetForImageClassification(config)


MODELS = {
    "resnet": lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000)),
    "mobilenet_v2": lambda: transformers.MobileNetV2ForImageClassification(
        transformers.MobileNetV2Config(num_labels=1000)),  # tf_padding=True: int() of sizes in forward
    "efficientnet_b0": efficientnet,
    "convnext": lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(num_labels=1000)),
    "convnextv2": lambda: transformers.ConvNextV2ForImageClassification(
        transformers.ConvNextV2Config(num_labels=1000)),  # GRN: torch.linalg.vector_norm, no rule registered
    "regnet": lambda: transformers.RegNetForImageClassification(transformers.RegNetConfig(num_labels=1000)),
}
SLOW = {"convnext", "convnextv2", "regnet", "efficientnet_b0"}  # 5-10 s each; B0 -> B1 below runs by default


@pytest.mark.parametrize("name", [n if n not in SLOW else pytest.param(n, marks=pytest.mark.slow) for n in MODELS])
def test_phi_1_keeps_the_hf_call_and_output(name: str) -> None:
    model = _quiet(MODELS[name])
    scaled = compscale.scale(model, phi=1)
    assert type(scaled) is type(model)
    assert scaled.scaling.input_size == (256, 256)
    assert any(s.blocks_after > s.blocks_before for s in scaled.scaling.stages)
    with torch.no_grad():
        out = scaled.eval()(pixel_values=torch.randn(1, 3, 256, 256))
    assert type(out).__name__ == "ImageClassifierOutputWithNoAttention" and out.logits.shape == (1, 1000)
    ratio = compscale.profile(scaled, 256).macs / compscale.profile(model, 224).macs
    assert 0.8 * 1.92 <= ratio <= 1.5 * 1.92


def test_efficientnet_b0_depth_1_1_is_the_b1_config_with_its_dropout_schedule() -> None:
    scaled = compscale.scale(_quiet(efficientnet), depth=1.1)
    reference = _quiet(lambda: efficientnet(depth=1.1, size=240))
    assert leaf_layers(scaled) == leaf_layers(reference)
    blocks = scaled.efficientnet.encoder.blocks
    assert {type(b).__name__ for b in blocks} == {"EfficientNetBlock"}  # synthesized repeats too
    rates = [(b.projection.apply_dropout, round(b.projection.dropout.p, 6)) for b in blocks]
    assert rates == [(b.projection.apply_dropout, round(b.projection.dropout.p, 6))
                     for b in reference.efficientnet.encoder.blocks]


class _Padded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(nn.functional.pad(self.conv1(x), (0, 1, 0, 1))).mean((2, 3))


class _Flipped(_Padded):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.flip(self.conv1(x), dims=(1,))).mean((2, 3))


class _DataDependent(_Padded):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if y.mean() > 0:
            y = -y
        return self.conv2(y).mean((2, 3))


def test_f_pad_needs_no_rule_and_a_channel_flip_is_refused_by_name() -> None:
    assert compscale.scale(_Padded(), width=2, input_size=32).conv1.out_channels == 32
    with pytest.raises(compscale.UnsupportedOpError, match=r"flip"):
        compscale.scale(_Flipped(), width=2, input_size=32)


def test_a_forward_that_branches_on_values_names_the_line() -> None:
    with pytest.raises(compscale.TraceError, match=r"data-dependent control flow.*if y.mean\(\) > 0") as e:
        compscale.scale(_DataDependent(), width=2, input_size=32)
    assert "Hint:" in str(e.value)
