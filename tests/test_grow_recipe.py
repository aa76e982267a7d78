"""The warm-start recipe (recipes/grow.py): grow a trained model with init="preserve" and train on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from recipes import grow

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps1", "6", "--steps2", "6", "--eval-every", "3", "--batch-size", "8",
        "--train-images", "64", "--eval-images", "64"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Train on one intra-op thread: on a busy 2-core machine (tests in parallel), two spinning threads per
    process make these tiny steps 10-20 times slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _png_size(path: Path) -> tuple[int, int, int]:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3
    return image.shape


def test_grown_model_keeps_the_base_accuracy_and_the_table_has_three_arms(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "grow.png"
    results = grow.main(["--seeds", "0", *TINY, "--plot", str(png), "--json"])
    out = capsys.readouterr().out

    check = results[0]["check"]
    assert check["init"] == "preserve"
    # the same function at the base input size: the same accuracy on the same images, logits to float error
    assert check["grown_accuracy"] == check["base_accuracy"]
    assert check["max_logit_gap"] < 1e-4
    assert check["preserved"] and check["scaled_input_size"] == 40
    assert f"base {check['base_accuracy']:.4f}, grown right after growing {check['base_accuracy']:.4f}" in out

    arms = results[0]["arms"]
    assert set(arms) == set(grow.ARMS)
    for arm in arms.values():
        assert math.isfinite(arm["final"]) and 0.0 <= arm["final"] <= 1.0 and arm["finite_weights"]
    # every arm is evaluated every 3 steps up to 12 in all; the grown one also right after growing, at 40 px
    assert arms["scratch"]["steps"] == [3, 6, 9, 12] == arms["base trained on"]["steps"]
    assert arms["grown (warm start)"]["steps"] == [3, 6, 6, 9, 12]
    assert arms["grown (warm start)"]["accuracy"][2] == check["grown_accuracy_scaled"]
    assert arms["grown (warm start)"]["input_size"] == arms["scratch"]["input_size"] == 40
    assert arms["grown (warm start)"]["params"] == arms["scratch"]["params"] > arms["base trained on"]["params"]

    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for arm in grow.ARMS:
        assert any(line.startswith(f"| {arm} | ") for line in rows), arm
    jsons = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [j.get("arm") for j in jsons] == [None, *grow.ARMS]
    assert "plot: " + str(png) in out
    height, width, _ = _png_size(png)
    assert height > 100 and width > 100


def test_table_reports_mean_std_min_max_over_seeds() -> None:
    def seed(final: float) -> dict[str, object]:
        arm = {"input_size": 40, "params": 316_244, "macs": 68_173_088, "train_macs": 1.0, "steps": [10],
               "accuracy": [final], "final": final}
        return {"check": {"input_size": 32}, "arms": {a: arm for a in grow.ARMS}}

    out = grow.table([seed(0.5), seed(0.75), seed(1.0)])
    row = next(line for line in out.splitlines() if line.startswith("| scratch | "))
    assert row.endswith("| 0.7500 | 0.2500 | 0.5000 | 1.0000 | 3 |")  # mean, sample std, min, max, seeds
    assert "| grown (warm start) | 32 → 40 | 0.316 | 68.2 |" in out


@pytest.mark.slow  # two seeds end to end, 15-60 s
def test_two_seeds_give_a_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = grow.main(["--seeds", "0", "1", *TINY, "--steps1", "4", "--steps2", "4", "--eval-every", "4",
                         "--plot", str(tmp_path / "g.png")])
    out = capsys.readouterr().out
    assert [r["seed"] for r in results] == [0, 1]
    assert all(r["check"]["grown_accuracy"] == r["check"]["base_accuracy"] for r in results)
    row = next(line for line in out.splitlines() if line.startswith("| scratch | "))
    finals = [r["arms"]["scratch"]["final"] for r in results]
    cells = [c.strip() for c in row.strip("|").split("|")]
    mean, _std, lo, hi, seeds = cells[5:]
    assert float(mean) == pytest.approx(sum(finals) / 2, abs=1e-4)
    assert (float(lo), float(hi)) == pytest.approx((min(finals), max(finals)), abs=1e-4) and seeds == "2"


@pytest.mark.slow  # two processes train for 20-40 s
def test_two_ranks_under_torchrun_print_one_table(tmp_path: Path) -> None:
    png = tmp_path / "grow.png"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "recipes" / "grow.py"), "--seeds", "0", *TINY, "--plot", str(png)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()  # rank 0 alone prints: one check line, one table row per arm
    assert sum(line.startswith("| scratch | ") for line in lines) == 1
    assert sum("same accuracy" in line for line in lines) == 1
    assert png.exists() and _png_size(png)[0] > 100
