"""Which models of a library compscale scales, and why the others fail: every name ``compscale models`` lists.

    python docs/model_table.py --names resnet18,vgg11,squeezenet1_0   # a few models, printed
    python docs/model_table.py --write docs/torchvision.md              # every torchvision model, and the page
    python docs/model_table.py --library timm --write docs/timm.md      # every timm model (pip install timm)

Each model (``torchvision.models.get_model(name, weights=None)``, ``timm.create_model(name)``) is scaled
three ways: ``phi=1``, depth only (``depth=1.5``) and width only (``width=1.5``). A success reports
MACs(scaled) / MACs(base), each measured with ``compscale.profile`` at its own input size; a failure
reports the exception (a model that cannot even be built or profiled at 224x224 too). Every model runs in its own
subprocess (``--jobs`` at a time), so that one that exhausts memory or crashes is a row like the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import nn

import compscale
from compscale.models import TIMM_PREFIX, list_models

TITLES = {"torchvision": "torchvision: every model compscale lists",
          "timm": "timm: every model compscale lists"}
MODES: dict[str, dict[str, Any]] = {"phi=1": {"phi": 1}, "depth x1.5": {"depth": 1.5}, "width x1.5": {"width": 1.5}}
BASE_SIZE = (224, 224)
WRITE_COMMANDS = {"torchvision": "python docs/model_table.py --write docs/torchvision.md",
                  "timm": "python docs/model_table.py --library timm --write docs/timm.md"}


@dataclass
class Success:
    macs_ratio: float
    params_before: int
    params_after: int
    input_size: tuple[int, int]


@dataclass
class Failure:
    error: str
    first_line: str
    hint: str | None
    ours: bool  # False: not a CompscaleError, which is a compscale bug


Outcome = Success | Failure


def names_of(library: str) -> list[str]:
    """Every model name ``compscale models --library LIBRARY`` lists, without the ``timm/`` prefix."""
    return [n.removeprefix(TIMM_PREFIX) for n in list_models(library=library)]  # type: ignore[arg-type]


def build(library: str, name: str) -> nn.Module:
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    from compscale.models import torchvision_model

    return torchvision_model(name)


def try_scale(base: nn.Module, base_macs: int, kwargs: dict[str, Any]) -> Outcome:
    """Scale ``base`` with ``kwargs`` and measure it, or record why it cannot be scaled."""
    try:
        scaled = compscale.scale(base, **kwargs)
        size = cast(compscale.ScalingPlan, scaled.scaling).input_size
        after = compscale.profile(scaled, size)
    except Exception as e:  # a report: anything compscale raises, on purpose or not, is a row
        hint = e.hint if isinstance(e, compscale.CompscaleError) else None
        first = str(e).splitlines()[0] if str(e) else ""
        return Failure(type(e).__name__, first, hint, isinstance(e, compscale.CompscaleError))
    before_params = sum(p.numel() for p in base.parameters())
    return Success(after.macs / base_macs, before_params, after.params, (int(size[0]), int(size[1])))


def run_model(library: str, name: str) -> dict[str, Outcome]:
    try:
        base = build(library, name).eval()
        base_macs = compscale.profile(base, BASE_SIZE).macs
    except Exception as e:  # the model itself: not built, or not profiled at 224x224 (a row in every column)
        hint = e.hint if isinstance(e, compscale.CompscaleError) else None
        first = str(e).splitlines()[0] if str(e) else ""
        failed = Failure(type(e).__name__, f"the base model: {first}", hint, isinstance(e, compscale.CompscaleError))
        return {mode: failed for mode in MODES}
    return {mode: try_scale(base, base_macs, kwargs) for mode, kwargs in MODES.items()}


def run_isolated(library: str, name: str, timeout: float) -> dict[str, Outcome]:
    """:func:`run_model` in a subprocess: a crash, a timeout or running out of memory is a failure row."""
    cmd = [sys.executable, __file__, "--library", library, "--one", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {mode: Failure("Timeout", f"took more than {timeout:g} s", None, False) for mode in MODES}
    if done.returncode != 0 or not done.stdout.strip():
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {mode: Failure("Crash", last, None, False) for mode in MODES}
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return {mode: Success(**{**o, "input_size": tuple(o["input_size"])}) if "macs_ratio" in o else Failure(**o)
            for mode, o in data.items()}


def short_reason(first_line: str, limit: int = 90) -> str:
    """The most telling clause of an error's first line: no graph-node dump, no trailing parenthesis."""
    clauses = [c for c in first_line.split(": ") if "%" not in c and "num_users" not in c]
    reason = re.sub(r"\s*\([^()]*\)$", "", clauses[-1] if clauses else first_line).strip()
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


