"""The recipes: procedural data, DDP training under torchrun, checkpoints that resume, the ablation plot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compscale
from recipes import ablation, train
from recipes.data import Shapes

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "4", "--batch-size", "8", "--train-images", "64", "--eval-images", "32", "--quiet"]


def test_shapes_are_deterministic_and_render_at_any_size() -> None:
    a, b = Shapes(16, 32, seed=3), Shapes(16, 32, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(16))
    assert Shapes(4, 57)[1][0].shape == (3, 57, 57)
    assert {Shapes(64, 16)[i][1] for i in range(64)} == {0, 1, 2, 3}


@pytest.mark.slow  # trains for 10-25 s
def test_two_ranks_under_torchrun_agree_on_the_weights(tmp_path: Path) -> None:
    digest = tmp_path / "weights"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           str(ROOT / "recipes" / "train.py"), "--phi", "1", "--digest", str(digest), *FAST]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert '"world_size": 2' in result.stdout
    ranks = [Path(f"{digest}.rank{r}").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 64


def test_checkpoint_carries_the_plan_and_resumes(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.pt"
    first = train.main(["--phi", "1", "--checkpoint", str(ckpt), *FAST])
    assert first["input_size"] == [40, 40]
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    again = compscale.checkpoint.load(ckpt)
    assert again.scaling.input_size == (40, 40)
    resumed = train.main(["--phi", "1", "--checkpoint", str(ckpt), *FAST[:1], "6", *FAST[2:]])
    assert resumed["steps"] == 6 and torch.load(ckpt, weights_only=True)["step"] == 6


@pytest.mark.slow  # trains for 10-25 s
def test_ablation_prints_the_table_and_saves_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "ablation.png"
    rows = ablation.main(["--steps", "3", "--seeds", "0,1", "--batch-size", "8", "--train-images", "32",
                          "--eval-images", "32", "--latency-batch", "2", "--latency-time", "0.02", "--plot", str(png)])
    assert [r["arm"] for r in rows] == ["baseline", "compound phi=1", "depth only", "width only", "resolution only"]
    compound = rows[1]["macs"]
    assert rows[3]["macs"] == pytest.approx(compound, rel=0.03)  # width-only
    # depth moves in whole blocks (2 -> 3 per stage) and resolution in 8-pixel steps (32 -> 40 px is x1.56):
    # at this tiny size those rows land on the nearest step
    assert rows[2]["macs"] == pytest.approx(compound, rel=0.15) and rows[4]["macs"] == pytest.approx(compound, rel=0.15)
    assert all(r["seeds"] == [0, 1] and r["acts"] > 0 and r["latency_median"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| scaling |" in out and "acts (M)" in out and "latency (ms, batch 2, 1 thread)" in out
    line = next(line for line in out.splitlines() if line.startswith("| compound phi=1 |"))
    assert line.count("±") == 2 and line.endswith("| 2 |")  # latency median ± IQR, accuracy mean ± std, 2 seeds
    assert "plot:" in out
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.slow  # trains for 10-25 s
def test_search_recipe_ranks_the_admissible_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recipes import search

    result = search.main(["--steps", "2", "--results", str(tmp_path / "s.jsonl")])
    assert result.rows and all(abs(r["cost_factor"] - 2.0) <= 0.1 and r["error"] is None for r in result.rows)
    assert "alpha" in capsys.readouterr().out
