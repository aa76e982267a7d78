"""docs/model_table.py, the script behind docs/torchvision.md and docs/timm.md: models built on the meta device, run
by chunked workers, each row what the model gives or the exception it raises, the page's counts."""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parent.parent / "docs" / "model_table.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("model_table", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table() -> ModuleType:
    return _script()


def test_named_models_are_built_on_meta_and_counted_on_the_page(table: ModuleType, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "models.md"
    start = time.monotonic()
    table.main(["--names", "resnet18,alexnet,r3d_18", "--jobs", "1", "--chunk", "3", "--quiet", "--write", str(page)])
    assert time.monotonic() - start < 60
    text = page.read_text()
    assert re.search(r"\| resnet18 \| x2\.\d\d MACs \| x1\.\d\d MACs \| x2\.\d\d MACs \|", text), text
    assert re.search(r"\| alexnet \| x\d\.\d\d MACs \| x\d\.\d\d MACs \| x\d\.\d\d MACs \|", text), text
    # a video model takes (N, 3, T, H, W) clips: scaled at 16 frames of 112x112, its phi=1 size grows every dim
    assert re.search(r"\| r3d_18 \| depth x1\.5 \| 16x112x112 \|", text), text
    grown = re.search(r"\| r3d_18 \| phi=1 \| (\d+)x(\d+)x(\d+) \|", text)
    assert grown and int(grown[1]) > 16 and int(grown[2]) > 112 and int(grown[3]) > 112, text
    assert "built on the meta device (shapes only, no weights)" in text
    assert re.search(r"3 of the \d+ models `compscale models --library torchvision` lists", text), text
    assert "- scale all three ways: 3\n" in text and "3 of 3 scale all three ways" in text
    assert "## Failures\n\nNone." in text
    assert "| resnet18 |" in capsys.readouterr().out


def test_counts_and_failures_tell_compscale_errors_from_bugs(table: ModuleType) -> None:
    ok = table.Success(2.0, 10, 20, (256, 256))
    ours = table.Failure("NotACNNError", "no convolution: a ViT", "use a CNN.", True)
    bug = table.Failure("AttributeError", "'X' object has no attribute 'y'", None, False)
    results = {"a": dict.fromkeys(table.MODES, ok),
               "b": {"phi=1": ok, "depth x1.5": ours, "width x1.5": ok},
               "c": {"phi=1": ours, "depth x1.5": bug, "width x1.5": ours}}
    assert table.counts(results) == (1, 1, 1)
    failures = table.failures(results)
    assert "- **b**, depth x1.5: `NotACNNError`: no convolution: a ViT\n  Hint: use a CNN." in failures
    assert "- **c**, depth x1.5: `AttributeError` (not a `CompscaleError`: a compscale bug): 'X' object" in failures
    assert "| c | NotACNNError: a ViT | AttributeError: 'X' object has no attribute 'y' |" in table.table(results)


def test_a_worker_past_its_timeout_is_stopped_and_each_model_left_is_pinned_alone(
        table: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table, "FIRST_EXTRA_S", 0.0)  # no time even to import torch: every worker times out
    rows: dict[str, tuple[dict, float, str]] = {}
    start = time.monotonic()
    table.run_chunk("torchvision", ["alexnet", "resnet18"], 0.2, lambda n, o, s, w: rows.update({n: (o, s, w)}))
    assert time.monotonic() - start < 10
    assert sorted(rows) == ["alexnet", "resnet18"]  # the chunk's worker, then one worker per model, each stopped
    for outcomes, _, _ in rows.values():
        assert [(o.error, o.first_line, o.ours) for o in outcomes.values()] == [("Timeout", "took more than 0.2 s",
                                                                                 False)] * 3


def test_a_cached_run_goes_on_where_the_last_one_stopped(table: ModuleType, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "results.jsonl"
    first, _, _ = table.run_all("torchvision", ["resnet18"], 1, 4, 300, progress=False, cache=cache)
    with cache.open("a") as f:
        f.write('{"name": "alexnet", "seconds"')  # a line cut short by a stopped run
    ran: list[list[str]] = []
    real = table.run_chunk
    monkeypatch.setattr(table, "run_chunk", lambda library, names, *a: (ran.append(names), real(library, names, *a)))
    again, _, _ = table.run_all("torchvision", ["resnet18", "alexnet"], 1, 4, 300, progress=False, cache=cache)
    assert ran == [["alexnet"]]  # resnet18 came from the cache, alexnet's cut line was run again
    assert again["resnet18"] == first["resnet18"] and set(again) == {"resnet18", "alexnet"}
    assert len(cache.read_text().splitlines()) == 3
