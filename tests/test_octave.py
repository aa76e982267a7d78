"""Octave convolutions (issue 20): a conv that reads a high- and a low-frequency map and returns both.

pytorchcv's ``OctConv(nn.Conv2d)`` takes ``(hx, lx)`` (``lx`` may be ``None``), cuts its own weight at
``self.h_in_channels`` / ``self.h_out_channels`` in ``forward`` and returns ``(hy, ly)``. compscale follows each
map as a channel group of its own, the layer's ``in_channels``/``out_channels`` as their sum, and writes the new
bounds into the attributes ``forward`` reads, so the result is the network pytorchcv's ``OctResNet`` builds with the
scaled channels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_architecture
from torch import nn

import compscale

octresnet = pytest.importorskip("pytorchcv.models.octresnet", reason="the test extra installs pytorchcv")

WIDTHS = [1.1, 1.25, 1.6, 2.0]


def _octaves(model: nn.Module) -> dict[str, tuple[int, int, int, int, int]]:
    """Each octave conv's ``(in, out, h_in, h_out, l_out)``: what its forward cuts its weight by."""
    return {n: (m.in_channels, m.out_channels, m.h_in_channels, m.h_out_channels, m.l_out_channels)
            for n, m in model.named_modules() if isinstance(m, octresnet.OctConv)}


def _by_hand(scaled: nn.Module, layers: list[int], bottleneck: bool, alpha: float = 0.5) -> nn.Module:
    """pytorchcv's own OctResNet with the stage widths of ``scaled`` (its units' output channels)."""
    stages = [[scaled.features.get_submodule(f"stage{i + 1}.unit1").identity_conv.conv.out_channels] * n
              for i, n in enumerate(layers)]
    init = scaled.features.init_block.conv.conv.out_channels
    return octresnet.OctResNet(channels=stages, init_block_channels=init, bottleneck=bottleneck, conv1_stride=True,
                               oct_alpha=alpha)


@pytest.mark.parametrize("w", WIDTHS)
def test_octresnet10_widths_equal_pytorchcvs_own_net(w: float) -> None:
    base = octresnet.octresnet10_ad2()
    scaled = compscale.scale(base, width=w, depth=1.0, resolution=1.0)
    reference = _by_hand(scaled, [1, 1, 1, 1], bottleneck=False)
    assert_same_architecture(scaled, reference)
    assert _octaves(scaled) == _octaves(reference)  # the class's own split of each total gives the planned parts
    widths = [scaled.features.get_submodule(f"stage{i}.unit1").identity_conv.conv.out_channels for i in (1, 2, 3, 4)]
    for got, c in zip(widths, (64, 128, 256, 512)):
        assert c * w * 0.9 <= got <= c * w * 1.2, (widths, w)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    ratio = compscale.profile(scaled, 224).macs / compscale.profile(base, 224).macs
    assert 0.85 * w * w <= ratio <= 1.2 * w * w, ratio


def test_octresnet10_runs_at_its_scaled_resolution() -> None:
    base = octresnet.octresnet10_ad2()
    scaled = compscale.scale(base, width=1.1, depth=1.0, resolution=1.15)
    assert scaled.scaling.input_size == (256, 256)
    assert_same_architecture(compscale.scale(base, width=1.1, depth=1.0), _by_hand(scaled, [1, 1, 1, 1], False))
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, 256, 256)).shape == (1, 1000)


def test_octresnet10_at_phi_1_widens_and_resizes_but_says_it_cannot_deepen_its_octave_units() -> None:
    """Depth needs a repeat of a unit that reads and returns two maps; compscale's stages carry one tensor. phi=1
    widens and resizes, leaves the depth, and says so; strict=True and an explicit depth refuse."""
    base = octresnet.octresnet10_ad2()
    with pytest.warns(compscale.GuessWarning, match=r"OctResNet was widened and resized but not deepened \(depth "
                                                    r"x1\.2 of phi=1 left at x1\): it has no stage to deepen"):
        scaled = compscale.scale(base, phi=1)
    assert scaled.scaling.multipliers.depth == 1.0 and scaled.scaling.multipliers.width == pytest.approx(1.1)
    assert scaled.scaling.input_size == (256, 256)
    assert_same_architecture(scaled, compscale.scale(base, width=1.1, resolution=1.15), input_size=256)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, 256, 256)).shape == (1, 1000)
    plan = compscale.plan(base, phi=1)
    assert plan.multipliers.depth == 1.0 and plan.macs == pytest.approx(compscale.profile(scaled, 256).macs, rel=0.02)
    with pytest.raises(compscale.NoStageError, match="OctResNet has no stage to deepen"):
        compscale.scale(base, phi=1, strict=True)
    with pytest.raises(compscale.NoStageError, match="OctResNet has no stage to deepen"):
        compscale.scale(base, phi=1, depth=1.2)


