"""Ops and networks a user met that compscale's rules did not know (issue 20, part 4).

- CBAM's and BAM's attention: ``unsqueeze``/``expand_as`` of an ``(N, C)`` gate, a spatial gate that reduces the
  channels away (``x.mean(dim=1)``, ``x.max(dim=1)[0]``) and gives the map its one channel back, a one-channel map
  broadcast over the channels (its conv stays one channel wide).
- ShuffleNet v1's shuffle in one group, ``view(b, 1, c, h, w).transpose(1, 2)``: no shuffle at all.
- A forward with ``None`` branches (an octave conv's ``(x_h, None)``) traced with concrete values.
- A 3-D network given no input: the error says what input its stem takes.
- Transformers: one short ``NotACNNError``.
- Probing and concrete tracing print nothing.
"""

from __future__ import annotations

import operator
import time
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_architecture
from torch import nn

import compscale
from compscale.trace import trace
from compscale.trace.concrete import trace_concrete

WIDTHS = [0.5, 1.5, 2.0]


def _channel_max(x: torch.Tensor) -> torch.Tensor:
    return x.max(dim=1)[0]


def _torch_max(x: torch.Tensor) -> torch.Tensor:
    return torch.max(x, 1)[0]


def _max_values(x: torch.Tensor) -> torch.Tensor:
    return x.max(dim=1).values


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=1)


