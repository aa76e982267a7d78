"""Depth scaling equals the deeper network built directly (issue: foundation and depth)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import TinyResidual, assert_same_architecture
from torch import nn
from torchvision.models import efficientnet_b0, efficientnet_b1, mobilenet_v2, resnet18, resnet50
from torchvision.models.efficientnet import MBConv
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import StochasticDepth

import compscale

MOBILENET_V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                        [6, 320, 1, 1]]


def test_resnet50_depth_2_is_resnet_6_8_12_6() -> None:
    scaled = compscale.scale(resnet50(), depth=2)
    assert_same_architecture(scaled, ResNet(Bottleneck, [6, 8, 12, 6]))
    assert type(scaled) is ResNet and type(scaled.layer1[5]) is Bottleneck
    assert [(s.blocks_before, s.blocks_after) for s in scaled.scaling.stages] == [(3, 6), (4, 8), (6, 12), (3, 6)]
    assert scaled.scaling.input_size == (224, 224)


def test_resnet18_depth_1_5_is_resnet_3_3_3_3() -> None:
    assert_same_architecture(compscale.scale(resnet18(), depth=1.5), ResNet(BasicBlock, [3, 3, 3, 3]))


@pytest.mark.parametrize("d", [1.5, pytest.param(4, marks=pytest.mark.slow)])
def test_mobilenet_v2_depth_matches_ceil_n_d(d: float) -> None:
    scaled = compscale.scale(mobilenet_v2(), depth=d)
    setting = [[t, c, math.ceil(n * d), s] for t, c, n, s in MOBILENET_V2_SETTING]
    reference = mobilenet_v2(inverted_residual_setting=setting)
    assert_same_architecture(scaled, reference)
    # the one-block stages (16 and 320 channels) gained real residual blocks: the synthesized repeat adds its input
    x = torch.randn(2, 320, 7, 7)
    block = scaled.features[-2]  # the last block of the 320-channel stage (features[-1] is the head)
    assert block(x).shape == x.shape


def test_efficientnet_b0_depth_1_1_is_b1() -> None:
    scaled = compscale.scale(efficientnet_b0(), depth=1.1)
    reference = efficientnet_b1()
    assert_same_architecture(scaled, reference)
    # every module of the same class, the blocks synthesized for the one-block stages included (MBConv)
    assert [(n, type(m)) for n, m in scaled.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
    rates = [m.p for m in scaled.modules() if isinstance(m, StochasticDepth)]
    assert rates == pytest.approx([m.p for m in reference.modules() if isinstance(m, StochasticDepth)])


def test_synthesized_repeat_drops_path_and_adds_input_back() -> None:
    scaled = compscale.scale(efficientnet_b0(), depth=2)  # stage 1 gains a block made from its only block
    new_block = scaled.features[1][1]
    assert type(new_block) is MBConv and new_block.use_res_connect  # the model's own class, residual switched on
    assert isinstance(new_block.stochastic_depth, StochasticDepth) and new_block.stochastic_depth.p > 0
    new_block.eval()
    x = torch.randn(1, 16, 112, 112)
    torch.testing.assert_close(new_block(x), new_block.block(x) + x)  # adds its input back
    new_block.train()  # and drops its path in training: some rows of a batch lose the branch, some keep it
    new_block.stochastic_depth.p = 0.5
    x = torch.randn(16, 16, 8, 8)
    dropped = [bool((row_y == row_x).all()) for row_y, row_x in zip(new_block(x), x)]
    assert any(dropped) and not all(dropped)


def test_new_blocks_keep_names_and_take_next_index() -> None:
    base = resnet50()
    scaled = compscale.scale(base, depth=2)
    assert scaled.scaling.stages[0].new_blocks == ("layer1.3", "layer1.4", "layer1.5")
    for name, value in base.state_dict().items():  # every original tensor is still there, same name, same value
        assert torch.equal(scaled.state_dict()[name], value)


def test_new_blocks_are_initialised_like_the_constructor() -> None:
    scaled = compscale.scale(resnet50(), depth=2)
    reference = ResNet(Bottleneck, [6, 8, 12, 6])
    for path in ("layer3.11.conv2", "layer1.5.conv3"):
        got, want = scaled.get_submodule(path).weight, reference.get_submodule(path).weight
        assert got.std().item() == pytest.approx(want.std().item(), rel=0.1)  # kaiming_normal_, fan_out
    bn = scaled.get_submodule("layer2.7.bn3")
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0) and torch.all(bn.running_var == 1)


def test_zero_init_residual_is_kept_in_new_blocks() -> None:
    scaled = compscale.scale(resnet50(zero_init_residual=True), depth=1.5)
    assert torch.all(scaled.layer1[-1].bn3.weight == 0)


def test_result_runs_in_train_and_eval_and_state_dict_reloads() -> None:
    scaled = compscale.scale(mobilenet_v2(), depth=1.5)
    x = torch.randn(2, 3, 64, 64)
    scaled.train()
    scaled(x).sum().backward()
    scaled.eval()
    with torch.no_grad():
        y = scaled(x)
    again = compscale.scale(mobilenet_v2(), depth=1.5)
    again.load_state_dict(scaled.state_dict())
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(x), y)


def test_depth_1_and_phi_0_compute_the_same_function() -> None:
    base = resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = base(x)
        for scaled in (compscale.scale(base, depth=1.0), compscale.scale(base, phi=0)):
            assert torch.equal(scaled.eval()(x), want)


def test_caller_model_is_never_modified() -> None:
    base = mobilenet_v2()
    base.train()
    base.features[3].eval()  # a mixed train/eval state must survive too
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modes = [m.training for m in base.modules()]
    n_modules = len(list(base.modules()))
    compscale.scale(base, depth=2, width=1.4)
    assert [m.training for m in base.modules()] == modes
    assert len(list(base.modules())) == n_modules
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_result_keeps_device_and_dtype() -> None:
    base = resnet18().to(torch.float64)
    scaled = compscale.scale(base, depth=1.5, width=1.25)
    assert {p.dtype for p in scaled.parameters()} == {torch.float64}
    assert {p.device for p in scaled.parameters()} == {torch.device("cpu")}


def test_depth_below_1_removes_nothing_below_one_block() -> None:
    scaled = compscale.scale(resnet50(), depth=0.5)
    assert [len(layer) for layer in (scaled.layer1, scaled.layer2, scaled.layer3, scaled.layer4)] == [2, 2, 3, 2]
    assert isinstance(scaled, nn.Module)


class _DenseLayer(nn.Module):
    """DenseNet-BC's layer: BN-ReLU-conv1x1 (4k) -BN-ReLU-conv3x3 (k), its output concatenated to its input."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))
        return torch.cat([x, out], 1)


