"""Whole detectors in one call: backbone, feature pyramid, heads and input size scaled together (compscale.detection).

What a user checks: the same class back; the backbone's body as ``scale()`` gives the classifier trunk; the FPN and
heads at EfficientDet's width (``make_divisible(C * 1.35**phi, 8)``) with ``floor(phi / 3)`` more layers per head
tower; the transform resizing to ``r`` times its size; finite losses for a training step and detections in eval;
MACs of the network part near the rule's ideal. The torchvision zoo at phi = 1 and 3 is slow; a user-built
RetinaNet (small backbone + torchvision FPN + RetinaNetHead) runs by default.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from conftest import TinyResidual
from torch import nn
from torchvision.models import detection as D
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import compscale
from compscale.planning.rounding import make_divisible


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _images(n: int = 2, h: int = 120, w: int = 100) -> list[torch.Tensor]:
    g = _generator()
    return [torch.rand(3, h, w, generator=g) for _ in range(n)]


def _targets(n: int = 2, h: int = 120, w: int = 100) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        masks = torch.zeros(1, h, w, dtype=torch.uint8)
        masks[:, 20:90, 10:70] = 1
        out.append({"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0]]), "labels": torch.tensor([1]), "masks": masks})
    return out


def _trains_and_detects(model: nn.Module) -> dict[str, float]:
    """One training step's losses (all finite, gradients reach every parameter that has one) and an eval forward
    that returns one detection dict per image."""
    model.train()
    losses = model(_images(), _targets())
    total = sum(losses.values())
    total.backward()
    model.eval()
    with torch.no_grad():
        out = model(_images(1))
    assert isinstance(out, list) and len(out) == 1 and {"boxes", "labels", "scores"} <= set(out[0])
    values = {k: float(v.detach()) for k, v in losses.items()}
    assert all(math.isfinite(v) for v in values.values()), values
    return values


# -- a user's own detector: small backbone + torchvision FPN + RetinaNetHead in a RetinaNet -------------------------


class _Backbone(nn.Module):
    """Three residual stages returning their maps (C3..C5), then an FPN with P6/P7: what a user builds."""

    def __init__(self, fpn_channels: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        chans = (16, 32, 64, 128)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(), TinyResidual(b),
                          TinyResidual(b))
            for a, b in itertools.pairwise(chans))
        self.fpn = FeaturePyramidNetwork([32, 64, 128], fpn_channels, LastLevelP6P7(fpn_channels, fpn_channels))
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        maps = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            maps[str(i)] = x
        return self.fpn(maps)


def _user_retinanet() -> D.RetinaNet:
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64, 128, 256)), ((0.5, 1.0, 2.0),) * 5)
    return D.RetinaNet(_Backbone(), num_classes=5, min_size=128, max_size=128, anchor_generator=anchors,
                       head=RetinaNetHead(64, anchors.num_anchors_per_location()[0], 5))


@pytest.mark.parametrize("phi", [1, 3])
def test_user_built_retinanet_scales_whole(phi: int) -> None:
    model = _user_retinanet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=phi)
    assert type(big) is D.RetinaNet and big is not model
    neck = make_divisible(64 * 1.35**phi, 8)  # EfficientDet's BiFPN widths: 88 at phi=1, 160 at phi=3
    assert neck == {1: 88, 3: 160}[phi]
    fpn = big.backbone.fpn
    assert [b[0].out_channels for b in fpn.inner_blocks] == [neck] * 3
    assert [b[0].out_channels for b in fpn.layer_blocks] == [neck] * 3
    assert fpn.extra_blocks.p6.out_channels == fpn.extra_blocks.p7.out_channels == neck
    for head in (big.head.classification_head, big.head.regression_head):
        assert len(head.conv) == 4 + phi // 3
        assert {c[0].in_channels for c in head.conv} == {c[0].out_channels for c in head.conv} == {neck}
    assert big.head.classification_head.cls_logits.out_channels == 3 * 5  # anchors x classes: kept
    prior = -math.log((1 - 0.01) / 0.01)  # RetinaNet's class prior, a constant bias its constructor sets
    assert torch.allclose(big.head.classification_head.cls_logits.bias, torch.full((15,), prior))
    assert big.head.regression_head.bbox_reg.out_channels == 3 * 4
    # the trunk by beta: its stage widths are make_divisible(C * 1.1**phi, 8), its stages ceil(2 * 1.2**phi) repeats
    w = 1.1**phi
    assert [s[0].out_channels for s in big.backbone.stages] == [make_divisible(c * w, 8) for c in (32, 64, 128)]
    assert [len(s) - 3 for s in big.backbone.stages] == [math.ceil(2 * 1.2**phi)] * 3
    size = make_divisible(128 * 1.15**phi, 8)
    assert big.transform.min_size == (size,) and big.transform.max_size == size
    assert big.scaling.input_size == (size, size)
    assert model.backbone.fpn.inner_blocks[0][0].out_channels == 64 and len(model.head.classification_head.conv) == 4
    _trains_and_detects(big)


def test_user_built_detector_overrides_and_errors() -> None:
    model = _user_retinanet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=1, neck_width=2.0, head_depth=2)
        width_only = compscale.scale(model, width=1.5)
    assert big.backbone.fpn.layer_blocks[0][0].out_channels == 128
    assert len(big.head.classification_head.conv) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fewer = compscale.scale(model, phi=1, head_depth=-2)
        fewest = compscale.scale(model, phi=1, head_depth=-10)
    assert len(fewer.head.classification_head.conv) == 2 and len(fewest.head.regression_head.conv) == 1  # one kept
    _trains_and_detects(fewer)
    # a one-dimension ablation changes one dimension: the neck follows the width, no head layer, no new size
    assert width_only.backbone.fpn.layer_blocks[0][0].out_channels == 96
    assert len(width_only.head.classification_head.conv) == 4
    assert width_only.transform.min_size == (128,)
    with pytest.raises(ValueError, match="neck_width"):
        compscale.scale(model, phi=1, neck_width=-1.0)
    with pytest.raises(TypeError, match="head_depth"):
        compscale.scale(model, phi=1, head_depth=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="head_depth"):
        compscale.scale(model, phi=1, head_depth=100)
    with pytest.raises(compscale.CompscaleError, match="RetinaNet is a detector") as info:
        compscale.scale(model, target_macs=1e9)
    assert "phi=" in (info.value.hint or "")
    with pytest.raises(ValueError, match="detector"):  # a classifier has no neck to scale: not silently ignored
        compscale.scale(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), phi=1, neck_width=2.0)


def test_a_module_no_recorded_call_reaches_is_named() -> None:
    model = _user_retinanet()
    model.backbone.aux = nn.Conv2d(64, 5, 1)  # a branch the forward (in eval mode) never calls
    with pytest.warns(compscale.GuessWarning, match=r"1 modules of RetinaNet .* keep their widths: backbone\.aux"):
        big = compscale.scale(model, phi=1)
    assert big.backbone.aux.in_channels == 64 and big.backbone.fpn.layer_blocks[0][0].out_channels == 88


def test_the_callers_detector_and_its_modes_are_kept() -> None:
    model = _user_retinanet().train()
    model.backbone.stem.eval()  # a frozen stem, in eval mode inside a training model
    for p in model.backbone.stem.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=1)
    assert model.training and not model.backbone.stem.training and model.head.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert big.training and not big.backbone.stem.training and big.head.training
    assert not any(p.requires_grad for p in big.backbone.stem.parameters())  # 16 channels stay 16 at phi=1
    assert all(p.requires_grad for p in big.head.parameters())


def test_the_command_scales_a_detector(capsys: pytest.CaptureFixture[str]) -> None:
    from compscale.cli import main

    assert main(["scale", "ssdlite320_mobilenet_v3_large", "--phi", "1", "--head-depth", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_size"] == [368, 368] and report["base"]["input_size"] == [320, 320]
    assert report["neck_width"] == 1.35 and report["head_layers"] == 0 and report["neck_layers"] == 1
    assert 1.5 < report["macs_ratio"] < 2.5


def test_profile_counts_the_network_part() -> None:
    model = _user_retinanet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=2)
    base = compscale.profile(model, big.scaling.base_input_size)
    scaled = compscale.profile(big, big.scaling.input_size)
    assert base.params == sum(p.numel() for p in model.parameters())
    assert scaled.input_size == big.scaling.input_size
    assert 2.0 < scaled.macs / base.macs < 12.0  # phi=2: trunk ~4x, neck and heads (1.35*1.15)^4 ~ 5.8x
    planned = compscale.plan(model, phi=2)  # a detector is planned by building it: the same figures
    assert (planned.macs, planned.params, planned.base_macs) == (scaled.macs, scaled.params, base.macs)
    assert planned.input_size == big.scaling.input_size


class _Cell(nn.Module):
    """A BiFPN-like layer: top-down then bottom-up over three levels of one width, the levels passed on."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.down = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(2))
        self.up = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(2))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        p3, p4, p5 = levels
        p4 = self.down[0](p4 + nn.functional.interpolate(p5, size=p4.shape[-2:])).relu()
        p3 = self.down[1](p3 + nn.functional.interpolate(p4, size=p3.shape[-2:])).relu()
        p4 = self.up[0](p4 + nn.functional.adaptive_max_pool2d(p3, p4.shape[-2:])).relu()
        p5 = self.up[1](p5 + nn.functional.adaptive_max_pool2d(p4, p5.shape[-2:])).relu()
        return [p3, p4, p5]


