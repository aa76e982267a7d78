"""Stages from evidence, not from containers: a unit is repeated where the model shows it is repeatable.

Each pattern is built the way a library writes it; the deepened model is compared with the same family built by
hand with the deeper unit counts (``ceil(n * d)`` per stage, the published rule compscale follows).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
from conftest import assert_same_architecture, leaf_layers
from torch import nn

import compscale
from compscale.analyse.stages import find_stages
from compscale.trace import trace

# -- a stage module whose forward loops over a list of plain units (pytorchcv style) ---------------------------------


class Unit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class LoopStage(nn.Module):
    def __init__(self, units: list[nn.Module]) -> None:
        super().__init__()
        self.units = nn.ModuleList(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x)
        return x


class LoopNet(nn.Module):
    """A plain net: a stem unit, then stage modules of [1, 2, 2, 6, 2] units (the first of a stage downsamples)."""

    def __init__(self, counts: tuple[int, ...] = (1, 2, 2, 6, 2)) -> None:
        super().__init__()
        self.init_block = Unit(3, 16, 2)
        stages, cin = [], 16
        for i, (c, n) in enumerate(zip((24, 32, 48, 64, 96), counts)):
            stages.append(LoopStage([Unit(cin if j == 0 else c, c, (1 if i == 0 else 2) if j == 0 else 1)
                                     for j in range(n)]))
            cin = c
        self.features = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.init_block(x)).mean((2, 3)))


@pytest.mark.parametrize("depth", [1.2, 2.0])
def test_a_stage_module_looping_over_its_units_is_looked_into_not_copied(depth: float) -> None:
    counts = (1, 2, 2, 6, 2)
    scaled = compscale.scale(LoopNet(counts), depth=depth, input_size=64)
    deeper = tuple(math.ceil(n * depth) for n in counts)
    assert [len(stage.units) for stage in scaled.features] == list(deeper)  # not [1, 1, 2, 2, ...]: no stage copied
    assert_same_architecture(scaled, LoopNet(deeper), input_size=64)


# -- a stem container, and a one-block stage known by its place (EfficientNet written as pytorchcv does) -------------


class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activ = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activ(self.bn(self.conv(x)))


class InitBlock(nn.Module):
    def __init__(self, cout: int) -> None:
        super().__init__()
        self.conv = ConvBlock(3, cout, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DwsUnit(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual = cin == cout
        self.dw_conv = ConvBlock(cin, cin, 3, groups=cin)
        self.pw_conv = ConvBlock(cin, cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw_conv(self.dw_conv(x))
        return x + y if self.residual else y


class InvResUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual = cin == cout and stride == 1
        self.conv1 = ConvBlock(cin, 4 * cin)
        self.conv2 = ConvBlock(4 * cin, 4 * cin, 3, stride, groups=4 * cin)
        self.conv3 = ConvBlock(4 * cin, cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.conv2(self.conv1(x)))
        return x + y if self.residual else y


class TinyEfficientNet(nn.Module):
    def __init__(self, counts: tuple[int, int, int] = (1, 2, 2)) -> None:
        super().__init__()
        n1, n2, n3 = counts
        self.features = nn.Sequential(OrderedDict(
            init_block=InitBlock(16),
            stage1=nn.Sequential(*[DwsUnit(16 if i == 0 else 8, 8) for i in range(n1)]),
            stage2=nn.Sequential(*[InvResUnit(8 if i == 0 else 16, 16, 2 if i == 0 else 1) for i in range(n2)]),
            stage3=nn.Sequential(*[InvResUnit(16 if i == 0 else 24, 24, 2 if i == 0 else 1) for i in range(n3)]),
        ))
        self.output = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x).mean((2, 3)))


def test_a_stem_container_is_no_stage_and_a_lone_first_block_is_a_guess_named_once() -> None:
    table = find_stages(trace(TinyEfficientNet(), (1, 3, 32, 32)))
    assert [(s.name, s.evidence, s.guessed) for s in table] == [
        ("features.stage1", "place", True), ("features.stage2", "repeats", False),
        ("features.stage3", "repeats", False)]
    assert "place (guessed)" in str(table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaled = compscale.scale(TinyEfficientNet(), depth=2, input_size=32)
    guesses = [w for w in caught if issubclass(w.category, compscale.GuessWarning)]
    assert len(guesses) == 1
    assert "features.stage1" in str(guesses[0].message) and "stage2" not in str(guesses[0].message)
    # the stem keeps its one conv; the lone block gains a residual repeat of its own class
    assert_same_architecture(scaled, TinyEfficientNet((2, 4, 4)), input_size=32)


def test_strict_refuses_a_guessed_stage_and_accepts_stages_named_by_the_user() -> None:
    with pytest.raises(compscale.GuessError, match=r"features\.stage1 \(a lone block known only by its container"):
        compscale.scale(TinyEfficientNet(), depth=2, input_size=32, strict=True)
    with pytest.raises(compscale.GuessError, match="strict=True"):
        compscale.plan(TinyEfficientNet(), depth=2, input_size=32, strict=True)
    assert issubclass(compscale.GuessError, compscale.CompscaleError)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compscale.GuessWarning)
        scaled = compscale.scale(TinyEfficientNet(), depth=2, input_size=32, strict=True,
                                 stages=["features.stage1", "features.stage2"])
        compscale.scale(TinyEfficientNet(), width=1.5, input_size=32, strict=True)  # no depth: nothing guessed
    assert [len(scaled.features.stage1), len(scaled.features.stage2), len(scaled.features.stage3)] == [2, 4, 2]


# -- residual blocks that are generic containers (torch7-converted nets) ---------------------------------------------


class ConcatTable(nn.Module):
    """torch7's ConcatTable: the outputs of its branches as a list (``sums=True``: their sum, as some converters do)."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module, sums: bool) -> None:
        super().__init__()
        self.branch, self.shortcut, self.sums = branch, shortcut, sums

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.branch(x) + self.shortcut(x) if self.sums else [self.branch(x), self.shortcut(x)]


