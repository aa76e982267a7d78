"""Ops without a channel rule are probed: one that maps channels one to one scales, one that mixes them is
refused with the channels that showed it, and probing leaves the random state and the model as they were."""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.fx
from torch import nn

import compscale
from compscale.analyse import analyse_channels
from compscale.analyse.rules import elementwise, fixed
from compscale.trace import trace


def swish(x: torch.Tensor) -> torch.Tensor:
    """Kept whole with ``autowrap_functions=[swish]``: one call without a rule."""
    return x * torch.sigmoid(x)


def hard_clip(x: torch.Tensor) -> torch.Tensor:
    """Kept whole by ``torch.fx.wrap`` below."""
    return torch.clamp(x, -1.0, 1.0) * 2


torch.fx.wrap("hard_clip")

CALLS: list[int] = []


def counted(x: torch.Tensor) -> torch.Tensor:
    CALLS.append(1)
    return x * 0.5


def noisy(x: torch.Tensor) -> torch.Tensor:
    """Per-channel, and stochastic."""
    return x + 0.1 * torch.randn_like(x) + random.random()


class Net(nn.Module):
    """conv -> op -> conv: the op decides whether the first conv can widen."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.conv(x)))


def _flip_spatial(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(2,))


def _roll_spatial(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, 2, dims=3)


def _flip_channels(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(1,))


def _cumsum_spatial(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(-1)


def _call_swish(x: torch.Tensor) -> torch.Tensor:
    return swish(x)


def _call_hard_clip(x: torch.Tensor) -> torch.Tensor:
    return hard_clip(x)


def _scaled_runs(scaled: nn.Module) -> torch.Tensor:
    out = scaled(torch.randn(1, 3, *scaled.scaling.input_size))
    assert out.shape == (1, 4, *scaled.scaling.input_size)
    return out


@pytest.mark.parametrize("op", [_flip_spatial, _roll_spatial, _cumsum_spatial, _call_swish, _call_hard_clip],
                         ids=["flip-H", "roll-W", "cumsum-W", "autowrapped", "fx.wrap"])
def test_a_per_channel_function_without_a_rule_widens_through(op: Callable[[torch.Tensor], torch.Tensor]) -> None:
    model = Net(op)
    scaled = compscale.scale(model, width=2, input_size=16, autowrap_functions=[swish])
    assert scaled.conv.out_channels == 16 and scaled.head.in_channels == 16 and scaled.head.out_channels == 4
    _scaled_runs(scaled)
    cg = analyse_channels(trace(model, (1, 3, 16, 16), autowrap_functions=[swish]))
    assert cg.layers["head"].inputs == ((cg.group_of("conv").id, 1),)  # the op's output is the conv's group


class Swish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.5))  # one number, not one per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class ChannelScale(nn.Module):
    """Weights sized to its channels: it cannot run with another width, so it cannot be probed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


def test_a_per_channel_leaf_module_without_a_rule_widens_through() -> None:
    scaled = compscale.scale(Net(Swish()), width=2, input_size=16, leaf_modules=[Swish])
    assert scaled.conv.out_channels == 16 and scaled.head.in_channels == 16
    assert isinstance(scaled.op, Swish) and float(scaled.op.beta.detach()) == 1.5
    _scaled_runs(scaled)


def test_a_leaf_module_with_weights_per_channel_still_needs_a_rule() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=r"no channel rule for module type ChannelScale\nHint:"):
        compscale.scale(Net(ChannelScale(8)), width=2, input_size=16, leaf_modules=[ChannelScale])


class PositionWeight(nn.Module):
    """Per channel, but written for its traced map size: probed on that size rather than a small one."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.linspace(0.5, 1.5, size * size).view(1, 1, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_a_leaf_that_runs_only_at_its_traced_size_is_probed_at_that_size() -> None:
    scaled = compscale.scale(Net(PositionWeight(20)), width=2, input_size=20, resolution=1,
                             leaf_modules=[PositionWeight])
    assert scaled.conv.out_channels == 16 and scaled.head.in_channels == 16
    _scaled_runs(scaled)


def test_a_channel_flip_is_refused_naming_the_channels_it_mixes() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=(
            r"no channel rule for call_function flip, and probing shows it mixes channels \(channel 0 of its input "
            r"changes channel 7 of its output\)\n.*Hint: .*register_channel_rule\(flip")):
        compscale.scale(Net(_flip_channels), width=2, input_size=16)
    kept = compscale.scale(Net(_flip_channels), width=2, input_size=16, rules={torch.flip: fixed})
    assert kept.conv.out_channels == 8 and kept.head.in_channels == 8  # what the hint offers works
    _scaled_runs(kept)


class Gate(nn.Module):
    """A data-dependent gate over the whole tensor: every channel decides for all the others."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.mean() > 0)


