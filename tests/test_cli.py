"""The compscale command: human and JSON output, users' constructors, errors on one line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from compscale.cli import main


def test_scale_json_has_sizes_params_and_macs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "resnet18", "--phi", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_size"] == [256, 256] and out["base"]["input_size"] == [224, 224]
    assert out["params"] > out["base"]["params"] and out["macs"] > out["base"]["macs"]
    assert out["stages"][0] == {"name": "layer1", "blocks": [2, 3]}


def test_scale_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scale", "mobilenet_v2", "--width", "1.4"]) == 0
    out = capsys.readouterr().out
    assert "width x1.4" in out and "MACs" in out and "params" in out and "-> 224x224" in out


def test_a_users_own_constructor(tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
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
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["scale", "mynets:tiny", "--depth", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stages"] == [{"name": "1..2", "blocks": [2, 4]}]


@pytest.mark.parametrize(("argv", "message"), [
    (["scale", "resnet5", "--phi", "1"], "unknown model 'resnet5'"),
    (["scale", "resnet18", "--phi", "x"], "not a number"),
    (["scale", "resnet18", "--depth", "-1"], "depth must be > 0"),
    (["scale", "resnet18"], "nothing to scale"),
    (["scale", "no.such.module:f", "--phi", "1"], "cannot load 'no.such.module:f'"),
])
def test_errors_are_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside
        code = e.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_table_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["table", "resnet50", "--phi", "0:2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["input_size"][0] for r in rows] == [224, 256, 296]
    assert rows[0]["macs_ratio"] == 1.0 and rows[2]["ideal_ratio"] == pytest.approx(1.92027**2)


def test_python_dash_m_runs_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "compscale", "scale", "nope", "--phi", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("compscale: error: unknown model 'nope' (hint: use a torchvision model name or "
                                     "package.module:callable.)")
