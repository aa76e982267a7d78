"""The compscale command: human and JSON output, users' constructors, errors on one line before the work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import compscale
from compscale.cli import main

MYNETS = textwrap.dedent("""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return x + self.bn(self.conv(x)).relu()

    def tiny():
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(16), Block(16),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    class ByName(nn.Module):  # layers called by name, outside any container: no stage, nothing to deepen
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, stride=2), nn.Conv2d(16, 32, 3, stride=2)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(self.conv2(self.conv1(x).relu()).mean((2, 3)))

    def plain():
        return ByName()
""")


@pytest.fixture
def mynets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "mynets.py").write_text(MYNETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``compscale ARGV`` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors and --help exit from inside
        code = e.code  # type: ignore[assignment]
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_scale_json_has_sizes_params_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["scale", "resnet18", "--phi", "2", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["input_size"] == [296, 296] and report["base"]["input_size"] == [224, 224]
    assert report["params"] > report["base"]["params"] and report["macs"] > report["base"]["macs"]
    assert report["stages"][0] == {"name": "layer1", "blocks": [2, 3]}
    # rounded: no float noise such as 1.2100000000000002
    assert report["width"] == 1.21 and report["depth"] == 1.44 and report["resolution"] == 1.3225
    assert report["macs_ratio"] == round(report["macs"] / report["base"]["macs"], 4)


def test_scale_human_output_explains_its_width_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["scale", "mobilenet_v2", "--width", "1.4"], capsys)
    assert code == 0
    assert "width x1.4" in out and "MACs" in out and "params" in out and "-> 224x224" in out
    assert "rule: how the new width was chosen" in out and "groups: how many channel groups" in out


def test_a_users_own_constructor(mynets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["scale", "mynets:tiny", "--depth", "2", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["stages"] == [{"name": "1..2", "blocks": [2, 4]}]


def test_init_preserve_reports_the_measured_difference(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["scale", "recipes.models:tiny_resnet", "--phi", "1", "--input-size", "32", "--init", "preserve"]
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 0
    init = json.loads(out)["init"]
    assert init["init"] == "preserve" and init["output_error"] < 1e-4 and init["inexact"] == {}
    code, out, _ = run(argv, capsys)
    assert code == 0 and "init: preserve" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["scale", "resnet18", "--phi", "x"], "not a number"),
    (["scale", "resnet18", "--phi", "nan"], "not a finite number"),
    (["scale", "resnet18", "--depth", "-1"], "depth must be > 0"),
    (["scale", "resnet18", "--phi", "1e9"], "phi=1e+09 takes depth"),
    (["scale", "resnet18"], "nothing to scale"),
    (["scale", "resnet18", "--phi", "1", "--target-macs", "4G"], "give no --phi with it"),
    (["scale", "resnet18", "--width", "2", "--vary", "depth"], "give --target-macs with it"),
    (["scale", "resnet18", "--target-macs=-4G"], "not a positive MACs count"),
    (["scale", "no.such.module:f", "--phi", "1"], "cannot load 'no.such.module:f'"),
    (["table", "resnet18", "--phi", "8:0"], "empty phi range '8:0'"),
    (["table", "resnet18", "--phi", "0:8:-1"], "not a phi range"),
    (["table", "resnet18", "--strategy", "slow"], "unknown strategy 'slow'"),
    (["scale", "resnet18", "--phi", "1", "--strategy", "wd2"], "unknown strategy 'wd2'"),
    (["scale", "resnet18", "--target-macs", "4G", "--target-acts", "9M"], "give one target"),
    (["scale", "resnet18", "--target-latency", "fast"], "not a positive time"),
    (["table", "resnet18", "--plot", "/nonexistent/x.png"], "--plot /nonexistent/x.png: directory /nonexistent"),
    (["scale", "resnet18", "--target-macs", "4G", "--vary", "width", "--strategy", "fast"], "give one of them"),
    (["models", "no-such-net-anywhere"], "no model name matches"),
])
def test_errors_are_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, message)


def test_unknown_model_suggests_close_names(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["scale", "resnet5", "--phi", "1"], capsys)
    assert_one_line_error(code, err, "unknown model 'resnet5'; did you mean 'resnet50'")
    assert "compscale models" in err


def test_bad_save_path_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nonexistent" / "r.pt"
    code, out, err = run(["scale", "resnet50", "--phi", "2", "--save", str(missing), "--progress"], capsys)
    assert_one_line_error(code, err, f"directory {missing.parent} does not exist")  # no progress line: no work done
    assert out == ""
    code, _, err = run(["scale", "resnet50", "--phi", "2", "--save", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "is a directory")


def test_save_says_what_it_wrote_and_reloads(mynets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from compscale.checkpoint import load

    path = mynets / "tiny.pt"
    code, out, _ = run(["scale", "mynets:tiny", "--phi", "1", "--save", str(path)], capsys)
    assert code == 0 and path.exists()
    assert f"saved to {path}" in out and "compscale.checkpoint.load" in out
    assert load(path).scaling.input_size == (256, 256)
    code, out, _ = run(["scale", "mynets:tiny", "--phi", "1", "--save", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out)["saved"] == str(path)


def test_no_stage_hints_name_the_flags(mynets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--depth", "2"], ["--phi", "1", "--strict"]):
        code, _, err = run(["scale", "mynets:plain", *argv], capsys)
        assert_one_line_error(code, err, "has no stage to deepen")
        assert "--depth 1" in err and "--stages" in err and "depth=1" not in err and "stages=" not in err
    with pytest.warns(compscale.GuessWarning, match="widened and resized but not deepened"):
        code, out, _ = run(["scale", "mynets:plain", "--phi", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["input_size"] == [256, 256]
    code, out, err = run(["stages", "mynets:plain"], capsys)
    assert_one_line_error(code, err, "has no stage to deepen")
    assert "compscale scale mynets:plain --width" in err and out == ""


def test_the_flag_in_the_hint_works(mynets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["scale", "mynets:plain", "--phi", "1", "--depth", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["input_size"] == [256, 256]


def test_stages_and_fixed_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["scale", "resnet18", "--depth", "2", "--stages", "layer3,layer4", "--json"], capsys)
    assert code == 0
    assert json.loads(out)["stages"] == [{"name": "layer3", "blocks": [2, 4]}, {"name": "layer4", "blocks": [2, 4]}]
    changed = []
    for fixed in ([], ["--fixed", "conv1"]):
        code, out, _ = run(["scale", "resnet18", "--width", "2", "--json", *fixed], capsys)
        assert code == 0
        changed.append(json.loads(out)["groups_changed"])
    assert changed[1] < changed[0]  # conv1's group (the stem and layer1's residual stream) and its derived keep theirs


def test_bare_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([], capsys)
    assert code == 2
    assert err.startswith("usage: compscale") and "compscale --help" in err and "Traceback" not in err


def test_help_has_examples_and_explains_vary(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "examples:" in out and "compscale scale resnet50 --phi 2" in out and "--phi -1" in out
    code, out, _ = run(["scale", "--help"], capsys)
    assert code == 0 and "--vary" in out and "with --target-macs: what to search" in out


@pytest.mark.parametrize("argv", [["--help"], ["scale", "--help"], ["scale", "resnet50", "--phi", "x"], []])
def test_help_and_argument_errors_do_not_import_torch(argv: list[str]) -> None:
    code = textwrap.dedent(f"""
        import sys
        from compscale.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        assert "torch" not in sys.modules, "torch was imported"
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_progress_names_each_step(mynets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["scale", "mynets:tiny", "--phi", "1", "--progress"], capsys)
    assert code == 0
    steps = [line.split(" (")[0] for line in err.splitlines()]
    assert steps == ["compscale: importing torch", "compscale: building mynets:tiny", "compscale: scaling mynets:tiny",
                     "compscale: counting MACs"]
    assert all(line.endswith(" s)") for line in err.splitlines())


