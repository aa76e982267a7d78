"""The strategies recipe (recipes/strategies.py): scaling strategies at equal MACs, over seeds, with latency."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import torch

import compscale
from recipes import ablation, models, strategies, train

TINY = ["--steps", "2", "--batch-size", "4", "--train-images", "16", "--eval-images", "16", "--latency-batch", "2",
        "--latency-time", "0.02", "--latency-rounds", "2"]
ARMS = ["base", "compound", "fast", "depth", "width", "resolution"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], str, Path]:
    """One tiny run of the whole recipe, 2 seeds (about 20 s on 2 busy cores): its rows, what it printed, the PNG."""
    png = tmp_path_factory.mktemp("strategies") / "strategies.png"
    out = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(out):
        rows = strategies.main(["--seeds", "0,1", *TINY, "--plot", str(png), "--json"])
    assert torch.get_num_threads() == threads  # training ran on --threads 1, and the setting is restored
    return rows, out.getvalue(), png


def _row(out: str, arm: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.startswith(f"| {arm} | "))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_every_arm_lands_on_the_compound_models_macs(two_seeds: tuple[list[dict[str, Any]], str, Path]) -> None:
    rows, _, _ = two_seeds
    assert [r["arm"] for r in rows] == ARMS
    compound = rows[1]
    assert compound["input_size"] == [40, 40] and compound["macs_ratio"] == 1.0
    for r in rows[2:]:  # channels to multiples of 2, inputs to multiples of 8: within 5%
        if r["arm"] != "depth":
            assert r["macs"] == pytest.approx(compound["macs"], rel=0.05), r["arm"]
    # Depth moves in whole blocks: one more block in each of tiny_resnet's three stages is about 18% of compound's
    # MACs here, so the depth arm is the block count whose MACs are nearest compound's, one block either way worse.
    depth = {r["arm"]: r for r in rows}["depth"]
    blocks = compscale.plan(models.tiny_resnet(), depth=depth["depth"], input_size=32).stages[0].blocks_after
    for other in (blocks - 1, blocks + 1):
        macs = compscale.plan(models.tiny_resnet(), depth=other / 2, input_size=32).macs
        assert abs(depth["macs"] - compound["macs"]) < abs(macs - compound["macs"]), other
    assert rows[0]["macs"] < compound["macs"] / 2  # the base is phi 0
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["depth"]["width"] == by_arm["depth"]["resolution"] == 1.0 < by_arm["depth"]["depth"]
    assert by_arm["resolution"]["params"] == by_arm["base"]["params"]  # more pixels, the same weights
    assert by_arm["resolution"]["input_size"][0] > 40


def test_fast_scaling_has_fewer_activations_than_compound(two_seeds: tuple[list[dict[str, Any]], str, Path]) -> None:
    by_arm = {r["arm"]: r for r in two_seeds[0]}
    assert by_arm["width"]["acts"] < by_arm["fast"]["acts"] < by_arm["compound"]["acts"]
    assert by_arm["compound"]["acts"] < by_arm["resolution"]["acts"]


def test_table_reports_seeds_spread_and_latency(two_seeds: tuple[list[dict[str, Any]], str, Path]) -> None:
    rows, out, png = two_seeds
    assert "latency (ms, batch 2, 1 thread)" in out
    for r in rows:
        assert r["seeds"] == [0, 1] and len(r["accuracies"]) == 2
        assert r["accuracy_mean"] == pytest.approx(sum(r["accuracies"]) / 2)
        assert r["latency_median"] > 0 and r["latency_runs"] >= 2  # pooled over the 2 rounds
        cells = _row(out, r["arm"])
        latency, accuracy, seeds = cells[-3:]
        assert "±" in latency and float(latency.split("±")[0]) == pytest.approx(r["latency_median"] * 1e3, abs=0.06)
        assert accuracy == f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}" and seeds == "2"
        assert cells[8] == f"{r['acts'] / 1e6:.3f}"
    assert sum(line.startswith('{"arm": ') for line in out.splitlines()) == 2 * len(ARMS) + len(ARMS)  # --json
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == PNG


def test_summary_is_mean_and_sample_std_over_seeds() -> None:
    def run(arm: str, seed: int, accuracy: float) -> dict[str, Any]:
        return {"arm": arm, "seed": seed, "accuracy": accuracy, "depth": 1.0, "width": 1.0, "resolution": 1.0,
                "input_size": [32, 32], "params": 1000, "macs": 2_000_000 if arm == "b" else 1_000_000, "acts": 500,
                "strategy": "compound", "phi": 0.0}

    runs = [run("a", 0, 0.5), run("b", 0, 0.5), run("a", 1, 0.75), run("b", 1, 0.5), run("a", 2, 1.0)]
    timed = compscale.Latency(0.010, 0.002, (0.009, 0.010, 0.011), 32, (32, 32), "cpu", False, 1)
    rows = strategies.summarise(runs, {"a": timed, "b": timed}, reference="b")
    assert [r["arm"] for r in rows] == ["a", "b"] and rows[0]["macs_ratio"] == 0.5
    assert rows[0]["accuracy_mean"] == 0.75 and rows[0]["accuracy_std"] == pytest.approx(0.25)
    assert rows[1]["accuracy_std"] == 0.0
    text = strategies.table(rows)
    assert "| a | 1.00 | 1.00 | 1.00 | 32 | 0.001 | 1.0 | 0.500 | 0.001 | 10.0 ± 2.0 | 0.7500 ± 0.2500 | 3 |" in text


def test_seeds_parse_with_commas_or_spaces_and_ablation_keeps_seed() -> None:
    assert strategies.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2] == strategies.parse_args([]).seeds
    assert strategies.parse_args(["--seeds", "4", "5"]).seeds == [4, 5]
    assert ablation.parse_args(["--seed", "3"]).seeds == [3]
    with pytest.raises(SystemExit):
        ablation.parse_args(["--seed", "3", "--seeds", "4"])


def test_train_refuses_a_checkpoint_with_a_custom_width_rounding(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train.parse_args(["--width-divisor", "2", "--checkpoint", str(tmp_path / "m.pt")])
    assert train.RoundTo(2)(17.6, 8) == 18 and train.RoundTo(2)(17.6, 24) == 24  # a grouped conv's divisor stays
