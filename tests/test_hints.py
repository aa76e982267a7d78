"""Hints for what analysis cannot infer: stages=, fixed=, and deepening blocks that forward calls by name."""

from __future__ import annotations

import pytest
import torch
from test_custom_zoo import ExplicitResNet, _Basic  # blocks called one by one in forward: no container to append to
from torch import nn
from torchvision.models import resnet50

import compscale


def test_blocks_called_by_name_deepen_beside_them() -> None:
    scaled = compscale.scale(ExplicitResNet(), depth=2, input_size=32)
    assert type(scaled) is ExplicitResNet  # the user's class, its own forward
    assert [s.new_blocks for s in scaled.scaling.stages] == [("block2_0", "block2_1"), ("block5", "block6")]
    assert [name for name, _ in scaled.named_children()] == [
        "stem", "block1", "block2", "block2_0", "block2_1", "block3", "block4", "block5", "block6", "head"]
    assert type(scaled.block5) is _Basic and type(scaled.stem) is nn.Sequential
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert compscale.profile(scaled, 32).macs > 1.9 * compscale.profile(ExplicitResNet(), 32).macs


def test_stages_restricts_what_deepens() -> None:
    scaled = compscale.scale(resnet50(), depth=2, stages=["layer3"])
    assert [(s.name, s.blocks_after) for s in scaled.scaling.stages] == [("layer3", 12)]
    assert len(scaled.layer1) == 3 and len(scaled.layer3) == 12


def test_stages_accepts_a_predicate() -> None:
    scaled = compscale.scale(resnet50(), depth=2, stages=lambda path: path.startswith(("layer1.", "layer4.")))
    assert [len(layer) for layer in (scaled.layer1, scaled.layer2, scaled.layer3, scaled.layer4)] == [6, 4, 6, 6]


def test_fixed_keeps_a_layers_width_and_what_derives_from_it() -> None:
    scaled = compscale.scale(resnet50(), width=2, fixed=["layer4.0.conv3"])
    assert scaled.layer4[0].conv3.out_channels == 2048 and scaled.fc.in_features == 2048
    assert scaled.layer4[0].conv1.out_channels == 1024  # the planes still double
    assert scaled.layer3[0].conv3.out_channels == 2048


def test_fixed_names_an_unknown_layer() -> None:
    with pytest.raises(compscale.WidthError, match=r"fixed='nope' names no conv(.|\n)*Hint: "):
        compscale.scale(resnet50(), width=2, fixed=["nope"])


def test_stages_does_not_change_widths() -> None:
    plain = compscale.scale(resnet50(), width=1.3)
    restricted = compscale.scale(resnet50(), width=1.3, stages=["layer1"])
    assert restricted.layer2[0].conv3.out_channels == plain.layer2[0].conv3.out_channels == 4 * 168


def test_graph_insertion_keeps_each_submodules_mode_and_call_order() -> None:
    model = ExplicitResNet().train()
    model.stem[1].eval()  # a frozen norm
    scaled = compscale.scale(model, depth=2, input_size=32)
    assert scaled.training and not scaled.stem[1].training
    names = [n for n, _ in scaled.named_children()]
    assert names[:5] == ["stem", "block1", "block2", "block2_0", "block2_1"]


class _MyDrop(nn.Module):
    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_registered_drop_path_type_widens_and_respreads() -> None:
    compscale.register_drop_path(_MyDrop, "rate")

    class Block(nn.Module):
        def __init__(self, rate: float) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.drop = _MyDrop(rate)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.drop(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1),
                          nn.Sequential(*(Block(0.1 * k / 4) for k in range(4))),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    scaled = compscale.scale(model, depth=2, width=1.5, input_size=16)
    rates = [m.rate for m in scaled.modules() if isinstance(m, _MyDrop)]
    assert rates == pytest.approx([0.1 * k / 8 for k in range(8)])
    assert scaled[1][7].conv.out_channels == 24
