"""Width scaling through multi-branch and split ops (issue "Beyond the residual block", item 2).

Small nets written here for each pattern (SK's stack/softmax/sum over branches, ResNeSt's radix split
attention, a split by sizes the module keeps, MixConv's unequal split under SE, a slice of a concat, a slice
inside one conv's output, a residual added onto the first channels), with the widths worked out by hand; then
the timm models that use them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compscale
from compscale.planning.policy import partition
from compscale.planning.rounding import make_divisible


def _split_channels(total: int, k: int) -> list[int]:
    """timm's MixConv rule: equal parts, the remainder added to the first."""
    split = [total // k] * k
    split[0] += total - sum(split)
    return split


def _run(model: nn.Module, size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, size, size))


class _Net(nn.Module):
    """stem conv -> blocks -> pooled linear head."""

    def __init__(self, stem: int, blocks: list[nn.Module], head: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(head, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


# --- SK: stack of branches, attention over them ---------------------------------------------------


class SKBlock(nn.Module):
    """Selective kernel: two branches stacked to (N, 2, C, H, W), a softmax over them from a (N, 2C) attention."""

    def __init__(self, c: int, attn: int) -> None:
        super().__init__()
        self.in_channels, self.num_paths = c, 2
        self.paths = nn.ModuleList([nn.Conv2d(c // 2, c, 3, padding=1), nn.Conv2d(c // 2, c, 5, padding=2)])
        self.fc_reduce = nn.Conv2d(c, attn, 1)
        self.fc_select = nn.Conv2d(attn, 2 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, self.in_channels // self.num_paths, 1)  # SK's split_input
        paths = torch.stack([p(pieces[i]) for i, p in enumerate(self.paths)], dim=1)
        a = self.fc_select(torch.relu(self.fc_reduce(paths.sum(1).mean((2, 3), keepdim=True))))
        b, c, h, w = a.shape
        a = torch.softmax(a.view(b, self.num_paths, c // self.num_paths, h, w), dim=1)
        return (paths * a).sum(dim=1) + x


def test_sk_branches_are_one_space_and_the_attention_is_twice_it() -> None:
    scaled = compscale.scale(_Net(32, [SKBlock(32, 16)], 32), width=1.5, input_size=32)
    block = scaled.blocks[0]
    assert [p.out_channels for p in block.paths] == [48, 48]  # the branches: the residual stream, 32 x 1.5
    assert [p.in_channels for p in block.paths] == [24, 24]  # the split halves follow
    assert block.in_channels == 48  # split(x, self.in_channels // 2): the attribute follows the source
    assert block.fc_select.out_channels == 96  # (N, 2C) attention viewed as (N, 2, C): 2 x the branches
    assert block.fc_reduce.out_channels == make_divisible(16 * 1.5)
    assert _run(scaled).shape == (2, 10)


# --- ResNeSt: radix split attention ---------------------------------------------------------------


class RadixBlock(nn.Module):
    """ResNeSt's SplitAttn: a grouped conv to radix x C, summed over the radix, a radix softmax back onto it."""

    def __init__(self, c: int, attn: int, radix: int = 2) -> None:
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(c, c * radix, 3, padding=1, groups=radix)
        self.fc1 = nn.Conv2d(c, attn, 1)
        self.fc2 = nn.Conv2d(attn, c * radix, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        b, rc, h, w = y.shape
        y = y.reshape((b, self.radix, rc // self.radix, h, w))
        a = self.fc2(torch.relu(self.fc1(y.sum(dim=1).mean((2, 3), keepdim=True))))
        a = F.softmax(a.view(b, 1, self.radix, -1).transpose(1, 2), dim=1).reshape(b, -1)
        return (y * a.view(b, -1, 1, 1).reshape((b, self.radix, rc // self.radix, 1, 1))).sum(dim=1) + x


def test_radix_split_attention_keeps_radix_times_the_block_width() -> None:
    scaled = compscale.scale(_Net(32, [RadixBlock(32, 16), RadixBlock(32, 16)], 32), width=1.5, input_size=32)
    for block in scaled.blocks:
        assert (block.conv.in_channels, block.conv.out_channels, block.conv.groups) == (48, 96, 2)
        assert (block.fc1.in_channels, block.fc2.out_channels) == (48, 96)
        assert block.fc1.out_channels == make_divisible(16 * 1.5)
    assert _run(scaled).shape == (2, 10)


# --- a split by a size the module keeps (Res2Net) -------------------------------------------------


class LiteralSplit(nn.Module):
    """``torch.split(x, self.width, 1)`` into 4 pieces, each convolved, concatenated back."""

    def __init__(self, c: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(c, 4 * width, 1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(4))
        self.conv3 = nn.Conv2d(4 * width, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(self.conv1(x), self.width, 1)
        return self.conv3(torch.cat([conv(pieces[i]) for i, conv in enumerate(self.convs)], 1)) + x


def test_a_literal_split_size_follows_the_width() -> None:
    scaled = compscale.scale(_Net(32, [LiteralSplit(32, 16)], 32), width=1.5, input_size=32)
    block = scaled.blocks[0]
    assert block.conv1.out_channels == 96 and block.width == 24  # make_divisible(64 * 1.5) in 4 pieces
    assert [c.in_channels for c in block.convs] == [24] * 4
    assert _run(scaled).shape == (2, 10)


class UndoConcat(nn.Module):
    """A concat split back into its parts by sizes the module keeps."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, 16, 1), nn.Conv2d(c, 8, 1)
        self.c, self.d = nn.Conv2d(16, c, 1), nn.Conv2d(8, c, 1)
        self.sizes = [16, 8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(torch.cat([self.a(x), self.b(x)], 1), self.sizes, 1)
        return self.c(p) + self.d(q) + x


def test_split_sizes_undoing_a_concat_follow_its_parts() -> None:
    scaled = compscale.scale(_Net(32, [UndoConcat(32)], 32), width=1.5, input_size=32)
    block = scaled.blocks[0]
    assert block.sizes == [block.a.out_channels, block.b.out_channels] == [24, 16]
    assert _run(scaled).shape == (2, 10)


class Unowned(nn.Module):
    """Split sizes written in forward: no attribute to update."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(self.conv(x), 16, 1)
        return torch.cat([b, a], 1) + x


def test_a_literal_split_size_no_attribute_holds_pins_its_source_with_a_warning() -> None:
    with pytest.warns(UserWarning, match=r"no attribute of the module holds.*MACs grow less"):
        scaled = compscale.scale(_Net(32, [Unowned()], 32), width=1.5, input_size=32)
    assert scaled.blocks[0].conv.out_channels == 32 and scaled.stem.out_channels == 32
    assert _run(scaled).shape == (2, 10)


# --- MixConv under SE -----------------------------------------------------------------------------


class Mixed(nn.Module):
    """timm's MixedConv2d: split by ``self.splits``, one conv per piece, concatenated."""

    def __init__(self, cin: int, cout: int, kernels: list[int], depthwise: bool = False) -> None:
        super().__init__()
        ins, outs = _split_channels(cin, len(kernels)), _split_channels(cout, len(kernels))
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, padding=k // 2, groups=i if depthwise else 1)
                                   for i, o, k in zip(ins, outs, kernels))
        self.splits = ins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, self.splits, 1)
        return torch.cat([c(pieces[i]) for i, c in enumerate(self.convs)], 1)


class MixBlock(nn.Module):
    """MixNet's inverted residual: mixed 1x1 expansion, mixed depthwise, SE, 1x1 projection, residual."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.conv_pw = Mixed(c, hidden, [1, 1])
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv_dw = Mixed(hidden, hidden, [3, 5, 7], depthwise=True)
        self.se_reduce, self.se_expand = nn.Conv2d(hidden, c // 4, 1), nn.Conv2d(c // 4, hidden, 1)
        self.conv_pwl = nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(torch.relu(self.bn1(self.conv_pw(x))))
        y = y * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        return self.conv_pwl(y) + x


def test_mixconv_pieces_follow_the_whole_under_se() -> None:
    scaled = compscale.scale(_Net(24, [MixBlock(24, 144)], 24), width=1.3, input_size=32)
    block, c = scaled.blocks[0], make_divisible(24 * 1.3)
    hidden = 6 * c  # the expansion of the block input, as timm's builder computes it
    assert (c, hidden) == (32, 192)
    assert block.conv_pw.splits == _split_channels(c, 2) and block.conv_dw.splits == _split_channels(hidden, 3)
    assert [m.out_channels for m in block.conv_pw.convs] == _split_channels(hidden, 2)
    assert [m.out_channels for m in block.conv_dw.convs] == [m.groups for m in block.conv_dw.convs] == [64, 64, 64]
    assert block.bn1.num_features == block.se_expand.out_channels == block.conv_pwl.in_channels == hidden
    assert block.se_reduce.out_channels == math.floor(hidden * 6 / 144)  # SE keeps its ratio to the hidden width
    assert _run(scaled).shape == (2, 10)


def test_partition_cuts_as_timm_splits_and_otherwise_keeps_proportions() -> None:
    assert partition(100, _split_channels(64, 3)) == _split_channels(100, 3) == [34, 33, 33]
    assert partition(96, [16, 48]) == [24, 72]
    assert sum(partition(101, [5, 7, 11])) == 101


# --- slices: of a concat (GhostNet), inside one space (DPN), a residual onto the first channels (ReXNet) ---


class Ghost(nn.Module):
    """GhostNet's module: a conv and a cheap depthwise conv of it, concatenated, sliced to ``self.out_chs``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        init = math.ceil(cout / 2)
        self.out_chs = cout
        self.primary = nn.Conv2d(cin, init, 1)
        self.cheap = nn.Conv2d(init, init, 3, padding=1, groups=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.out_chs, :, :]


def test_a_slice_taking_whole_segments_of_a_concat_follows_them() -> None:
    scaled = compscale.scale(_Net(16, [Ghost(16, 48), Ghost(48, 16)], 16), width=1.5, input_size=32)
    first, second = scaled.blocks
    assert first.primary.out_channels == first.cheap.groups == make_divisible(24 * 1.5)
    assert first.out_chs == 2 * make_divisible(24 * 1.5) == second.primary.in_channels
    assert second.out_chs == 2 * second.primary.out_channels == scaled.fc.in_features
    assert _run(scaled).shape == (2, 10)


class GhostBottleneck(nn.Module):
    """GhostNet's block: two ghost modules and a residual onto their concatenated halves."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.ghost1, self.ghost2 = Ghost(c, hidden), Ghost(hidden, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost2(self.ghost1(x)) + x


def test_a_residual_onto_a_concat_of_two_copies_makes_each_half_the_shortcut() -> None:
    scaled = compscale.scale(_Net(24, [GhostBottleneck(24, 72)], 24), width=1.5, input_size=32)
    block, c = scaled.blocks[0], make_divisible(24 * 1.5)
    assert scaled.stem.out_channels == block.ghost2.out_chs == c == 40  # the residual stream is the unit rounded
    assert block.ghost2.primary.out_channels == c // 2  # each half follows it
    assert block.ghost1.primary.out_channels == make_divisible(36 * 1.5)
    assert _run(scaled).shape == (2, 10)


class DualPath(nn.Module):
    """DPN's block: ``x[:, :self.num_1x1_c]`` is the residual, the rest dense; the conv's output is cut alike."""

    def __init__(self, cin: int, res: int, inc: int) -> None:
        super().__init__()
        self.num_1x1_c = res
        self.conv = nn.Conv2d(cin, res + inc, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([x[:, :self.num_1x1_c] + y[:, :self.num_1x1_c], x[:, self.num_1x1_c:],
                          y[:, self.num_1x1_c:]], dim=1)


def test_a_slice_inside_one_conv_output_makes_it_the_sum_of_its_pieces() -> None:
    net = _Net(48, [DualPath(48, 32, 16), DualPath(64, 32, 8)], 72)  # stem: 32 residual + 16 dense
    scaled = compscale.scale(net, width=1.5, input_size=32)
    res, dense, inc1, inc2 = (make_divisible(n * 1.5) for n in (32, 16, 16, 8))
    assert scaled.stem.out_channels == res + dense
    assert [b.num_1x1_c for b in scaled.blocks] == [res, res]
    assert [b.conv.out_channels for b in scaled.blocks] == [res + inc1, res + inc2]
    assert scaled.fc.in_features == res + dense + inc1 + inc2
    assert _run(scaled).shape == (2, 10)


def test_a_seeded_sum_gives_the_change_to_its_last_piece() -> None:
    from compscale.analyse import analyse_channels
    from compscale.planning.policy import resolve_widths
    from compscale.trace import trace

    cg = analyse_channels(trace(_Net(48, [DualPath(48, 32, 16)], 64), (1, 3, 16, 16)))
    stem = cg.group_of("stem")
    res, dense = cg.sums[stem.id]
    widths = resolve_widths(cg, lambda g, d: g.base, seeds={stem.id: 100})  # a wider input, as a dense stage's
    assert (widths[res], widths[dense]) == (32, 68)


def test_numbers_written_in_a_graph_module_s_code_follow_the_width() -> None:
    """A GraphModule (a block compscale synthesized, a model traced by hand) has the numbers in its code."""
    traced = torch.fx.symbolic_trace(_Net(48, [DualPath(48, 32, 16), DualPath(64, 32, 8)], 72))
    scaled = compscale.scale(traced, width=1.5, input_size=32)
    assert isinstance(scaled, torch.fx.GraphModule)
    assert scaled.code.count("slice(None, 48, None)") == 4 and scaled.code.count("slice(48, None, None)") == 4
    assert scaled.get_submodule("blocks.1.conv").out_channels == 48 + make_divisible(8 * 1.5)
    assert _run(scaled).shape == (2, 10)


class RexBlock(nn.Module):
    """ReXNet's block: the residual is added onto the first ``self.in_channels`` of a wider output."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_channels = cin
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cat([y[:, 0:self.in_channels] + x, y[:, self.in_channels:]], dim=1)


def test_a_residual_onto_the_first_channels_ties_them_to_the_shortcut() -> None:
    scaled = compscale.scale(_Net(16, [RexBlock(16, 24), RexBlock(24, 32)], 32), width=1.5, input_size=32)
    stem, extra = make_divisible(16 * 1.5), make_divisible(8 * 1.5)
    first, second = scaled.blocks
    assert first.in_channels == stem and first.conv.out_channels == stem + extra
    assert second.in_channels == stem + extra and second.conv.out_channels == stem + 2 * extra
    assert scaled.fc.in_features == stem + 2 * extra
    assert _run(scaled).shape == (2, 10)


class ComputedBound(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(32, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[:, :x.size(1) // 2].mean() + x


def test_a_slice_at_a_computed_bound_is_refused_by_name() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=r"node %getitem.*bound computed in forward(.|\n)*Hint:"):
        compscale.scale(_Net(32, [ComputedBound()], 32), width=1.5, input_size=32)


# --- the timm models ------------------------------------------------------------------------------

timm = pytest.importorskip("timm")

# width 1.5: MACs grow about 2.25x for the plain relatives (resnet50 2.25x); rounding keeps them in this range
_TIMM = ["skresnet18", "res2net50_14w_8s", "resnest14d", "mixnet_s", "ghostnet_100", "dpn68", "rexnet_100"]


def _ratio(model: nn.Module, scaled: nn.Module) -> float:
    return compscale.profile(scaled, scaled.scaling.input_size).macs / compscale.profile(model, (224, 224)).macs


def _check_timm(name: str, lo: float, hi: float, **kwargs: float) -> None:
    model = timm.create_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no split or slice falls back to keeping its width
        scaled = compscale.scale(model, **kwargs)
    assert lo <= _ratio(model, scaled) <= hi
    with torch.no_grad():
        assert scaled.eval()(torch.randn(1, 3, *scaled.scaling.input_size)).shape == (1, 1000)


def test_skresnet18_width_1_5() -> None:
    _check_timm("skresnet18", 2.0, 2.3, width=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", _TIMM[1:])
def test_timm_width_1_5(name: str) -> None:
    _check_timm(name, 2.0, 2.3, width=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("name", _TIMM)
def test_timm_phi_1_depth_1(name: str) -> None:
    _check_timm(name, 1.45, 1.75, phi=1, depth=1)  # width 1.1, resolution 1.15: 1.1^2 x 1.15^2 = 1.6 (resnet50 1.60)


@pytest.mark.slow
def test_mixnet_s_width_1_3_is_timms_builder_with_channel_multiplier_1_3() -> None:
    from timm.models.efficientnet import _gen_mixnet_s

    scaled = compscale.scale(timm.create_model("mixnet_s"), width=1.3, fixed=["conv_head"])
    reference = _gen_mixnet_s("mixnet_s", channel_multiplier=1.3)
    shapes = {n: tuple(p.shape) for n, p in scaled.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in reference.named_parameters()}
    splits = {n: m.splits for n, m in scaled.named_modules() if hasattr(m, "splits")}
    assert splits == {n: m.splits for n, m in reference.named_modules() if hasattr(m, "splits")}