def test_target_macs_prints_the_target_and_the_miss(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["scale", "resnet18", "--target-macs", "3.6G", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["target_macs"] == 3_600_000_000
    assert report["target_miss"] == pytest.approx(report["macs"] / 3.6e9 - 1, abs=1e-4)
    assert abs(report["target_miss"]) < 0.03
    code, out, _ = run(["scale", "resnet18", "--target-macs", "3.6G", "--vary", "width"], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("target"))
    assert line.startswith("target 3.600 G MACs: got ") and line.endswith("%)")


def test_models_lists_torchvision_and_timm_names(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["models", "resnet5*"], capsys)
    assert code == 0
    names = out.split()
    assert "resnet50" in names
    pytest.importorskip("timm", reason="timm names are listed only when timm is installed")
    assert "timm/resnet50" in names
    code, out, _ = run(["models", "--library", "torchvision"], capsys)
    assert "mobilenet_v2" in out.split() and not any(n.startswith("timm/") for n in out.split())


def test_a_timm_name_scales(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm", reason="timm/NAME needs timm (the test extra installs it)")
    code, out, _ = run(["scale", "timm/resnet18", "--depth", "2", "--json"], capsys)
    assert code == 0 and json.loads(out)["stages"][0]["blocks"] == [2, 4]


def test_table_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["table", "resnet50", "--phi", "0:2", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [r["input_size"][0] for r in rows] == [224, 256, 296]
    assert rows[0]["macs_ratio"] == 1.0 and rows[2]["ideal_ratio"] == pytest.approx(1.92027**2, abs=1e-4)


def test_python_dash_m_runs_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "compscale", "scale", "resnet18", "--depth", "zero"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == "compscale scale: error: argument --depth: not a number: 'zero'"


def test_table_compares_strategies_with_activations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "costs.png"
    code, out, _ = run(["table", "resnet50", "--phi", "0:2", "--strategy", "compound,fast", "--json", "--plot",
                        str(png)], capsys)
    assert code == 0
    rows = json.loads(out)["rows"]
    assert [(r["strategy"], r["phi"]) for r in rows] == [(s, p) for s in ("compound", "fast") for p in (0, 1, 2)]
    assert rows[0]["acts"] == 11_113_984 and rows[0]["acts_ratio"] == 1.0
    compound, fast = rows[2], rows[5]
    assert fast["acts_ratio"] < compound["acts_ratio"] and fast["width"] > compound["width"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[2] == 4


def test_table_latency_is_measured_and_printed_with_its_spread(mynets: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["table", "mynets:tiny", "--phi", "0,1", "--latency", "--input-size", "32"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("compound")]
    assert len(lines) == 2 and all(" ± " in line for line in lines)
    assert "latency (ms, median ± IQR)" in out
    code, out, _ = run(["table", "mynets:tiny", "--phi", "0", "--latency", "--input-size", "32", "--json"], capsys)
    lat = json.loads(out)["rows"][0]["latency"]
    assert lat["median"] > 0 and lat["iqr"] >= 0 and lat["runs"] >= 1


def test_scale_with_the_fast_strategy_to_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["scale", "resnet18", "--target-macs", "7.2G", "--strategy", "fast", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["strategy"] == "fast" and abs(report["target_miss"]) < 0.03
    assert report["acts"] > report["base"]["acts"] and report["acts_ratio"] < report["macs_ratio"]
    code, out, _ = run(["scale", "resnet18", "--target-acts", "5M"], capsys)
    assert code == 0 and "target 5.00 M activations" in out and "activations 2.48 M ->" in out


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"compscale {version('compscale')}"


def test_an_unwritable_save_path_is_one_line_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    """/proc accepts no new file, whatever os.access says: the path is tried before the model is built."""
    code, out, err = run(["scale", "resnet50", "--phi", "2", "--save", "/proc/x.pt", "--progress"], capsys)
    assert_one_line_error(code, err, "--save /proc/x.pt: cannot be written")
    assert out == ""


def test_a_writable_save_path_is_left_as_it_was_when_checked(tmp_path: Path) -> None:
    from compscale.cli import _check_save_path

    _check_save_path(str(tmp_path / "new.pt"))
    assert not (tmp_path / "new.pt").exists()


def test_timing_prints_no_torch_import_warning() -> None:
    """torch.utils.benchmark logs "No CUDA runtime is found" when imported: latency() imports it quietly."""
    code = "import torch, compscale; compscale.latency(torch.nn.Conv2d(3, 4, 3), 8, min_run_time=0.01)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.slow
def test_no_torch_import_warning_in_the_output() -> None:
    result = subprocess.run([sys.executable, "-m", "compscale", "table", "resnet18", "--phi", "0", "--latency",
                             "--input-size", "32", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "CUDA" not in result.stderr + result.stdout and "Warning" not in result.stderr, result.stderr


def test_threads_are_pinned_shown_and_restored(mynets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    before = torch.get_num_threads()
    code, out, _ = run(["table", "mynets:tiny", "--phi", "0,1", "--latency", "--input-size", "32", "--threads", "1",
                        "--json"], capsys)
    assert code == 0 and torch.get_num_threads() == before
    table = json.loads(out)
    assert table["threads"] == 1 and table["rounds"] == 3
    assert all(r["latency"]["runs"] >= 15 and r["latency"]["iqr"] >= 0 for r in table["rows"])  # 3 rounds of 5+


def test_a_table_row_far_from_its_neighbours_is_flagged() -> None:
    from compscale.cli import _flag_rows

    ms = (0.010, 0.050, 0.013, 0.020, 0.7, 0.014, 0.02)  # one row 3x off in the middle, one first row 3x off
    rows = [{"strategy": s, "latency": {"median": m, "iqr": 0.01 * m}} for s, m in zip("aaaabbb", ms)]
    rows.append({"strategy": "c", "latency": {"median": 0.02, "iqr": 0.01}})
    _flag_rows(rows)
    assert [bool(r.get("flag")) for r in rows] == [False, True, False, False, True, False, False, True]


@pytest.mark.slow
def test_the_model_table_script_reports_each_named_model(tmp_path: Path) -> None:
    page = tmp_path / "models.md"
    script = Path(__file__).parent.parent / "docs" / "model_table.py"
    result = subprocess.run([sys.executable, str(script), "--names", "resnet18,squeezenet1_0,vit_b_16", "--write",
                             str(page)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert re.search(r"\| resnet18 \| x2\.\d\d MACs \| x1\.\d\d MACs \| x2\.\d\d MACs \|", text), text
    assert re.search(r"\| squeezenet1_0 \| x2\.\d\d MACs \|", text), text
    assert "| vit_b_16 | NotACNNError" in text and "3 of the" in text and "2 of 3 scale all three ways" in text


def test_a_segmentation_model_loads_without_downloading_its_backbone() -> None:
    # torchvision's detection and segmentation builders download ImageNet backbone weights unless told not to;
    # there is no network here, so a download would raise URLError
    from compscale.models import load_model

    model = load_model("lraspp_mobilenet_v3_large")
    assert type(model).__name__ == "LRASPP"