def cell(outcome: Outcome) -> str:
    if isinstance(outcome, Success):
        return f"x{outcome.macs_ratio:.2f} MACs"
    return f"{outcome.error}: {short_reason(outcome.first_line)}".replace("|", "\\|")


def table(results: dict[str, dict[str, Outcome]]) -> str:
    lines = ["| model | " + " | ".join(MODES) + " |", "|---" * (len(MODES) + 1) + "|"]
    for name, outcomes in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(outcomes[m]) for m in MODES) + " |")
    return "\n".join(lines)


def details(results: dict[str, dict[str, Outcome]]) -> str:
    lines = ["| model | scaling | input size | params | MACs x base |", "|---|---|---|---|---|"]
    for name, outcomes in results.items():
        for mode, o in outcomes.items():
            if isinstance(o, Success):
                size = f"{o.input_size[0]}x{o.input_size[1]}"
                params = f"{o.params_before / 1e6:.2f} M -> {o.params_after / 1e6:.2f} M"
                lines.append(f"| {name} | {mode} | {size} | {params} | {o.macs_ratio:.2f} |")
    return "\n".join(lines)


def failures(results: dict[str, dict[str, Outcome]]) -> str:
    lines = []
    for name, outcomes in results.items():
        for mode, o in outcomes.items():
            if isinstance(o, Failure):
                bug = "" if o.ours else " (not a `CompscaleError`: a compscale bug)"
                lines.append(f"- **{name}**, {mode}: `{o.error}`{bug}: {o.first_line}")
                lines.append(f"  Hint: {o.hint}" if o.hint else "  (no hint)")
    return "\n".join(lines) if lines else "None."


def page(library: str, results: dict[str, dict[str, Outcome]]) -> str:
    scaled = sum(all(isinstance(o, Success) for o in r.values()) for r in results.values())
    listed = len(names_of(library))
    which = f"each of the {listed} models" if len(results) == listed else f"{len(results)} of the {listed} models"
    return "\n\n".join([
        f"# {TITLES[library]}",
        f"Generated by `{WRITE_COMMANDS[library]}`: {which} `compscale models --library "
        f"{library}` lists, scaled with `phi=1`, `depth=1.5` and `width=1.5`; a success shows MACs(scaled) / "
        f"MACs(base), each at its own input size. {scaled} of {len(results)} scale all three ways.",
        table(results),
        "## Successes\n\n" + details(results),
        "## Failures\n\n" + failures(results),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--names", default=None, metavar="A,B,...",
                        help="these models only (comma-separated, as `compscale models` lists them); default: all")
    parser.add_argument("--write", type=Path, metavar="PATH", help="also write the Markdown page to PATH")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once, each in its own process")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model before it is a failure")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a worker: one model, JSON on stdout
    args = parser.parse_args(argv)
    if args.one is not None:
        outcomes = run_model(args.library, args.one)
        print(json.dumps({mode: dataclasses.asdict(o) for mode, o in outcomes.items()}))
        return
    known = names_of(args.library)
    names = known if args.names is None else [n.strip().removeprefix(TIMM_PREFIX) for n in args.names.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"not listed by `compscale models --library {args.library}`: {', '.join(unknown)}")
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = list(pool.map(lambda n: run_isolated(args.library, n, args.timeout), names))
    results = dict(zip(names, done))
    print(table(results))
    if args.write:
        args.write.write_text(page(args.library, results))
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
