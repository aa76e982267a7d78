"""Channel-group analysis on tiny hand-written modules: one rule at a time."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compscale
from compscale.analyse import analyse_channels
from compscale.analyse.rules import elementwise
from compscale.trace import trace


class _Concat(nn.Module):
    """Two branches concatenated along channels, then fused: a dense/inception-like block."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 1)
        self.bn = nn.BatchNorm2d(24)
        self.fuse = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))


def test_cat_makes_segments_and_widens_each() -> None:
    cg = analyse_channels(trace(_Concat()))
    fuse = cg.layers["fuse"]
    assert [cg.groups[g].base for g, _ in fuse.inputs] == [8, 16]
    scaled = compscale.scale(_Concat(), width=2)
    assert (scaled.a.out_channels, scaled.b.out_channels, scaled.fuse.in_channels) == (16, 32, 48)
    assert scaled.bn.num_features == 48 and scaled.fuse.out_channels == 4  # the output is fixed
    assert scaled(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)


class _SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Conv2d(8, 32, 1)
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(x * s)


def test_se_mul_unites_excitation_with_its_input_and_squeeze_keeps_ratio() -> None:
    cg = analyse_channels(trace(_SE()))
    assert cg.group_of("conv").id == cg.group_of("fc2").id
    scaled = compscale.scale(_SE(), width=1.5)
    assert (scaled.conv.out_channels, scaled.fc1.out_channels, scaled.fc2.out_channels) == (48, 12, 48)


class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 48, 3)
        self.gn = nn.GroupNorm(12, 48)
        self.head = nn.Conv2d(48, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gn(self.conv(x)))


def test_groupnorm_groups_keep_dividing_their_channels() -> None:
    cg = analyse_channels(trace(_GroupNormNet()))
    assert 12 in cg.group_of("gn").divisors
    scaled = compscale.scale(_GroupNormNet(), width=1.3)
    assert scaled.gn.num_groups == 12 and scaled.gn.num_channels % 24 == 0  # lcm(8, 12)
    assert scaled.conv.out_channels == scaled.gn.num_channels


class _FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.ln = nn.LayerNorm(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.fc(torch.flatten(torch.relu(self.conv(x)), 1)))


def test_flatten_into_linear_scales_in_features_by_the_spatial_size() -> None:
    traced = trace(_FlattenHead(), (1, 3, 8, 8))
    cg = analyse_channels(traced)
    assert cg.layers["fc"].inputs[0][1] == 16  # 8 channels, each repeated over 4 x 4 positions
    scaled = compscale.scale(_FlattenHead(), width=2, input_size=8)
    assert scaled.fc.in_features == 16 * 16 and scaled.fc.out_features == 10 and scaled.ln.normalized_shape == (10,)


class _Roll(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.conv(x), 1, dims=1)


def test_unknown_op_names_the_node_and_how_to_register_a_rule() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=r"roll(.|\n)*Hint: .*register_channel_rule"):
        compscale.scale(_Roll(), width=2)


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.mean() > 0)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = _Gate()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.conv(x)))


def test_a_leaf_module_needs_a_rule_and_works_with_one() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=r"module type _Gate(.|\n)*register_channel_rule\(_Gate"):
        compscale.scale(_Gated(), width=2, leaf_modules=[_Gate])
    compscale.register_channel_rule(_Gate, elementwise)
    try:
        scaled = compscale.scale(_Gated(), width=2, leaf_modules=[_Gate])
    finally:
        compscale.unregister_channel_rule(_Gate)
    assert scaled.conv.out_channels == 16 and scaled.head.in_channels == 16
    with pytest.raises(compscale.UnsupportedOpError, match="module type _Gate"):  # unregistered: unknown again
        compscale.scale(_Gated(), width=2, leaf_modules=[_Gate])


def test_details_lists_every_group() -> None:
    text = analyse_channels(trace(_Concat())).details()
    lines = text.splitlines()
    assert lines[0] == "4 channel groups"  # input, branch a, branch b, output
    assert "fixed: model input" in lines[1] and "fixed: model output" in lines[-1]
