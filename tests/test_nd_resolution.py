"""phi means about 2**phi MACs whatever the number of spatial dims, and its sizes stay distinct at small sizes.

The compound rule's ``alpha * beta**2 * gamma**2 ~ 2`` counts resolution twice: an image's two sides. A volume has
three and a waveform one, so phi's resolution is ``gamma ** (2 / k)`` per dim for k spatial dims (the same factor
of the input's volume as of an image's area); an explicit ``resolution=`` is per dim, as given.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import compscale
from compscale.planning.plan import plan_input_size, resolve_multipliers
from compscale.planning.rounding import round_resolution

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
SIZE = {1: (16000,), 2: (32, 32), 3: (32, 32, 32)}
STEM = {1: (80, 16), 2: (3, 1), 3: (3, 2)}  # (kernel, stride): raw audio is strided down first


class Block(nn.Module):
    def __init__(self, c: int, dims: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = CONV[dims](c, c, 3, padding=1, bias=False), NORM[dims](c)
        self.conv2, self.bn2 = CONV[dims](c, c, 3, padding=1, bias=False), NORM[dims](c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def small_resnet(dims: int) -> nn.Sequential:
    """Two stages of two residual blocks in ``dims`` spatial dims: a 3-D volume, 1-D audio, a 2-D image."""
    k, s = STEM[dims]
    return nn.Sequential(
        CONV[dims](1, 16, k, stride=s, padding=k // 2, bias=False), NORM[dims](16), nn.ReLU(), Block(16, dims),
        Block(16, dims), CONV[dims](16, 32, 3, stride=2, padding=1, bias=False), NORM[dims](32), nn.ReLU(),
        Block(32, dims), Block(32, dims), POOL[dims](1), nn.Flatten(), nn.Linear(32, 10),
    )


@pytest.mark.parametrize("dims", [1, 3, 2])
def test_phi_k_costs_about_2_to_the_k_in_any_number_of_dims(dims: int) -> None:
    base = small_resnet(dims)
    size = SIZE[dims]
    planner = compscale.Planner(base, input_size=size)
    base_macs = compscale.profile(base, size).macs
    for k in (1, 2, 3, 4):
        plan = planner.plan(k)
        assert 0.75 * 2**k <= plan.macs / base_macs <= 1.6 * 2**k, (k, plan.input_size, plan.macs / base_macs)
    scaled = compscale.scale(base, phi=2, input_size=size)  # the built network costs what was planned
    assert compscale.profile(scaled, scaled.scaling.input_size).macs == planner.plan(2).macs
    assert scaled.eval()(torch.randn(2, 1, *scaled.scaling.input_size)).shape == (2, 10)


@pytest.mark.parametrize("dims", [1, 3])
def test_the_rounded_sizes_strictly_increase_with_phi(dims: int) -> None:
    """32**3 used to plan 40**3 at both phi=1 and phi=2 (gamma on three sides, rounded to 8)."""
    planner = compscale.Planner(small_resnet(dims), input_size=SIZE[dims])
    sizes = [planner.plan(k).input_size for k in range(0, 9)]
    assert sizes[0] == SIZE[dims]
    assert all(a[0] < b[0] for a, b in itertools.pairwise(sizes)), sizes
    assert all(len(set(s)) == 1 for s in sizes)  # every dim alike


def test_the_3d_and_1d_sizes_are_gamma_to_the_two_over_k_per_dim() -> None:
    assert plan_input_size((32, 32, 32), resolve_multipliers(1, rank=3).resolution) == (36, 36, 36)  # 35.1
    assert plan_input_size((32, 32, 32), resolve_multipliers(2, rank=3).resolution) == (38, 38, 38)  # 38.6
    assert plan_input_size((16000,), resolve_multipliers(1, rank=1).resolution) == (21160,)  # 16000 x 1.15**2
    assert resolve_multipliers(1, rank=3).resolution ** 3 == pytest.approx(1.15**2)
    fast = resolve_multipliers(2, strategy="fast", rank=3)
    assert fast.resolution ** 3 == pytest.approx(resolve_multipliers(2, strategy="fast").resolution ** 2)


def test_an_explicit_resolution_is_per_dim_as_given() -> None:
    scaled = compscale.scale(small_resnet(3), resolution=1.5, input_size=(32, 32, 32))
    assert scaled.scaling.input_size == (48, 48, 48) and scaled.scaling.resolution == 1.5
    assert resolve_multipliers(1, resolution=1.15, rank=1).resolution == 1.15
    assert resolve_multipliers(3, resolution=1.3, rank=3).resolution == 1.3
    assert plan_input_size((16000,), 1.15) == (18400,)


@pytest.mark.parametrize("phi", [1, 2, 3, 4, 5, 6, 7])
def test_images_keep_the_references_rounding(phi: int) -> None:
    mult = resolve_multipliers(phi)
    assert mult.resolution == pytest.approx(1.15**phi)
    assert plan_input_size((224, 224), mult.resolution) == (8 * round(224 * 1.15**phi / 8),) * 2


def test_resnet50_phi_2_runs_at_296_as_the_readme_says() -> None:
    assert plan_input_size((224, 224), resolve_multipliers(2, rank=2).resolution) == (296, 296)


def test_rounding_moves_a_small_size_by_at_most_a_32nd_and_keeps_large_ones_on_the_divisor() -> None:
    for size in range(8, 600):
        for r in (0.6, 0.9, 1.0977, 1.15, 1.3225, 2.0):
            value = size * r
            got = round_resolution(size, r, fine=True)
            assert round_resolution(size, r) == max(8, round(value / 8) * 8)  # images: the references' rounding
            if value >= 128:
                assert got == max(8, round(value / 8) * 8)  # the given divisor from 128 up
            if value >= 16:
                assert abs(got - value) <= value / 32, (size, r, got)
    # so two sizes more than 6.5% apart never round to one: phi's steps (x1.098 per dim in 3-D) stay distinct
    values = [v / 4 for v in range(4 * 16, 4 * 300)]
    rounded = {v: round_resolution(1, v, fine=True) for v in values}
    for a in values:
        for b in values:
            if b > a * 1.065:
                assert rounded[b] > rounded[a], (a, b)


def test_images_keep_multiples_of_8_at_small_sizes_too() -> None:
    assert plan_input_size((32, 32), resolve_multipliers(1).resolution) == (40, 40)  # 36.8
    assert plan_input_size((64, 64), resolve_multipliers(1).resolution) == (72, 72)  # 73.6
