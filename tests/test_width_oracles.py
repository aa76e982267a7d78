"""Widths an expert would choose: scaled networks equal the ones their libraries build at that multiplier.

Each test scales a base network with compscale and compares every parameter and buffer's name and shape with the
reference library's own network at the same multiplier (built by its constructor, or, where the library has no
multiplier argument, by its constructor with every width rounded as the references round them). Any width that
differs, anywhere, fails the comparison.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import (
    mnasnet0_5,
    mnasnet0_75,
    mnasnet1_0,
    mobilenet_v2,
    mobilenet_v3_large,
    resnet18,
    resnet34,
    resnet50,
)
from torchvision.models._utils import _make_divisible
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import compscale
from compscale.analyse.channels import analyse_channels
from compscale.trace import trace


def architecture(model: nn.Module, numbered: bool = True) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter and buffer as (name, shape), in order. ``numbered=False`` blanks the indices in names
    (a library that numbers its blocks over the whole network, as MONAI's and efficientnet-pytorch's do)."""
    return [(k if numbered else re.sub(r"\.\d+", ".#", k), tuple(v.shape)) for k, v in model.state_dict().items()]


def expert_resnet(block: type[BasicBlock | Bottleneck], layers: list[int], w: float) -> ResNet:
    """torchvision's ResNet with the stem and every stage's planes ``make_divisible(p * w)``: the network an expert
    builds at width ``w`` (a basic-block stage has one width, its downsampling block's conv1 included)."""
    stem = _make_divisible(64 * w, 8)

    class Scaled(ResNet):
        def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1,
                        dilate: bool = False) -> nn.Sequential:
            if planes == 64:  # layer1 reads the scaled stem
                self.inplanes = stem
            return super()._make_layer(block, _make_divisible(planes * w, 8), blocks, stride, dilate)

    net = Scaled(block, layers)
    net.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(stem)
    net.fc = nn.Linear(_make_divisible(512 * w, 8) * block.expansion, 1000)
    return net


_RESNETS = {
    "resnet18": (resnet18, BasicBlock, [2, 2, 2, 2]),
    "resnet34": (resnet34, BasicBlock, [3, 4, 6, 3]),
    "resnet50": (resnet50, Bottleneck, [3, 4, 6, 3]),
}


def _expert(name: str, w: float) -> nn.Module:
    if name == "mobilenet_v2":
        return mobilenet_v2(width_mult=w)
    _, block, layers = _RESNETS[name]
    return expert_resnet(block, layers, w)


def _base(name: str) -> nn.Module:
    return mobilenet_v2() if name == "mobilenet_v2" else _RESNETS[name][0]()


_NETS = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]


@pytest.mark.parametrize("phi", [1, 3])
@pytest.mark.parametrize("name", _NETS)
def test_width_equals_the_expert_network(name: str, phi: int) -> None:
    w = 1.1 ** phi
    assert architecture(compscale.scale(_base(name), width=w)) == architecture(_expert(name, w))


