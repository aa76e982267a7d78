"""Dense blocks that concatenate their layers themselves: torchvision's DenseNet deepens into the DenseNet its
constructor builds with more layers per block.

torchvision's ``_DenseBlock`` is an ``nn.ModuleDict`` whose forward collects its layers' outputs in a list and
concatenates them; each ``_DenseLayer`` concatenates the list it is given. No layer is a single-entry block, so
the stages are read off the graph (every child reads the concatenation of the block's input and all earlier
children). The DenseNet-121 tests run on the meta device: no weights, only architecture and MACs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_architecture
from torch import nn
from torchvision.models.densenet import DenseNet, densenet121

import compscale
from compscale.analyse.stages import find_stages
from compscale.planning.depth import dense_costs
from compscale.planning.rounding import dense_repeats
from compscale.trace import trace

BLOCKS = ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4")


def meta_densenet121() -> nn.Module:
    with torch.device("meta"):
        return densenet121()


def torchvision_densenet(counts: tuple[int, ...], **kwargs: int) -> nn.Module:
    with torch.device("meta"):
        return DenseNet(growth_rate=32, block_config=counts, num_init_features=64, **kwargs)  # type: ignore[arg-type]


def counts_of(scaled: nn.Module) -> tuple[int, ...]:
    return tuple(s.blocks_after for s in scaled.scaling.stages)


@pytest.fixture(scope="module")
def deeper() -> nn.Module:
    return compscale.scale(meta_densenet121(), depth=1.5)


def test_each_dense_block_is_a_stage_of_its_layers() -> None:
    table = find_stages(trace(meta_densenet121()))
    assert [s.name for s in table] == list(BLOCKS)
    assert [len(s.blocks) for s in table] == [6, 12, 24, 16]
    assert [(s.in_channels, s.out_channels) for s in table] == [(64, 256), (128, 512), (256, 1024), (512, 1024)]
    assert {b.type_name for s in table for b in s.blocks} == {"_DenseLayer"}
    assert table[0].blocks[2].in_shape[1] == 64 + 2 * 32  # layer 3 reads the stem and two layers' outputs


def test_depth_1_5_builds_torchvisions_densenet_with_the_dense_cost_rule(deeper: nn.Module) -> None:
    traced = trace(meta_densenet121())
    costs = dense_costs(traced, find_stages(traced))
    assert counts_of(deeper) == tuple(dense_repeats(costs[i], 1.5) for i in range(4)) == (9, 17, 32, 22)
    assert_same_architecture(deeper, torchvision_densenet((9, 17, 32, 22)))  # transitions keep halving
    assert list(deeper.features.denseblock1)[6:] == ["denselayer7", "denselayer8", "denselayer9"]
    assert type(deeper.features.denseblock1.denselayer9) is type(deeper.features.denseblock1.denselayer1)


def test_depth_below_1_removes_trailing_layers() -> None:
    shallower = compscale.scale(meta_densenet121(), depth=0.5)
    assert counts_of(shallower) == (4, 7, 15, 9)
    assert_same_architecture(shallower, torchvision_densenet((4, 7, 15, 9)))


def test_plan_gives_the_depths_and_macs_of_the_built_network(deeper: nn.Module) -> None:
    planner = compscale.Planner(meta_densenet121())
    assert planner.base_macs == compscale.profile(meta_densenet121(), 224).macs
    plan = planner.plan(depth=1.5)
    assert tuple(s.blocks_after for s in plan.stages) == counts_of(deeper)
    assert plan.macs == compscale.profile(deeper, 224).macs


@pytest.mark.slow  # 8 s; depth and plan of the same net run by default
def test_phi_1_deepens_widens_and_runs_at_256() -> None:
    base = meta_densenet121()
    scaled = compscale.scale(base, phi=1)
    assert scaled.scaling.input_size == (256, 256)
    assert counts_of(scaled) == (7, 14, 28, 19)
    counted = compscale.profile(scaled, 256)
    macs = counted.macs
    assert 1.7 < macs / compscale.profile(base, 224).macs < 2.1  # alpha * beta^2 * gamma^2 = 1.92
    planned = compscale.plan(base, phi=1)
    assert (planned.macs, planned.acts) == (macs, counted.acts)


def test_new_layers_are_fresh_copies_and_the_old_ones_keep_their_weights() -> None:
    base = DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=10)  # type: ignore[arg-type]
    scaled = compscale.scale(base, depth=2, input_size=32)
    counts = counts_of(scaled)
    reference = DenseNet(growth_rate=8, block_config=counts, num_init_features=16, num_classes=10)  # type: ignore[arg-type]
    assert_same_architecture(scaled, reference, input_size=32)
    old, new = base.features.denseblock1.denselayer2, scaled.features.denseblock1.denselayer3
    assert torch.equal(scaled.features.denseblock1.denselayer2.conv2.weight, old.conv2.weight)
    assert not torch.equal(new.conv2.weight, old.conv2.weight)  # same shape, drawn anew
    assert torch.equal(new.norm1.weight, torch.ones(16 + 2 * 8)) and not new.norm1.bias.any()
    with torch.no_grad():
        assert scaled.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _ConcatInBlock(nn.ModuleDict):
    """A dense block that concatenates for its layers (which take one tensor), unlike torchvision's."""

    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__({f"layer{i + 1}": nn.Sequential(nn.BatchNorm2d(cin + i * growth), nn.ReLU(),
                                                          nn.Conv2d(cin + i * growth, growth, 3, 1, 1))
                          for i in range(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class _NamedCalls(_ConcatInBlock):
    """Calls its first two layers by name: a layer appended to it would never run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for name in ("layer1", "layer2"):
            features.append(self[name](torch.cat(features, 1)))
        return torch.cat(features, 1)


def _net(block: nn.Module, out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out, 10))


def test_a_block_that_concatenates_for_its_layers_deepens() -> None:
    scaled = compscale.scale(_net(_ConcatInBlock(16, 8, 2), 32), depth=2, input_size=16)
    assert counts_of(scaled) == (4,)  # layer costs 16, 24, 32, 40 (x 8 x 9 x 256): 112 >= 2 x (16 + 24)
    assert [layer[2].in_channels for layer in scaled[1].values()] == [16, 24, 32, 40]
    assert scaled[4].in_features == 16 + 4 * 8
    with torch.no_grad():
        assert scaled(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def test_a_block_that_calls_its_layers_by_name_is_not_deepened_silently() -> None:
    with pytest.raises(compscale.RewriteError, match=r"does not call the layers appended to it \(layer3"):
        compscale.scale(_net(_NamedCalls(16, 8, 2), 32), depth=2, input_size=16)