class _DenseNet(nn.Module):
    def __init__(self, layers: int, growth: int = 32, stem: int = 64) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.block = nn.Sequential(*(_DenseLayer(stem + i * growth, growth) for i in range(layers)))
        self.norm = nn.BatchNorm2d(stem + layers * growth)
        self.fc = nn.Linear(stem + layers * growth, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.block(self.conv0(x)))).mean((2, 3)))


def test_dense_stage_deepens_until_it_costs_depth_times_as_much() -> None:
    # layer i reads 64 + 32 i channels: 32 x 32 positions x 128 x (64 + 32 i) for its 1x1 conv, 128 x 9 x 32 for its 3x3
    def stage_macs(n: int) -> int:
        return sum(32 * 32 * 128 * ((64 + 32 * i) + 9 * 32) for i in range(n))

    scaled = compscale.scale(_DenseNet(6), depth=2, input_size=32)
    n = scaled.scaling.stages[0].blocks_after
    assert stage_macs(n) >= 2 * stage_macs(6) > stage_macs(n - 1)  # the fewest layers costing 2x
    assert n == 11  # counting layers, ceil(6 * 2) = 12, would cost 2.44x
    assert_same_architecture(scaled, _DenseNet(11), input_size=32)  # the final norm and fc take 64 + 11 * 32
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert compscale.plan(_DenseNet(6), depth=2, input_size=32).stages[0].blocks_after == 11


class _NoisyInTraining(nn.Module):
    """A block whose forward adds noise only while training, with no residual flag to switch on."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.training:
            y = y + 0.1 * torch.randn_like(y)
        return y.relu()


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(self.conv(x)).relu()


class _LoneNoisyStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stage1 = nn.Sequential(_NoisyInTraining(8, 16))
        self.stage2 = nn.Sequential(_Res(16), _Res(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def test_a_repeat_that_would_freeze_a_training_branch_is_an_error() -> None:
    """A graph copy of the lone block would keep its eval-mode ops only: a typed error, not a silent difference."""
    with pytest.raises(compscale.RewriteError, match=r"stage1\.0(.|\n)*training(.|\n)*Hint: .*stages="):
        compscale.scale(_LoneNoisyStage(), depth=2, input_size=32)
    scaled = compscale.scale(_LoneNoisyStage(), depth=2, input_size=32, stages=["stage2"])
    assert len(scaled.stage1) == 1 and len(scaled.stage2) == 4


class _Wrapper(nn.Module):
    """A unit that calls its residual block by name (timm's SwiftFormerEncoder and its local_representation)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.local = TinyResidual(c)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x))


class _SequentialThenByName(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(TinyResidual(8), TinyResidual(8), _Wrapper(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_a_block_called_by_name_after_a_container_stage_that_grows_is_deepened_where_it_is() -> None:
    """Blocks inserted into ``blocks`` renumber the wrapper after them (blocks.2 -> blocks.4): the block called by
    name inside it is still found and followed by its new copies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the lone block is deepened on the evidence of its class
        scaled = compscale.scale(_SequentialThenByName(), depth=2, input_size=16)
    assert [type(b).__name__ for b in scaled.blocks] == ["TinyResidual"] * 4 + ["_Wrapper"]
    wrapper = scaled.blocks[4]
    assert [n for n, _ in wrapper.named_children()] == ["local", "local_0", "proj"]
    with torch.no_grad():
        assert scaled(torch.randn(1, 3, 16, 16)).shape == (1, 10)