@pytest.mark.slow
@pytest.mark.parametrize("phi", [2, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("name", _NETS)
def test_width_equals_the_expert_network_at_every_phi(name: str, phi: int) -> None:
    w = 1.1 ** phi
    assert architecture(compscale.scale(_base(name), width=w)) == architecture(_expert(name, w))


def test_basic_block_stage_has_one_width() -> None:
    """The user's report: at width 1.1 layer3.0.conv1 was 288 (2 x its 144 input) in a 280-wide stage."""
    net = compscale.scale(resnet18(), width=1.1)
    for layer in (net.layer2, net.layer3, net.layer4):
        widths = {m.out_channels for m in layer.modules() if isinstance(m, nn.Conv2d)}
        assert len(widths) == 1, widths


# --- narrow widths: the head stays ---------------------------------------------------------------------------


@pytest.mark.parametrize("w", [0.5, 0.75])
def test_narrow_mobilenet_v2_keeps_its_head(w: float) -> None:
    """torchvision (as the paper, timm and pytorchcv) keeps the 1280 head below width 1."""
    assert architecture(compscale.scale(mobilenet_v2(), width=w)) == architecture(mobilenet_v2(width_mult=w))


@pytest.mark.parametrize(("w", "reference"), [(0.5, mnasnet0_5), (0.75, mnasnet0_75)])
def test_narrow_mnasnet_equals_torchvision(w: float, reference: type[nn.Module]) -> None:
    # torchvision's MNASNet rounds with _round_to_multiple_of(v, 8, 0.9): nearest multiple of 8, up if that loses
    # more than 10%, which is make_divisible(v, 8); so no round_width= is needed
    assert architecture(compscale.scale(mnasnet1_0(), width=w)) == architecture(reference())


@pytest.mark.parametrize(("w", "name"), [(0.5, "mobilenetv2_wd2"), (0.75, "mobilenetv2_w3d4")])
def test_narrow_pytorchcv_mobilenet_v2(w: float, name: str) -> None:
    """pytorchcv truncates widths (``int(c * w)``) and keeps its 1280 head below width 1; its head pools with
    ``nn.AvgPool2d(7)`` (the whole map at 224) and classifies with a 1x1 conv."""
    get_model = pytest.importorskip("pytorchcv.model_provider").get_model
    scaled = compscale.scale(get_model("mobilenetv2_w1", pretrained=False), width=w, round_width=lambda v, d: int(v))
    assert architecture(scaled) == architecture(get_model(name, pretrained=False))


@pytest.mark.parametrize("w", [0.75, pytest.param(0.54, marks=pytest.mark.slow)])
def test_narrow_efficientnet_keeps_its_head_as_tinynet(w: float) -> None:
    """timm's TinyNet (EfficientNet-B0 below width 1) keeps its 1280 head; its stem is fixed at 32 by its builder
    (``fix_stem=True``), which a user says with ``fixed=``."""
    timm = pytest.importorskip("timm")
    from timm.models.efficientnet import _gen_tinynet

    scaled = compscale.scale(timm.create_model("efficientnet_b0"), width=w, fixed=["conv_stem"])
    assert architecture(scaled) == architecture(_gen_tinynet("tinynet_b", w, 1.0))


def test_mobilenet_v3_head_conv_still_scales() -> None:
    """MobileNetV3's last conv (960) is no head that stays: a Linear comes between its pool and the classifier,
    and torchvision scales it (6 x the scaled 160)."""
    scaled = compscale.scale(mobilenet_v3_large(), width=0.75)
    reference = mobilenet_v3_large(width_mult=0.75)
    assert scaled.features[16][0].out_channels == reference.features[16][0].out_channels == 720
    assert scaled.classifier[0].in_features == 720


# --- pooled (squeeze) convs read from the graph, not from a 1x1 map ------------------------------------------


def _monai_reference(k: int, dims: int) -> tuple[nn.Module, tuple[float, float]]:
    nets = pytest.importorskip("monai.networks.nets")
    from monai.networks.nets.efficientnet import efficientnet_params

    w, d = efficientnet_params[f"efficientnet-b{k}"][:2]
    return nets.EfficientNetBN(f"efficientnet-b{k}", spatial_dims=dims, pretrained=False), (w, d)


def _check_monai(k: int, dims: int, size: int) -> None:
    nets = pytest.importorskip("monai.networks.nets")
    base = nets.EfficientNetBN("efficientnet-b0", spatial_dims=dims, pretrained=False)
    reference, (w, d) = _monai_reference(k, dims)
    example = (torch.randn(1, 3, *[size] * dims),)
    scaled = compscale.scale(base, width=w, depth=d, resolution=1, example_inputs=example)
    assert architecture(scaled, numbered=False) == architecture(reference, numbered=False)


@pytest.mark.parametrize("k", [2, 4])
def test_monai_efficientnet_traced_small(k: int) -> None:
    """At 32 px the last stages' maps are 1x1; their 1x1 convs are still spatial (B2's 208, not 210)."""
    _check_monai(k, 2, 32)


@pytest.mark.slow
@pytest.mark.parametrize(("k", "dims", "size"), [
    *((k, dims, size) for k in (1, 2, 3, 4) for dims in (2, 3) for size in (32, 64)
      if (k, dims, size) not in ((2, 2, 32), (4, 2, 32))),
])
def test_monai_efficientnet_every_variant(k: int, dims: int, size: int) -> None:
    _check_monai(k, dims, size)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_efficientnet_pytorch_traced_small(k: int) -> None:
    lib = pytest.importorskip("efficientnet_pytorch")
    from efficientnet_pytorch.utils import efficientnet_params

    w, d = efficientnet_params(f"efficientnet-b{k}")[:2]
    scaled = compscale.scale(lib.EfficientNet.from_name("efficientnet-b0"), width=w, depth=d, resolution=1,
                             example_inputs=(torch.randn(1, 3, 32, 32),))
    reference = lib.EfficientNet.from_name(f"efficientnet-b{k}")
    assert architecture(scaled, numbered=False) == architecture(reference, numbered=False)


class _SE(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        hidden = 4 * cin
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU())
        self.se = _SE(hidden, max(1, cin // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


def _se_net(c: tuple[int, int, int, int]) -> nn.Sequential:
    """Stem, two stages of SE inverted residuals (the second ends at 1x1 for an 8 px input), head, classifier."""
    return nn.Sequential(
        nn.Conv2d(3, c[0], 3, 2, 1, bias=False), nn.BatchNorm2d(c[0]), nn.ReLU(),
        nn.Sequential(_InvertedResidual(c[0], c[1], 2), _InvertedResidual(c[1], c[1], 1)),
        nn.Sequential(_InvertedResidual(c[1], c[2], 2), _InvertedResidual(c[2], c[2], 1),
                      _InvertedResidual(c[2], c[2], 1)),
        nn.Conv2d(c[2], c[3], 1, bias=False), nn.BatchNorm2d(c[3]), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[3], 10),
    )


_SE_BASE = (16, 24, 40, 160)


def test_pooled_layers_do_not_depend_on_the_trace_size() -> None:
    net = _se_net(_SE_BASE)
    small, large = (analyse_channels(trace(net, (1, 3, s, s))) for s in (8, 64))
    pooled = {path for path, layer in large.layers.items() if layer.pooled}
    assert pooled == {path for path, layer in small.layers.items() if layer.pooled}
    assert pooled == {p for p in large.layers if p.endswith(("fc1", "fc2"))} | {"10"}


@pytest.mark.parametrize("phi", [1, 3, 8])
def test_se_net_widths_whatever_the_trace_size(phi: int) -> None:
    """Traced where the last stage's maps are 1x1 (8 px) or not (64 px), the widths are the hand-built ones:
    every width make_divisible(c * w), hidden 4 x in, squeeze in // 4."""
    w = 1.1 ** phi
    expected = architecture(_se_net(tuple(_make_divisible(c * w, 8) for c in _SE_BASE)))  # type: ignore[arg-type]
    for size in (8, 64):
        scaled = compscale.scale(_se_net(_SE_BASE), width=w, example_inputs=(torch.randn(1, 3, size, size),))
        assert architecture(scaled) == expected, size


@pytest.mark.parametrize(("name", "bottleneck", "widths", "units"), [
    ("resnet18", False, [64, 128, 256, 512], [2, 2, 2, 2]),
    pytest.param("resnet50", True, [256, 512, 1024, 2048], [3, 4, 6, 3], marks=pytest.mark.slow),
])
def test_pytorchcv_resnet_at_width_2_is_its_own_resnet_with_doubled_channels(
        name: str, bottleneck: bool, widths: list[int], units: list[int]) -> None:
    model_provider = pytest.importorskip("pytorchcv.model_provider", reason="the test extra installs pytorchcv")
    from pytorchcv.models.resnet import ResNet

    scaled = compscale.scale(model_provider.get_model(name, pretrained=False), width=2)
    reference = ResNet(channels=[[2 * c] * n for c, n in zip(widths, units)], init_block_channels=128,
                       bottleneck=bottleneck, conv1_stride=True)
    assert {k: tuple(v.shape) for k, v in scaled.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in reference.state_dict().items()}
