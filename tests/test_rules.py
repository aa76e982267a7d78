"""Channel rules are scoped (per call, per ``with`` block, per thread), removable, warned about when they
override a built-in, and carried into process-pool workers."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from torch import nn

import compscale
from compscale.analyse.rules import active_rules, elementwise, fixed


class Gate(nn.Module):
    """Data-dependent, so it must be a leaf, and a leaf compscale knows nothing about."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x.mean() > 0)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.gate = Gate()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.conv(x)))


def _scale() -> nn.Module:
    return compscale.scale(Gated(), width=2, leaf_modules=[Gate])


def test_a_rule_for_one_call_only() -> None:
    scaled = compscale.scale(Gated(), width=2, leaf_modules=[Gate], rules={Gate: elementwise})
    assert scaled.conv.out_channels == 16 and scaled.head.in_channels == 16
    with pytest.raises(compscale.UnsupportedOpError, match="module type Gate"):
        _scale()


def test_a_rule_for_a_with_block_only() -> None:
    with compscale.channel_rules({Gate: elementwise}):
        assert _scale().head.in_channels == 16
        assert compscale.plan(Gated(), width=2, leaf_modules=[Gate]).groups
    with pytest.raises(compscale.UnsupportedOpError, match="module type Gate"):
        _scale()


def test_scoped_rules_stay_in_their_thread() -> None:
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            _scale()
        except compscale.UnsupportedOpError as e:
            errors.append(e)

    with compscale.channel_rules({Gate: elementwise}):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert _scale().head.in_channels == 16
    assert len(errors) == 1  # the other thread did not see this block's rule


def test_overriding_a_built_in_rule_warns_and_can_be_undone() -> None:
    with pytest.warns(UserWarning, match=r"overrides a built-in rule for every later call"):
        compscale.register_channel_rule(nn.ReLU, fixed)
    try:
        assert active_rules().module_rule(nn.ReLU()) is fixed
    finally:
        compscale.unregister_channel_rule(nn.ReLU)
    assert active_rules().module_rule(nn.ReLU()) is elementwise


def _build() -> nn.Module:
    return Gated()


def _score(model: nn.Module, size: tuple[int, int]) -> float:
    return float(model.head.in_channels)


@pytest.mark.slow  # a spawned worker imports torch: about 10 s
def test_rules_in_force_reach_process_pool_workers() -> None:
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))  # a fresh interpreter
    with pool, compscale.channel_rules({Gate: elementwise}):
        result = compscale.search(_build, _score, {"alpha": [1.0], "beta": [1.5], "gamma": [1.0]}, cost_factor=2.25,
                                  tolerance=0.01, executor=pool, input_size=32, leaf_modules=[Gate])
    assert result.rows[0]["error"] is None, result.rows[0]["error"]
    assert result.rows[0]["score"] == 16.0  # width 1.5 -> make_divisible(12) = 16 in the worker
