"""The detection recipe (recipes/detect.py) and its data (recipes/data.py's ShapeBoxes): boxes that enclose what is
drawn, a metric checked by hand, a training loop that leaves torch's generator alone, and the whole comparison."""

from __future__ import annotations

import contextlib
import io
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import compscale
from recipes import detect
from recipes.data import CLASSES, ShapeBoxes, collate

MODEL = "ssdlite320_mobilenet_v3_large"
TINY = ["--input-size", "64", "--steps", "2", "--batch-size", "2", "--train-images", "4", "--eval-images", "4"]
ARMS = ["base", "compound", "depth", "width", "resolution"]


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One torch thread, as the recipe trains (``--threads 1``): two threads spin against each other on a busy
    2-core machine, 5-10x slower here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _targets(*boxes: tuple[list[float], int]) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor([b for b, _ in boxes], dtype=torch.float).reshape(-1, 4),
            "labels": torch.tensor([label for _, label in boxes], dtype=torch.int64)}


def _found(*boxes: tuple[list[float], int, float]) -> dict[str, torch.Tensor]:
    return {**_targets(*((b, label) for b, label, _ in boxes)),
            "scores": torch.tensor([score for *_, score in boxes], dtype=torch.float)}


# ShapeBoxes


@pytest.mark.parametrize("size", [64, 128])
def test_each_box_is_the_tight_box_of_the_pixels_its_shape_draws(size: int) -> None:
    data = ShapeBoxes(12, size, seed=3)
    for index in range(len(data)):
        image, masks, labels = data.render(index)
        _, target = data[index]
        assert image.shape == (3, size, size) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert masks.flatten(1).any(1).all(), "at 64 px and more every shape draws"
        assert masks.sum(0).max() <= 1, "shapes do not overlap: each is drawn whole"
        assert torch.equal(target["labels"], labels)
        for (x0, y0, x1, y1), mask in zip(target["boxes"].long().tolist(), masks):
            inside = torch.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            assert not (mask & ~inside).any(), "a drawn pixel outside its box"
            rows, cols = mask.nonzero().unbind(1)
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, x1, y1), "not tight"


def test_shapes_show_in_the_image() -> None:
    """A shape's pixels are its colour (at least 0.4 on some channel) over a background near 0.3."""
    image, masks, _ = ShapeBoxes(8, 96, seed=0).render(5)
    background = image[:, ~masks.any(0)].mean(1)
    for mask in masks:
        assert (image[:, mask].mean(1) - background).abs().max() > 0.05


def test_targets_are_what_torchvisions_detectors_take() -> None:
    data = ShapeBoxes(200, 48, seed=1)
    counts, labels = set(), set()
    for index in range(len(data)):
        _, target = data[index]
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
        assert ((target["boxes"][:, 2:] > target["boxes"][:, :2]) & (target["boxes"] >= 0)[:, 2:]).all()
        assert (target["boxes"] <= 48).all()
        counts.add(len(target["labels"]))
        labels.update(target["labels"].tolist())
    assert labels == set(range(1, len(CLASSES) + 1)), "0 is the background"
    assert counts <= {0, 1, 2, 3} and {1, 2, 3} <= counts  # 0 only when a thin ring misses every pixel at 48 px