class _BiFPNBackbone(_Backbone):
    """The same trunk, lateral 1x1 convs to one width, then two repeated BiFPN-like cells."""

    def __init__(self, c: int = 64) -> None:
        super().__init__(c)
        del self.fpn
        self.lateral = nn.ModuleList(nn.Conv2d(a, c, 1) for a in (32, 64, 128))
        self.cells = nn.Sequential(_Cell(c), _Cell(c))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.stem(x)
        maps = []
        for stage, lateral in zip(self.stages, self.lateral):
            x = stage(x)
            maps.append(lateral(x))
        return OrderedDict((str(i), m) for i, m in enumerate(self.cells(maps)))


def test_repeated_neck_cells_are_deepened() -> None:
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64)), ((0.5, 1.0, 2.0),) * 3)
    model = D.RetinaNet(_BiFPNBackbone(), num_classes=5, min_size=128, max_size=128, anchor_generator=anchors,
                        head=RetinaNetHead(64, 3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=1)
    assert len(big.backbone.cells) == 3  # EfficientDet: D = 3 + phi BiFPN layers, so one more per phi
    assert {m.out_channels for m in big.backbone.cells.modules() if isinstance(m, nn.Conv2d)} == {88}
    assert {m[0].out_channels for m in big.head.classification_head.conv} == {88}
    assert len(model.backbone.cells) == 2
    _trains_and_detects(big)


# -- torchvision's detectors (slow) ----------------------------------------------------------------------------------

DETECTORS = {
    "retinanet_resnet50_fpn": "resnet50",
    "fcos_resnet50_fpn": "resnet50",
    "fasterrcnn_resnet50_fpn": "resnet50",
    "maskrcnn_resnet50_fpn": "resnet50",
    "fasterrcnn_mobilenet_v3_large_fpn": "mobilenet_v3_large",
    "ssdlite320_mobilenet_v3_large": "mobilenet_v3_large reduced",
}
TRUNKS = {"resnet50": resnet50, "mobilenet_v3_large": mobilenet_v3_large,
          # torchvision's SSDlite halves the last stage of a backbone it builds without weights (reduced_tail)
          "mobilenet_v3_large reduced": lambda: mobilenet_v3_large(reduced_tail=True)}


def _convs(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(type(m).__name__, tuple(m.weight.shape)) for m in module.modules() if isinstance(m, nn.Conv2d)]


def _body(detector: nn.Module) -> nn.Module:
    return detector.backbone.features if hasattr(detector.backbone, "features") else detector.backbone.body


@pytest.mark.slow
@pytest.mark.parametrize("phi", [1, 3])
@pytest.mark.parametrize("name", list(DETECTORS))
def test_torchvision_detector(name: str, phi: int) -> None:
    model = getattr(D, name)(weights=None, weights_backbone=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=phi)
        trunk = compscale.scale(TRUNKS[DETECTORS[name]](), phi=phi)
    assert type(big) is type(model)
    # the body, layer for layer, as scale() gives the classifier: the detector's convs are a prefix of the trunk's
    body = _convs(_body(big))
    assert body == _convs(trunk)[:len(body)]
    assert len(body) > 0.8 * len(_convs(_body(model))) * 1.0
    # the transform resizes to r times its size
    r = 1.15**phi
    t, t0 = big.transform, model.transform
    assert t.min_size == tuple(make_divisible(s * r, 8) for s in t0.min_size)
    assert t.max_size == make_divisible(t0.max_size * r, 8)
    if t0.fixed_size is not None:
        assert t.fixed_size == tuple(make_divisible(s * r, 8) for s in t0.fixed_size)
    assert big.scaling.input_size[0] == make_divisible(big.scaling.base_input_size[0] * r, 8)
    # the FPN and heads at EfficientDet's width, head towers deepened by floor(phi / 3)
    neck = make_divisible(256 * 1.35**phi, 8)
    if hasattr(big.backbone, "fpn"):
        assert {b[0].out_channels for b in big.backbone.fpn.layer_blocks} == {neck}
        assert {b[0].out_channels for b in big.backbone.fpn.inner_blocks} == {neck}
    towers = {"retinanet": ["head.classification_head.conv", "head.regression_head.conv"],
              "fcos": ["head.classification_head.conv", "head.regression_head.conv"],
              "fasterrcnn": ["rpn.head.conv"], "maskrcnn": ["rpn.head.conv", "roi_heads.mask_head"]}
    for path in towers.get(name.split("_")[0], []):
        old, new = model.get_submodule(path), big.get_submodule(path)
        per_unit = 3 if name.startswith("fcos") else 1  # FCOS's towers are flat: Conv, GroupNorm(32), ReLU
        assert len(new) == len(old) + per_unit * (phi // 3), path
        tower = make_divisible(256 * 1.35**phi, 32) if name.startswith("fcos") else neck  # GroupNorm's 32 groups
        assert {m.out_channels for m in new.modules() if isinstance(m, nn.Conv2d)} == {tower}, path
    if name.startswith(("fasterrcnn", "maskrcnn")):
        assert big.roi_heads.box_head.fc6.in_features == neck * 7 * 7
        assert big.roi_heads.box_head.fc7.out_features == make_divisible(1024 * 1.35**phi, 8)
    # the network part's MACs near the rule's ideal: the trunk by (alpha beta^2 gamma^2)^phi, the rest by
    # (1.35^2 gamma^2)^phi
    size, new_size = big.scaling.base_input_size, big.scaling.input_size
    base, scaled = compscale.profile(model, size).macs, compscale.profile(big, new_size).macs
    # (SSD shares no layer between its levels: it has no neck and heads of the pyramid's rule, all of it is the trunk's)
    trunk_macs = base if name.startswith("ssd") else compscale.profile(_body(model), size).macs
    ideal = trunk_macs * (1.2 * 1.1**2 * 1.15**2) ** phi + (base - trunk_macs) * (1.35**2 * 1.15**2) ** phi
    assert 0.8 < scaled / ideal < 1.6, (scaled / base, scaled / ideal)
    # it trains and detects (at a small size: the network is the same at any)
    if t.fixed_size is None:
        t.min_size, t.max_size = (128,), 128
    _trains_and_detects(big)


def _detection_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.detection))