class CBAM(nn.Module):
    """pytorchcv's CBAM: a channel gate (one MLP on the average- and max-pooled vectors, ``unsqueeze`` and
    ``expand_as``) and a spatial gate on the max and mean over channels."""

    def __init__(self, channels: int, reduction: int = 4, channel_max: Callable[..., torch.Tensor] = _channel_max,
                 stack: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.channel_max = channel_max
        self.stack = stack

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        x = x * torch.sigmoid(att).unsqueeze(2).unsqueeze(3).expand_as(x)
        if self.stack:
            pooled = torch.stack([self.channel_max(x), x.mean(dim=1)], dim=1)
        else:
            pooled = torch.cat((self.channel_max(x).unsqueeze(1), x.mean(dim=1).unsqueeze(1)), dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, **cbam: object) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.cbam = CBAM(cout, **cbam)  # type: ignore[arg-type]
        self.down = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cbam(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class CbamNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (2, 2), **cbam: object) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            stages.append(nn.Sequential(*(Block(cin if j == 0 else w, w, 2 if i and j == 0 else 1, **cbam)
                                          for j in range(d))))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


def _stage_widths(width: float, base: tuple[int, ...] = (16, 32)) -> tuple[int, ...]:
    return tuple(max(8, int(w * width + 4) // 8 * 8) for w in base)  # make_divisible(w * width, 8)


@pytest.mark.parametrize(("width", "channel_max"), [(w, _channel_max) for w in WIDTHS] + [
    (1.5, f) for f in (_torch_max, _max_values, _amax)])
def test_cbam_resnet_widens_like_the_hand_built_one(width: float, channel_max: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(0)
    scaled = compscale.scale(CbamNet(channel_max=channel_max), width=width, input_size=32)
    reference = CbamNet(_stage_widths(width), channel_max=channel_max)
    assert_same_architecture(scaled, reference, input_size=32)
    assert scaled.stages[1][1].cbam.spatial.weight.shape == (1, 2, 7, 7)  # max and mean: one channel each
    with torch.no_grad():
        assert scaled.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cbam_with_stacked_maps_and_compound_scaling_runs_at_the_new_size() -> None:
    torch.manual_seed(0)
    scaled = compscale.scale(CbamNet(stack=True), phi=1, input_size=32)
    assert scaled.stages[0][0].cbam.spatial.in_channels == 2
    assert len(scaled.stages[1]) == 3  # ceil(2 * 1.2)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, *scaled.scaling.input_size)).shape == (1, 10)


class BAM(nn.Module):
    """pytorchcv's BAM: a channel gate ``(N, C)`` and a one-channel spatial map, both ``expand_as`` the input."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = channels // reduction
        self.fc1 = nn.Linear(channels, mid)
        self.bn = nn.BatchNorm1d(mid)
        self.fc2 = nn.Linear(mid, channels)
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.dilated = nn.Conv2d(mid, mid, 3, padding=2, dilation=2)
        self.final = nn.Conv2d(mid, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ch = F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1)
        ch = self.fc2(F.relu(self.bn(self.fc1(ch)))).unsqueeze(2).unsqueeze(3).expand_as(x)
        sp = self.final(F.relu(self.dilated(F.relu(self.reduce(x))))).expand_as(x)
        return x * (1 + torch.sigmoid(ch * sp))


class BamNet(nn.Module):
    """Plain stages with a BAM between them (its own module, as the BAM paper places it)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1), nn.ReLU())
        self.stage1 = nn.Sequential(Block(widths[0], widths[0], 1), Block(widths[0], widths[0], 1))
        self.bam = BAM(widths[0])
        self.stage2 = nn.Sequential(Block(widths[0], widths[1], 2), Block(widths[1], widths[1], 1))
        self.fc = nn.Linear(widths[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.bam(self.stage1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("width", WIDTHS)
def test_bam_widens_like_the_hand_built_one(width: float) -> None:
    torch.manual_seed(0)
    scaled = compscale.scale(BamNet(), width=width, input_size=32)
    reference = BamNet(_stage_widths(width))
    # the spatial branch's inner width is rounded on its own (make_divisible, at least 8), not derived as
    # channels // 4 as the channel gate's is: compare the rest, and that branch's consistency
    spatial = ("reduce", "dilated", "final")
    for name in spatial:
        setattr(reference.bam, name, getattr(scaled.bam, name))
    assert_same_architecture(scaled, reference, input_size=32)
    mid = scaled.bam.reduce.out_channels
    assert scaled.bam.reduce.in_channels == scaled.stage1[0].conv1.out_channels
    assert (scaled.bam.dilated.in_channels, scaled.bam.dilated.out_channels, scaled.bam.final.in_channels) == (mid,) * 3
    assert scaled.bam.final.out_channels == 1  # the spatial map broadcast over the channels stays one channel
    with torch.no_grad():
        assert scaled.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1's unit (stride 1) with its shuffle as pytorchcv writes it, for any number of groups (its
    bottleneck half the width rather than a quarter: one width per stage, rounded as the stage's)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        mid = channels // 2
        self.groups = groups
        self.compress = nn.Conv2d(channels, mid, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.expand = nn.Conv2d(mid, channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.compress(x)))
        b, c, h, w = y.size()
        y = y.view(b, self.groups, c // self.groups, h, w)
        y = torch.transpose(y, 1, 2).contiguous().view(b, c, h, w)
        y = self.bn3(self.expand(self.bn2(self.dw(y))))
        return F.relu(x + y)


class ShuffleNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64), groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1), nn.ReLU())
        self.stage1 = nn.Sequential(*(ShuffleUnit(widths[0], groups) for _ in range(2)))
        self.down = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, 2, 1), nn.ReLU())
        self.stage2 = nn.Sequential(*(ShuffleUnit(widths[1], groups) for _ in range(2)))
        self.fc = nn.Linear(widths[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("groups", [1, 2])
def test_shufflenet_v1_transpose_shuffle_widens_like_the_hand_built_one(width: float, groups: int) -> None:
    torch.manual_seed(0)
    scaled = compscale.scale(ShuffleNet(groups=groups), width=width, input_size=32)
    assert_same_architecture(scaled, ShuffleNet(_stage_widths(width, (32, 64)), groups), input_size=32)
    with torch.no_grad():
        assert scaled.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class ECA(nn.Module):
    """ECA-Net's own code: ``squeeze(-1).transpose(-1, -2)`` lines the channels up for a Conv1d, and back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * torch.sigmoid(y).expand_as(x)


class EcaNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1), nn.ReLU())
        self.convs = nn.Sequential(nn.Conv2d(widths[0], widths[1], 3, 2, 1), nn.ReLU(), ECA(),
                                   nn.Conv2d(widths[1], widths[1], 3, 1, 1), nn.ReLU(), ECA())
        self.fc = nn.Linear(widths[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("width", WIDTHS)
def test_eca_squeeze_transpose_unsqueeze_widens_like_the_hand_built_one(width: float) -> None:
    torch.manual_seed(0)
    scaled = compscale.scale(EcaNet(), width=width, input_size=16)
    assert_same_architecture(scaled, EcaNet(_stage_widths(width)), input_size=16)
    with torch.no_grad():
        assert scaled(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_a_map_whose_channels_were_reduced_away_is_refused_where_channels_are_read() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _Flat(), nn.Linear(36, 2))
    with pytest.raises(compscale.UnsupportedOpError, match=r"a map whose channels were reduced away"):
        compscale.scale(model, width=2, input_size=8)


class _Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1).flatten(1)


class OctaveConv(nn.Conv2d):
    """A conv returning ``(high, None)``: the second map absent, as an octave conv's last layer returns it."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return super().forward(x), None


class OctaveUnit(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = OctaveConv(channels, channels, 3, padding=1)
        self.conv2 = OctaveConv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, x_l: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, low = self.conv1(x)
        h, low = self.conv2(F.relu(h))
        h = F.relu(h + x)
        if low is not None:
            low = F.relu(low + x_l)
        return h, low


class OctaveNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.units = nn.ModuleList([OctaveUnit(16), OctaveUnit(16)])
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, x_l = self.stem(x), None
        for unit in self.units:
            x, x_l = unit(x, x_l)
        return self.fc(x.mean((2, 3)))


def test_none_branches_are_traced_with_concrete_values_and_scaled() -> None:
    """Symbolic tracing takes ``if low is not None`` as true and adds ``None``; the concrete tracer sees the None
    (no add of it in its graph). A conv returning its map and ``None`` holds all its channels in the one map: it is
    resized as any conv (octave convolutions proper: tests/test_octave.py)."""
    adds = [n for n in trace_concrete(OctaveNet(), (1, 3, 16, 16)).graph.nodes if n.target is operator.add]
    assert len(adds) == 2  # h + x in each unit, no low + x_l
    for w, want in ((1.5, 24), (2.0, 32)):
        scaled = compscale.scale(OctaveNet(), width=w, depth=1.0, input_size=16)
        assert {m.out_channels for m in scaled.modules() if isinstance(m, nn.Conv2d)} == {want}
        with torch.no_grad():
            assert scaled(torch.randn(1, 3, 16, 16)).shape == (1, 10)


class Video(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv3d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean((2, 3, 4)))


def test_a_3d_net_without_example_inputs_says_what_its_stem_takes() -> None:
    with pytest.raises(compscale.TraceError, match=r"stem\.0 is a Conv3d over 3 dimension\(s\), taking 3 channels"
                                                   r"(.|\n)*example_inputs=\(torch\.randn\(1, 3, 16, 112, 112\),\) "
                                                   r"or input_size=\(16, 112, 112\)"):
        compscale.scale(Video(), phi=1)
    scaled = compscale.scale(Video(), width=2, input_size=(8, 16, 16))
    assert scaled.stem[0].out_channels == 16
    with torch.no_grad():
        assert scaled(torch.randn(1, 3, 8, 16, 16)).shape == (1, 4)


class Encoder(nn.Module):
    """torchvision's ViT encoder block: LayerNorm, MultiheadAttention, LayerNorm, MLP, over (N, L, C) tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """A patch embedding, then transformer blocks over tokens."""

    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList([Encoder(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class ConvAttention(nn.Module):
    """A conv net whose every block attends over its positions with a hand-written q @ k^T (no MultiheadAttention)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.qkv = nn.ModuleList([nn.Conv2d(dim, 3 * dim, 1) for _ in range(3)])
        self.fc = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for qkv in self.qkv:
            q, k, v = qkv(x).flatten(2).chunk(3, dim=1)
            att = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
            x = x + (v @ att.transpose(1, 2)).view_as(x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("model", [TinyViT, ConvAttention])
def test_transformers_get_one_short_typed_error(model: type[nn.Module]) -> None:
    with pytest.raises(compscale.NotACNNError) as info:
        compscale.scale(model(), phi=1, input_size=32)
    message, hint = str(info.value).split("\nHint: ")
    assert "not a CNN of stages" in message and len(message) <= 300, message
    assert "\n" not in message and hint
    assert isinstance(info.value, compscale.NoStageError)


def test_a_few_attention_blocks_in_a_cnn_are_not_a_transformer() -> None:
    """One attention product per three convolutions (a non-local block in a ResNet) is still a CNN."""

    class NonLocal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.Sequential(*(nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)))
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.convs(x)
            flat = x.flatten(2)
            x = x + (flat @ torch.softmax(flat.transpose(1, 2) @ flat, dim=-1)).view_as(x)
            return self.fc(x.mean((2, 3)))

    traced = trace(NonLocal(), (1, 8, 8, 8))
    assert traced.shape(traced.output_node) == (1, 2)


class _Gate(nn.Module):
    """An op without a channel rule (``torch.flip`` of the spatial dims), probed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flip(self.conv(x), dims=(2,)).mean((2, 3)))


class _CheckedConv(nn.Conv2d):
    """A conv (a leaf) that tries an op fake tensors refuse and catches the error (torch logs its traceback)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        try:
            torch.mm(x.flatten(1), x.flatten(1))
        except RuntimeError:
            pass
        return super().forward(x)


class _ShapePython(nn.Module):
    """Python on shapes (traced with concrete values), with a layer that fails an op on fake tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _CheckedConv(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int(x.shape[-1]) % 2:
            x = F.pad(x, (0, 1, 0, 1))
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("model", [_Gate, _ShapePython])
def test_probing_and_concrete_tracing_print_nothing(model: type[nn.Module], capfd: pytest.CaptureFixture[str]) -> None:
    scaled = compscale.scale(model(), width=2, input_size=15)
    with torch.no_grad():
        assert scaled(torch.randn(1, 3, 15, 15)).shape == (1, 2)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


PYTORCHCV = ["cbam_resnet18", "bam_resnet18", "shufflenet_g1_w1"]


@pytest.mark.slow
@pytest.mark.parametrize("name", PYTORCHCV)
def test_pytorchcv_attention_and_shuffle_nets_scale_at_phi_1(name: str) -> None:
    model_provider = pytest.importorskip("pytorchcv.model_provider", reason="the test extra installs pytorchcv")
    base = model_provider.get_model(name, pretrained=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fixed final pool's classifier (another issue)
        scaled = compscale.scale(base, phi=1)
    assert time.perf_counter() - start < 60
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, *scaled.scaling.input_size)).shape == (1, 1000)
    ratio = compscale.profile(scaled, scaled.scaling.input_size).macs / compscale.profile(base, 224).macs
    assert 1.5 <= ratio <= 3.4, ratio


@pytest.mark.slow
def test_pytorchcv_octresnet_widens_but_cannot_deepen_its_octave_units() -> None:
    """Its octave convs are widened (tests/test_octave.py); its units read and return two maps, which compscale's
    stages (one tensor in, one out) do not repeat: an explicit depth gets a typed error."""
    model_provider = pytest.importorskip("pytorchcv.model_provider", reason="the test extra installs pytorchcv")
    with pytest.raises(compscale.NoStageError, match="OctResNet has no stage to deepen"):
        compscale.scale(model_provider.get_model("octresnet10_ad2", pretrained=False), depth=1.2)