def test_deterministic_by_seed_and_index_and_the_same_scene_at_every_size() -> None:
    a, b = ShapeBoxes(4, 80, seed=7)[2], ShapeBoxes(4, 80, seed=7)[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    assert not torch.equal(a[0], ShapeBoxes(4, 80, seed=8)[2][0])
    assert not torch.equal(a[0], ShapeBoxes(4, 80, seed=7)[3][0])
    small, large = ShapeBoxes(4, 80, seed=7)[2][1], ShapeBoxes(4, 160, seed=7)[2][1]
    assert torch.equal(small["labels"], large["labels"])
    assert torch.allclose(small["boxes"] / 80, large["boxes"] / 160, atol=2 / 80)


def test_collate_keeps_lists() -> None:
    data = ShapeBoxes(3, 32, seed=0)
    images, targets = collate([data[i] for i in range(3)])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert images[1].shape == (3, 32, 32) and set(targets[1]) == {"boxes", "labels"}


# The metric


def test_iou_precision_and_recall_by_hand() -> None:
    truth = _targets(([0, 0, 10, 10], 1), ([20, 20, 30, 30], 2))
    found = _found(([0, 0, 10, 5], 1, 0.9),       # IoU 0.5 with the first box: correct at 0.5
                   ([20, 20, 30, 30], 1, 0.8),    # exact, but the wrong label: wrong, and no IoU for box 2
                   ([5, 0, 15, 10], 1, 0.7),      # IoU 1/3 with the first box: wrong
                   ([20, 20, 30, 30], 2, 0.1))    # would be right, but scores under the threshold
    got = detect.box_metrics([found], [truth], score_threshold=0.3, iou_threshold=0.5)
    assert got == pytest.approx({"iou": (0.5 + 0.0) / 2, "precision": 1 / 3, "recall": 1 / 2})
    low = detect.box_metrics([found], [truth], score_threshold=0.05, iou_threshold=0.5)
    assert low == pytest.approx({"iou": (0.5 + 1.0) / 2, "precision": 2 / 4, "recall": 2 / 2})
    strict = detect.box_metrics([found], [truth], score_threshold=0.05, iou_threshold=0.6)
    assert strict == pytest.approx({"iou": 0.75, "precision": 1 / 4, "recall": 1 / 2})


def test_a_box_is_found_once_best_score_first() -> None:
    truth = _targets(([0, 0, 10, 10], 3))
    twice = _found(([0, 0, 10, 9], 3, 0.6), ([0, 0, 10, 10], 3, 0.9))  # the exact one scores higher and takes it
    assert detect.box_metrics([twice], [truth]) == pytest.approx({"iou": 1.0, "precision": 0.5, "recall": 1.0})


def test_metrics_add_up_over_images() -> None:
    truths = [_targets(([0, 0, 10, 10], 1)), _targets(([0, 0, 8, 8], 4), ([10, 10, 20, 20], 4))]
    found = [_found(([0, 0, 10, 10], 1, 0.9)), _found(([0, 0, 8, 4], 4, 0.5))]
    assert detect.box_metrics(found, truths) == pytest.approx({"iou": (1 + 0.5 + 0) / 3, "precision": 1.0,
                                                               "recall": 2 / 3})


def test_nothing_found_or_nothing_there_is_zero_not_nan() -> None:
    nothing = _found()
    assert detect.box_metrics([nothing], [_targets(([0, 0, 4, 4], 1))]) == {"iou": 0.0, "precision": 0.0,
                                                                           "recall": 0.0}
    assert detect.box_metrics([_found(([0, 0, 4, 4], 1, 0.9))], [_targets()]) == {"iou": 0.0, "precision": 0.0,
                                                                                 "recall": 0.0}
    assert detect.box_metrics([], []) == {"iou": 0.0, "precision": 0.0, "recall": 0.0}


# The recipe's parts on an unscaled detector


def test_detector_runs_at_the_size_asked_and_its_macs_are_its_networks() -> None:
    with torch.random.fork_rng(devices=[]):
        ssd: Any = detect.detector(MODEL, 96)
        rcnn: Any = detect.detector("fasterrcnn_mobilenet_v3_large_fpn", 80)
    assert detect.input_size(ssd) == detect.run_size(ssd) == (96, 96)
    assert detect.input_size(rcnn) == (80, 80) and detect.run_size(rcnn) == (96, 96)  # padded to 32
    assert ssd.head.classification_head.num_columns == rcnn.roi_heads.box_predictor.cls_score.out_features == 5
    assert detect.macs(rcnn) == compscale.profile(detect.Network(rcnn), 96, in_channels=3).macs > 0  # its RPN head
    ssd.eval()
    with torch.no_grad():
        [found] = ssd([torch.rand(3, 96, 96)])
    assert set(found) == {"boxes", "scores", "labels"} and (found["boxes"] <= 96).all()
    assert detect.macs(ssd) == compscale.profile(detect.Network(ssd), 96, in_channels=3).macs > 0
    assert detect.macs(ssd) < compscale.profile(detect.Network(ssd), 128, in_channels=3).macs


def test_training_moves_the_weights_and_leaves_torchs_generator_alone() -> None:
    rows_and_out = []
    for _ in range(2):
        state = torch.random.get_rng_state()
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            rows = detect.main(["--arms", "base", "--seeds", "0,1", *TINY, "--json"])
        assert torch.equal(torch.random.get_rng_state(), state)
        rows_and_out.append((rows, printed.getvalue()))
    (rows, out), (again, _) = rows_and_out
    assert rows == again, "a seed draws the same weights and images every time"
    [row] = rows
    assert row["arm"] == "base" and row["seeds"] == [0, 1] and row["macs_ratio"] == 1.0
    assert (row["depth"], row["width"], row["resolution"], row["input_size"]) == (1.0, 1.0, 1.0, [64, 64])
    for key in detect.METRICS:
        assert all(0 <= v <= 1 for v in row[f"{key}s"]) and math.isfinite(row[f"{key}_std"])
    assert "| base | - | 1.00 | 1.00 | 1.00 | 1.00 | +0 | 64 |" in out
    assert sum(line.startswith('{"arm": "base"') for line in out.splitlines()) == 2 + 1  # per seed, then the row


def test_fit_lowers_the_loss_of_a_detector() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = detect.detector(MODEL, 64)
        data = ShapeBoxes(8, 64, seed=0)
        images, targets = collate([data[i] for i in range(8)])
        before = float(sum(model(images, targets).values()).detach())
        weights = [p.detach().clone() for p in model.parameters()]
        detect.fit(model, data, steps=6, batch_size=8, lr=2e-3, seed=0)
        after = float(sum(model(images, targets).values()).detach())
    assert after < before
    assert any(not torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_match_picks_the_multiplier_nearest_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for the MACs of compscale.scale(base, depth=d), moving in steps (a block per 0.25 of depth)."""
    built: list[float] = []

    def macs_at(model: Any, dimension: str, multiplier: float) -> int:
        assert dimension == "depth"
        built.append(multiplier)
        return 100 + 40 * math.floor(4 * (multiplier - 1))

    monkeypatch.setattr(detect, "macs_at", macs_at)
    monkeypatch.setattr(detect, "macs", lambda model: model.cost)
    base = SimpleNamespace(cost=100)
    depth, cost = detect.match(base, "depth", target=205, steps=8)  # type: ignore[arg-type]
    assert cost == 220 and 1.75 <= depth < 2  # 220 is nearer 205 than 180
    assert len(built) <= 1 + 8
    assert detect.match(base, "depth", target=100, steps=8) == (1.0, 100)  # type: ignore[arg-type]
    depth, cost = detect.match(base, "depth", target=10_000, steps=2)  # type: ignore[arg-type]
    assert depth == 8.0  # out of reach: the bracket stops at x8


@pytest.mark.parametrize(("argv", "message"), [
    (["--arms", "base,tall"], "unknown arms"),
    (["--seeds", "-1"], "each 0 or more"),
    (["--steps", "0"], "must be positive"),
])
def test_bad_arguments_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        detect.parse_args(argv)
    assert message in capsys.readouterr().err


# The whole comparison


@pytest.mark.slow
def test_every_arm_trains_and_lands_in_the_table() -> None:
    try:
        with torch.random.fork_rng(devices=[]):
            compscale.scale(detect.detector(MODEL, 64), phi=1)
    except compscale.CompscaleError as e:
        pytest.skip(f"compscale.scale does not scale {MODEL} yet: {type(e).__name__}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = detect.main(["--seeds", "0,1", *TINY, "--bisect-steps", "3"])
    assert [r["arm"] for r in rows] == ARMS
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["compound"]["macs_ratio"] == 1.0 and by_arm["base"]["macs_ratio"] < 1.0
    assert by_arm["compound"]["input_size"][0] > 64 and by_arm["resolution"]["input_size"][0] > 64
    assert by_arm["depth"]["input_size"] == by_arm["width"]["input_size"] == [64, 64]
    assert by_arm["resolution"]["params"] == by_arm["base"]["params"]  # more pixels, the same weights
    assert by_arm["compound"]["neck_width"] == pytest.approx(1.35)  # EfficientDet's neck and heads: 1.35**phi
    assert by_arm["width"]["neck_width"] == by_arm["width"]["width"] > 1  # one dimension: the neck as the trunk
    assert by_arm["depth"]["neck_width"] == by_arm["resolution"]["neck_width"] == 1.0
    assert all(r["head_layers"] == 0 for r in rows)  # floor(phi / 3) = 0 at phi 1
    for r in rows:
        assert r["seeds"] == [0, 1] and r["macs"] > 0 and math.isfinite(r["macs_ratio"])
        for key in detect.METRICS:
            assert all(math.isfinite(v) for v in r[f"{key}s"]) and math.isfinite(r[f"{key}_std"])
        assert f"| {r['arm']} | " in out.getvalue()