@pytest.mark.parametrize("seed", range(4))
def test_a_global_gate_is_refused_whatever_the_weights(seed: int) -> None:
    torch.manual_seed(seed)  # the gate is open for some inits and closed for others
    with pytest.raises(compscale.UnsupportedOpError, match=r"module type Gate, and probing shows it mixes channels"):
        compscale.scale(Net(Gate()), width=2, input_size=16, leaf_modules=[Gate])


def mix_pair(x: torch.Tensor) -> torch.Tensor:
    """Mixes only channels 2 and 3 of 8: the first, middle and last channels alone do not show it."""
    return torch.cat([x[:, :2], x[:, 2:4].sum(1, keepdim=True).expand(-1, 2, -1, -1), x[:, 4:]], 1)


def _call_mix_pair(x: torch.Tensor) -> torch.Tensor:
    return mix_pair(x)


def test_mixing_between_two_inner_channels_is_found() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=r"channel 2 of its input changes channel 3 of its output"):
        compscale.scale(Net(_call_mix_pair), width=2, input_size=16, autowrap_functions=[mix_pair])


def _roll_by_height(x: torch.Tensor) -> torch.Tensor:
    return torch.roll(x, x.shape[2] // 2, dims=2)


def test_an_op_reading_another_graph_value_is_not_probed() -> None:
    with pytest.raises(compscale.UnsupportedOpError, match=r"no channel rule for call_function roll\nHint:"):
        compscale.scale(Net(_roll_by_height), width=2, input_size=16)


def test_a_registered_rule_wins_over_probing() -> None:
    pinned = compscale.scale(Net(_call_swish), width=2, input_size=16, autowrap_functions=[swish],
                             rules={swish: fixed})
    assert pinned.conv.out_channels == 8 and pinned.head.in_channels == 8  # probing would have widened them
    _scaled_runs(pinned)
    trusted = compscale.scale(Net(_flip_channels), width=2, input_size=16, rules={torch.flip: elementwise})
    assert trusted.conv.out_channels == 16  # the user's word, although probing would refuse it


class ChannelsLast(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dims = dims
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flip(self.conv(x).permute(0, 2, 3, 1), dims=self.dims)
        return self.head(y.permute(0, 3, 1, 2))


def test_probing_follows_the_channel_dimension_of_a_channels_last_tensor() -> None:
    scaled = compscale.scale(ChannelsLast((1, 2)), width=2, input_size=16)  # flips H and W of (N, H, W, C)
    assert scaled.conv.out_channels == 16 and scaled.head.in_channels == 16
    _scaled_runs(scaled)
    with pytest.raises(compscale.UnsupportedOpError, match=r"flip, and probing shows it mixes channels"):
        compscale.scale(ChannelsLast((3,)), width=2, input_size=16)  # flips C


class RunningMax(nn.Module):
    """Divides by a running maximum it updates while training, as BatchNorm updates its running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_max", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_max = torch.maximum(self.running_max, x.detach().abs().max())
        return x / self.running_max


class Stochastic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = RunningMax()
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(noisy(self.norm(self.bn(self.conv(x)))))


def test_probing_leaves_random_state_running_statistics_and_modes_untouched() -> None:
    model = Stochastic().train()
    traced = trace(model, (1, 3, 16, 16), leaf_modules=[RunningMax], autowrap_functions=[noisy])
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    cg = analyse_channels(traced)  # probes RunningMax and noisy, a stochastic function accepted all the same
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert cg.layers["head"].inputs == ((cg.group_of("conv").id, 1),)
    assert float(model.norm.running_max) == 1.0 and int(model.bn.num_batches_tracked) == 0
    assert model.training and model.norm.training


def test_an_accepted_probe_logs_and_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="compscale.analyse.probe"):
            analyse_channels(trace(Net(_flip_spatial), (1, 3, 16, 16)))
    assert any("call_function flip" in r.getMessage() and "one to one" in r.getMessage() for r in caplog.records)


class Thrice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return counted(counted(counted(self.conv(x))))


def _call_counted(x: torch.Tensor) -> torch.Tensor:
    return counted(x)


def test_a_function_called_many_times_is_probed_once_per_analysis() -> None:
    traced = trace(Net(_call_counted), (1, 3, 16, 16), autowrap_functions=[counted])
    CALLS.clear()
    analyse_channels(traced)
    once = len(CALLS)
    traced = trace(Thrice(), (1, 3, 16, 16), autowrap_functions=[counted])
    CALLS.clear()
    analyse_channels(traced)
    assert 0 < once == len(CALLS)