@pytest.mark.slow
@pytest.mark.parametrize("name", _detection_names())
def test_every_torchvision_detector_scales_and_detects(name: str) -> None:
    """All of torchvision's detection builders (keypoint R-CNN, the v2 variants, SSD300 with its L2-normed VGG
    included): the same class back, its transform at the new size, detections from an eval forward."""
    model = getattr(D, name)(weights=None, weights_backbone=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=1)
    assert type(big) is type(model)
    r = 1.15
    assert big.transform.min_size == tuple(make_divisible(s * r, 8) for s in model.transform.min_size)
    params = sum(p.numel() for p in big.parameters())
    assert params > 1.3 * sum(p.numel() for p in model.parameters())
    if big.transform.fixed_size is None:
        big.transform.min_size, big.transform.max_size = (128,), 128
    big.eval()
    with torch.no_grad():
        out = big(_images(1))
    assert isinstance(out, list) and {"boxes", "labels", "scores"} <= set(out[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
                                  "fcn_resnet50"])
def test_torchvision_segmentation(name: str) -> None:
    from torchvision.models import segmentation as S

    model = getattr(S, name)(weights=None, weights_backbone=None, num_classes=7, aux_loss=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = compscale.scale(model, phi=1)
    assert type(big) is type(model)
    size = big.scaling.input_size
    assert size == (256, 256)
    big.eval()
    with torch.no_grad():
        out = big(torch.rand(1, 3, *size, generator=_generator()))["out"]
    assert out.shape == (1, 7, *size)
    new_convs = [m for m in big.classifier.modules() if isinstance(m, nn.Conv2d)]
    old_convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
    # the head is widened by the width rule, its class convs kept
    assert [m.out_channels for m in new_convs] == [
        7 if m.out_channels == 7 else make_divisible(m.out_channels * 1.1, 8) for m in old_convs]
