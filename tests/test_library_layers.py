"""Other libraries' layers: subclasses of torch's conv, norm and linear layers with a forward of their own.

timm's ``Conv2dSame`` pads by the input's size and calls ``F.conv2d`` with its weight; its
``BatchNormAct2d`` calls ``F.batch_norm`` and then its activation. compscale keeps such subclasses whole
(leaves of the trace, with the rule of the layer they extend) and resizes them keeping their class.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compscale


class Conv2dSame(nn.Conv2d):
    """TensorFlow's 'SAME' padding, computed from the input's size in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm followed by its activation, in one module."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = Conv2dSame(mid, mid, 3, stride, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return out + x if self.has_skip else out


class TimmStyleNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 24, 40, 80), depths: tuple[int, ...] = (1, 2, 2, 3)) -> None:
        super().__init__()
        self.conv_stem = Conv2dSame(3, widths[0], 3, 2, bias=False)
        self.bn1 = BatchNormAct2d(widths[0])
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, depths)):
            stages.append(nn.Sequential(*(InvertedResidual(cin if j == 0 else w, w, 2 if j == 0 and i else 1)
                                          for j in range(n))))
            cin = w
        self.blocks = nn.Sequential(*stages)
        self.classifier = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.bn1(self.conv_stem(x))).mean((2, 3)))


def test_subclassed_layers_widen_keeping_their_class() -> None:
    scaled = compscale.scale(TimmStyleNet(), width=1.5, input_size=64)
    reference = TimmStyleNet(widths=(24, 40, 64, 120))  # make_divisible(16, 24, 40, 80 x 1.5)
    got = {n: (type(m).__name__, tuple(m.weight.shape)) for n, m in scaled.named_modules() if hasattr(m, "weight")}
    want = {n: (type(m).__name__, tuple(m.weight.shape)) for n, m in reference.named_modules() if hasattr(m, "weight")}
    assert got == want
    assert type(scaled.blocks[1][0].conv_dw) is Conv2dSame and type(scaled.blocks[1][0].bn2) is BatchNormAct2d
    assert compscale.profile(scaled, 64).macs == compscale.profile(reference, 64).macs
    assert scaled(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_subclassed_layers_scale_with_phi() -> None:
    model = TimmStyleNet()
    scaled = compscale.scale(model, phi=1, input_size=64)
    assert [(s.blocks_before, s.blocks_after) for s in scaled.scaling.stages][1:] == [(2, 3), (2, 3), (3, 4)]
    size = scaled.scaling.input_size
    ratio = compscale.profile(scaled, size).macs / compscale.profile(model, 64).macs
    assert 0.8 * 1.92 <= ratio <= 1.5 * 1.92, ratio
    planned, counted = compscale.plan(model, phi=1, input_size=64), compscale.profile(scaled, size)
    assert (planned.macs, planned.acts) == (counted.macs, counted.acts)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, *size)).shape == (1, 10)


class EcaModule(nn.Module):
    """Efficient channel attention (timm's): a Conv1d slides along the pooled channels."""

    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y).sigmoid().view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class EcaBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.eca = EcaModule()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(self.eca(out) + x)


class EcaNet(nn.Module):
    def __init__(self, c: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer1 = nn.Sequential(*(EcaBlock(c) for _ in range(blocks)))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


def test_eca_attention_widens_around_its_channel_conv() -> None:
    scaled = compscale.scale(EcaNet(), width=1.5, depth=1.5, input_size=32)
    assert scaled.layer1[0].conv1.out_channels == 48 and len(scaled.layer1) == 3
    assert tuple(scaled.layer1[2].eca.conv.weight.shape) == (1, 1, 3)  # slides along channels: any number of them
    assert compscale.profile(scaled, 32).params == compscale.profile(EcaNet(48, 3), 32).params
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _Unfollowed(nn.Module):
    """Channels viewed as (groups, channels per group) and then used as such: no rule follows that."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        grouped = torch.relu(y.view(y.shape[0], 4, 4, y.shape[2], y.shape[3]))
        return self.fc(grouped.flatten(1, 2).mean((2, 3)))


def test_a_view_compscale_cannot_follow_is_a_typed_error_naming_the_node() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=r"node %\w+.*\n.*Hint:"):
        compscale.scale(_Unfollowed(), width=2, input_size=16)


class ScaledStdConv2d(nn.Conv2d):
    """A conv with a learnable gain per output channel (timm's NFNet conv), standardising its weight."""

    def __init__(self, cin: int, cout: int, k: int, **kwargs: object) -> None:
        super().__init__(cin, cout, k, padding=k // 2, **kwargs)  # type: ignore[arg-type]
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w * self.gain, self.bias, self.stride, self.padding)


class GainNet(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, c, 3)
        self.layer1 = nn.Sequential(*(EcaBlock(c) for _ in range(2)))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(torch.relu(self.stem(x))).mean((2, 3)))


def test_a_subclass_per_channel_parameter_follows_the_width() -> None:
    scaled = compscale.scale(GainNet(), width=1.5, input_size=32)
    assert type(scaled.stem) is ScaledStdConv2d and tuple(scaled.stem.gain.shape) == (48, 1, 1, 1)
    assert bool((scaled.stem.gain == 1).all())  # its constant init
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class Res2Block(nn.Module):
    """Res2Net's block: the split sizes are a number the block keeps (``self.width``); it follows the width."""

    def __init__(self, c: int, width: int = 8, scale: int = 4) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(c, width * scale, 1, bias=False)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spx = torch.split(self.conv1(x), self.width, 1)
        outs, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            sp = conv(sp if i == 0 else sp + spx[i])
            outs.append(sp)
        outs.append(spx[-1])
        return torch.relu(self.conv3(torch.cat(outs, 1)) + x)


class Res2Net(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer1 = nn.Sequential(Res2Block(c), Res2Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


def test_split_by_numbers_follows_the_width_through_the_attribute_holding_them() -> None:
    scaled = compscale.scale(Res2Net(), width=1.5, depth=1.5, input_size=32)
    assert scaled.stem.out_channels == 48 and len(scaled.layer1) == 3
    block = scaled.layer1[2]
    assert block.conv1.out_channels == 48 and block.width == 12  # 4 pieces of 48 / 4: self.width follows
    assert [c.out_channels for c in block.convs] == [12, 12, 16]  # the last conv's output meets no piece
    assert block.conv3.in_channels == 3 * 12 + 16
    assert scaled(torch.randn(2, 3, 32, 32)).shape == (2, 10)