class CAddTable(nn.Module):
    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0] + xs[1]


class Torch7Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torch7_block(cin: int, cout: int, stride: int, sums: bool) -> nn.Sequential:
    branch = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                           nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
    shortcut = (Torch7Identity() if cin == cout and stride == 1
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
    return nn.Sequential(ConcatTable(branch, shortcut, sums), nn.Identity() if sums else CAddTable(), nn.ReLU())


class Torch7ResNet(nn.Module):
    def __init__(self, counts: tuple[int, ...] = (2, 2, 2), sums: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        cin = 16
        for i, (c, n) in enumerate(zip((16, 32, 64), counts)):
            layers.append(nn.Sequential(*[torch7_block(cin if j == 0 else c, c, (1 if i == 0 else 2) if j == 0 else 1,
                                                       sums) for j in range(n)]))
            cin = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@pytest.mark.parametrize("sums", [False, True], ids=["list-then-CAddTable", "summing-ConcatTable"])
@pytest.mark.parametrize("depth", [1.5, 2.0])
def test_residual_blocks_that_are_generic_containers_are_the_units(sums: bool, depth: float) -> None:
    table = find_stages(trace(Torch7ResNet(sums=sums), (1, 3, 32, 32)))
    assert [s.name for s in table] == ["features.3", "features.4", "features.5"]  # not `features` whole
    scaled = compscale.scale(Torch7ResNet(sums=sums), depth=depth, input_size=32)
    assert not scaled._forward_hooks and not any(m._forward_hooks for m in scaled.modules())  # no appended copy
    assert_same_architecture(scaled, Torch7ResNet((math.ceil(2 * depth),) * 3, sums), input_size=32)


# -- a concat of bottlenecks (YOLOv8's C2f), with one activation module shared by every conv -------------------------


class YoloConv(nn.Module):
    default_act = nn.SiLU()  # one module for every conv, as ultralytics has it

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = self.default_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = YoloConv(c, c, 3), YoloConv(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = YoloConv(c1, 2 * self.c)
        self.cv2 = YoloConv((2 + n) * self.c, c2)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class YoloBackbone(nn.Module):
    def __init__(self, n: tuple[int, ...] = (1, 2, 2, 1)) -> None:
        super().__init__()
        layers: list[nn.Module] = [YoloConv(3, 16, 3, 2)]
        cin = 16
        for c, k in zip((32, 64, 128, 256), n):
            layers += [YoloConv(cin, c, 3, 2), C2f(c, c, k)]
            cin = c
        self.model = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(x).mean((2, 3)))


@pytest.mark.parametrize("depth", [1.2, 2.0, 3.0])
def test_c2f_grows_its_bottleneck_list_and_its_reader_takes_the_new_channels(depth: float) -> None:
    """As ultralytics' own depth multiplier builds it, with compscale's rule n' = ceil(n * d) (ultralytics rounds:
    max(round(n * d), 1), which differs at n * d = 1.2): cv2 reads (2 + n') * c channels."""
    n = (1, 2, 2, 1)
    base = YoloBackbone(n).eval()
    assert [s.name for s in find_stages(trace(base, (1, 3, 64, 64)))] == ["model.2.m", "model.4.m", "model.6.m",
                                                                         "model.8.m"]
    scaled = compscale.scale(base, depth=depth, input_size=64)
    reference = YoloBackbone(tuple(math.ceil(k * depth) for k in n))
    assert [scaled.model[i].cv2.conv.in_channels for i in (2, 4, 6, 8)] == [
        reference.model[i].cv2.conv.in_channels for i in (2, 4, 6, 8)]
    # conftest's assert_same_architecture counts adds on a torch.fx trace, which C2f's chunk iteration defeats
    assert leaf_layers(scaled) == leaf_layers(reference)
    got, want = compscale.profile(scaled, 64), compscale.profile(reference, 64)
    assert (got.params, got.macs) == (want.params, want.macs)
    x = torch.randn(2, 3, 64, 64)
    assert scaled(x).shape == (2, 10)


def test_c2f_scales_in_width_too_and_grows_exactly_with_preserve() -> None:
    base = YoloBackbone().eval()
    scaled = compscale.scale(base, phi=1, input_size=64)
    block = scaled.model[4]
    c = block.m[0].cv1.conv.in_channels  # the half of cv1's output each bottleneck reads
    assert (block.cv1.conv.out_channels, block.cv2.conv.in_channels) == (2 * c, (2 + len(block.m)) * c)
    assert (len(block.m), c) == (3, 36)  # ceil(2 * 1.2) bottlenecks; c2 = 64 * 1.1 -> 72, and C2f's c = c2 // 2
    plan = compscale.plan(base, phi=1, input_size=64)
    assert plan.macs == compscale.profile(scaled, scaled.scaling.input_size).macs
    grown = compscale.scale(base, depth=2, input_size=64, init="preserve")
    x = torch.randn(2, 3, 64, 64)
    assert not grown.scaling.inexact
    assert torch.allclose(grown.eval()(x), base(x), atol=1e-5)


# -- torchvision's AlexNet and Inception v3: units an expert would repeat -------------------------------------------


@pytest.mark.parametrize(("name", "size"), [("alexnet", 224),
                                             pytest.param("inception_v3", 299, marks=pytest.mark.slow)])
def test_alexnet_and_inception_v3_scale_at_phi_1_by_about_twice_the_macs(name: str, size: int) -> None:
    from torchvision import models

    kwargs = {"init_weights": False} if name == "inception_v3" else {}
    model = getattr(models, name)(weights=None, **kwargs).eval()
    base = compscale.profile(model, (size, size)).macs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compscale.GuessWarning)  # AlexNet's lone 5x5 conv is a guess, named
        scaled = compscale.scale(model, phi=1, input_size=size)
    stages = [(s.name, s.blocks_before, s.blocks_after) for s in scaled.scaling.stages]
    if name == "inception_v3":  # Mixed_6b..6e: four identical shape-preserving units; the stem convs are no stage
        assert stages == [("Mixed_5b..Mixed_5d", 3, 4), ("Mixed_6b..Mixed_6e", 4, 5), ("Mixed_7b..Mixed_7c", 2, 3)]
    else:  # the 11x11 stride-4 stem cannot be repeated at stride 1 (its padding shrinks the map): no stage
        assert stages == [("features.3..features.4", 1, 2), ("features.6..features.11", 3, 4)]
    macs = compscale.profile(scaled, scaled.scaling.input_size).macs
    assert 0.8 <= macs / (2 * base) <= 1.75
    assert scaled.eval()(torch.randn(1, 3, *scaled.scaling.input_size)).shape == (1, 1000)


# -- pytorchcv's own families -----------------------------------------------------------------------------------------

pytorchcv = pytest.importorskip("pytorchcv", reason="pytorchcv is in the test extra")

# pytorchcv/models/efficientnet.py, get_efficientnet: (width_factor, depth_factor, in_size)
EFFICIENTNET = {1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260), 3: (1.2, 1.4, 300), 4: (1.4, 1.8, 380), 5: (1.6, 2.2, 456),
                6: (1.8, 2.6, 528), 7: (2.0, 3.1, 600)}


