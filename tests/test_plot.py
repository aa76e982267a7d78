"""compscale.verify.plot: the cost of each strategy against phi, written as a PNG."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path
from typing import Any

import pytest

from compscale.errors import CompscaleError
from compscale.verify.plot import plot_costs

matplotlib = pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_rows(latency: bool) -> list[dict[str, Any]]:
    rows = []
    for strategy, (macs, params) in {"compound": (2.0, 1.5), "width": (2.0, 4.0)}.items():
        for phi in range(4):
            row = {"strategy": strategy, "phi": float(phi), "macs": 4.1e9 * macs**phi, "params": 25.6e6 * params**phi,
                   "acts": 11e6 * 1.9**phi}
            if latency:
                row["latency"] = 0.02 * 1.8**phi if phi != 2 else None  # a point not measured is left out
            rows.append(row)
    return rows


def read_png(path: Path) -> Any:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    return matplotlib.image.imread(path)


@pytest.mark.parametrize("latency", [False, True])
def test_writes_a_png_with_one_panel_per_metric(tmp_path: Path, latency: bool) -> None:
    out = tmp_path / "costs.png"
    assert plot_costs(synthetic_rows(latency), out, title="resnet50") == str(out)
    image = read_png(out)
    height, width, channels = image.shape
    assert channels == 4 and height > 100 and width > 100
    # one panel per metric, side by side: a fourth panel (latency) makes the figure wider
    assert width == pytest.approx(420 * (4 if latency else 3), rel=0.05)


def test_metrics_choose_the_panels_and_rows_without_a_base_plot_absolute(tmp_path: Path) -> None:
    rows = [r for r in synthetic_rows(True) if r["phi"] > 0]  # no phi=0 row: absolute values
    out = plot_costs(rows, str(tmp_path / "latency.png"), metrics=["latency"])
    assert read_png(Path(out)).shape[1] == pytest.approx(420, rel=0.05)


def test_does_not_touch_the_pyplot_backend(tmp_path: Path) -> None:
    before = matplotlib.get_backend()
    plot_costs(synthetic_rows(False), tmp_path / "c.png")
    assert matplotlib.get_backend() == before


def test_rows_without_any_metric_raise(tmp_path: Path) -> None:
    rows = [{"strategy": "compound", "phi": 0.0, "latency": None}, {"strategy": "compound", "phi": 1.0}]
    with pytest.raises(ValueError, match="no row has a value for any metric"):
        plot_costs(rows, tmp_path / "c.png")
    with pytest.raises(ValueError, match="no rows"):
        plot_costs([], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_bad_rows_and_metrics_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row 1 has no 'strategy' or no 'phi'"):
        plot_costs([{"strategy": "a", "phi": 0, "macs": 1}, {"phi": 1, "macs": 2}], tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['flops'\]"):
        plot_costs(synthetic_rows(False), tmp_path / "c.png", metrics=["flops"])
    with pytest.raises(ValueError, match=r"no row has a value for any metric to plot \(latency\)"):
        plot_costs(synthetic_rows(False), tmp_path / "c.png", metrics=["latency"])


def test_a_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"directory .*missing.* does not exist"):
        plot_costs(synthetic_rows(False), tmp_path / "missing" / "c.png")


def test_without_matplotlib_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    for name in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(CompscaleError, match=r"needs matplotlib(.|\n)*pip install matplotlib.*compscale\[recipes\]"):
        plot_costs(synthetic_rows(False), tmp_path / "c.png")
