"""alpha/beta/gamma search: the admissible grid, serial and process-pool runs agree, resume, failures recorded."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn

import compscale
from compscale.grid import candidates

GRID = {"alpha": [1.1, 1.2, 1.3], "beta": [1.05, 1.1], "gamma": [1.1, 1.15, 1.2]}


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _Block(16), _Block(16), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def cheap_score(model: nn.Module, input_size: tuple[int, int]) -> float:
    """Deterministic: a made-up accuracy that likes resolution and parameters, with diminishing returns."""
    params = sum(p.numel() for p in model.parameters())
    return round(1 - 1 / (input_size[0] * params) ** 0.25, 6)


def fails_above_32px(model: nn.Module, input_size: tuple[int, int]) -> float:
    if input_size[0] > 32:  # gamma >= 1.15 plans 40 px from 32
        raise RuntimeError("out of memory (simulated)")
    return cheap_score(model, input_size)


def test_only_candidates_near_the_cost_factor_are_kept() -> None:
    kept = candidates(GRID, cost_factor=2.0, tolerance=0.1)
    assert kept and all(abs(c.cost_factor - 2.0) <= 0.1 for c in kept)
    assert len(kept) < 18


def test_serial_and_process_pool_give_the_same_ranked_table() -> None:
    serial = compscale.search(tiny_net, cheap_score, GRID, input_size=32)
    with ProcessPoolExecutor(max_workers=2) as pool:
        parallel = compscale.search(tiny_net, cheap_score, GRID, input_size=32, executor=pool)
    assert serial.rows == parallel.rows
    scores = [r["score"] for r in serial.rows]
    assert scores == sorted(scores, reverse=True)
    assert all(abs(r["cost_factor"] - 2.0) <= 0.1 and r["macs"] > 0 for r in serial.rows)
    assert "alpha" in str(serial).splitlines()[0]


def test_an_interrupted_run_resumes_without_re_evaluating(tmp_path: Path) -> None:
    results = tmp_path / "search.jsonl"
    full = compscale.search(tiny_net, cheap_score, GRID, input_size=32, results=results)
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:2]) + "\n")  # as if stopped after two candidates
    calls: list[int] = []

    def counting(model: nn.Module, size: tuple[int, int]) -> float:
        calls.append(1)
        return cheap_score(model, size)

    resumed = compscale.search(tiny_net, counting, GRID, input_size=32, results=results)
    assert len(calls) == len(lines) - 2
    assert resumed.rows == full.rows
    assert len(results.read_text().splitlines()) == len(lines)


def test_a_failing_candidate_is_recorded_not_fatal(tmp_path: Path) -> None:
    results = tmp_path / "search.jsonl"
    out = compscale.search(tiny_net, fails_above_32px, GRID, input_size=32, results=results)
    failed = [r for r in out.rows if r["error"]]
    assert failed and len(failed) < len(out.rows) and all("out of memory (simulated)" in r["error"] for r in failed)
    assert out.rows[-len(failed):] == failed  # failures rank last
    assert {json.loads(line)["key"] for line in results.read_text().splitlines()} == {r["key"] for r in out.rows}