def _layers(model: nn.Module) -> list[tuple[object, ...]]:
    """The leaf layers with weights or buffers in order: class, parameter shapes, stride, padding, groups."""
    return [(type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)),
             getattr(m, "stride", None), getattr(m, "padding", None), getattr(m, "groups", None))
            for m in model.modules()
            if next(m.children(), None) is None and (any(True for _ in m.parameters(recurse=False))
                                                     or any(True for _ in m.buffers(recurse=False)))]


@pytest.mark.parametrize("k", [1, *(pytest.param(k, marks=pytest.mark.slow) for k in range(2, 8))])
def test_pytorchcv_efficientnet_b0_scales_to_its_own_b1_to_b7_with_no_stages_argument(k: int) -> None:
    from pytorchcv.model_provider import get_model

    width, depth, size = EFFICIENTNET[k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compscale.GuessWarning)  # stage1's lone block is named as a guess
        scaled = compscale.scale(get_model("efficientnet_b0", pretrained=False), width=width, depth=depth,
                                 resolution=size / 224, resolution_divisor=4)
    reference = get_model(f"efficientnet_b{k}", pretrained=False)
    assert scaled.scaling.input_size == (size, size)
    assert _layers(scaled) == _layers(reference)  # the stem keeps its one conv (was deepened with a dense 3x3)
    assert sum(1 for _ in scaled.modules()) == sum(1 for _ in reference.modules())


def test_pytorchcv_resnet18_at_depth_2_is_its_own_resnet_with_twice_the_units() -> None:
    from pytorchcv.model_provider import get_model
    from pytorchcv.models.resnet import ResNet

    scaled = compscale.scale(get_model("resnet18", pretrained=False), depth=2)
    reference = ResNet(channels=[[c] * 4 for c in (64, 128, 256, 512)], init_block_channels=64, bottleneck=False,
                       conv1_stride=True)
    assert_same_architecture(scaled, reference)