def _small(bottleneck: bool, chans: list[list[int]], init: int) -> nn.Module:
    return octresnet.OctResNet(channels=chans, init_block_channels=init, bottleneck=bottleneck, conv1_stride=False,
                               oct_alpha=0.25, in_size=(56, 56), num_classes=10)


@pytest.mark.parametrize("w", [1.25, 1.5, 2.0, 3.0])
def test_small_octresnet_at_quarter_alpha_equals_pytorchcvs_own_net(w: float) -> None:
    """Each octave layer's width is rounded as a whole and cut as the class cuts it (``int(c * (1 - alpha))``)."""
    scaled = compscale.scale(_small(False, [[32], [64]], 32), width=w, depth=1.0, input_size=56)
    stages = [[scaled.features.get_submodule(f"stage{i}.unit1").identity_conv.conv.out_channels] for i in (1, 2)]
    reference = _small(False, stages, scaled.features.init_block.conv.conv.out_channels)
    assert_same_architecture(scaled, reference, input_size=56)
    assert _octaves(scaled) == _octaves(reference)
    assert stages[1][0] == round(64 * w / 8) * 8, stages
    with torch.no_grad():
        assert scaled.eval()(torch.randn(2, 3, 56, 56)).shape == (2, 10)


def test_small_bottleneck_octresnet_keeps_each_layers_parts_consistent() -> None:
    """Bottlenecks at alpha 1/4: every octave layer's weight, bounds and norms agree (its mid width is rounded to a
    multiple of 8, where pytorchcv's constructor takes ``out // 4``)."""
    base = _small(True, [[32], [64]], 16)
    for w in (1.5, 2.0):
        scaled = compscale.scale(base, width=w, depth=1.0, input_size=56)
        for name, (cin, cout, h_in, h_out, l_out) in _octaves(scaled).items():
            conv = scaled.get_submodule(name)
            assert conv.weight.shape[:2] == (cout, cin)
            assert h_in <= cin, name
            assert h_out == int(cout * (1 - (0.25 if conv.oct_mode in ("first", "norm") else 0.0))), name
            assert l_out == cout - h_out or conv.oct_mode in ("last", "std"), name
            block = scaled.get_submodule(name.rpartition(".")[0])
            assert block.h_bn.num_features == h_out, name
            if hasattr(block, "l_bn"):
                assert block.l_bn.num_features == cout - h_out, name
        with torch.no_grad():
            assert scaled.eval()(torch.randn(2, 3, 56, 56)).shape == (2, 10)
        assert compscale.profile(scaled, 56).macs > 1.5 * compscale.profile(base, 56).macs


class Paired(nn.Conv2d):
    """A conv returning its output twice: two values that do not split its channels."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        y = super().forward(x)
        return y, y


class SplitInForward(nn.Conv2d):
    """An octave-like conv that computes where it cuts its weight in forward (no attribute holds the bound)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        half = self.weight.shape[0] // 2
        return (F.conv2d(x, self.weight[:half], None, 1, 1),
                F.avg_pool2d(F.conv2d(x, self.weight[half:], None, 1, 1), 2))


class TwoMapNet(nn.Module):
    def __init__(self, conv: type[nn.Conv2d]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv = conv(16, 16, 3, padding=1, bias=False)
        half = 8 if conv is SplitInForward else 16
        self.h, self.l = nn.Conv2d(half, 16, 1), nn.Conv2d(half, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(self.stem(x))
        return self.fc(self.h(a).mean((2, 3)) + self.l(b).mean((2, 3)))


@pytest.mark.parametrize(("conv", "match"), [
    (Paired, r"conv \(Paired, a Conv2d\): it returns 2 values .* do not split its channels"),
    (SplitInForward, r"it cuts its weight at 8 channels, and no attributes its forward reads hold that number"),
])
def test_layers_returning_several_maps_that_compscale_cannot_follow_are_refused(conv: type[nn.Conv2d],
                                                                                 match: str) -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=match):
        compscale.scale(TwoMapNet(conv), width=1.5, depth=1.0, input_size=16)


@pytest.mark.parametrize(("w", "r"), [(1.0, 1.0), (1.5, 1.0), (1.1, 1.15), (2.0, 1.3)])
def test_plan_costs_octave_layers_as_profile_counts_them(w: float, r: float) -> None:
    """The planner costs each (map in, map out) of an octave conv at the smaller map, as the layer runs it."""
    base = _small(True, [[32], [64]], 16)
    plan = compscale.plan(base, width=w, depth=1.0, resolution=r, input_size=56)
    scaled = compscale.scale(base, width=w, depth=1.0, resolution=r, input_size=56)
    measured = compscale.profile(scaled, scaled.scaling.input_size)
    assert (plan.macs, plan.params, plan.acts) == (measured.macs, measured.params, measured.acts)
