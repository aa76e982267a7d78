"""Which models of a library compscale scales, and why the others fail.

    python docs/model_table.py                                          # torchvision beyond ResNet/MobileNet
    python docs/model_table.py --write docs/torchvision.md              # and write the page
    python docs/model_table.py --library timm --write docs/timm.md      # timm's (pip install timm)

Each model (``torchvision.models.get_model(name, weights=None)``, ``timm.create_model(name)``) is scaled
three ways: ``phi=1``, depth only (``depth=1.5``) and width only (``width=1.5``). A success reports
MACs(scaled) / MACs(base), each measured with ``compscale.profile`` at its own input size; a failure
reports the exception.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torchvision
from torch import nn

import compscale

MODELS = {
    "torchvision": [
        "regnet_y_400mf", "mnasnet1_0", "shufflenet_v2_x1_0", "densenet121",
        "efficientnet_v2_s", "convnext_tiny", "squeezenet1_0", "vgg11_bn",
    ],
    # ResNets and MobileNets as another library writes them, and their relatives
    "timm": [
        "resnet50", "resnet50d", "resnext50_32x4d", "seresnext26d_32x4d", "ecaresnet26t", "res2net50_14w_8s",
        "skresnet18", "resnest14d", "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv4_conv_small",
        "efficientnet_b0", "tf_efficientnet_b0", "mnasnet_100", "fbnetc_100", "mixnet_s", "ghostnet_100",
        "rexnet_100", "lcnet_050", "regnety_002", "convnext_atto", "densenet121", "cspresnet50", "repvgg_a0",
        "mobilenetv1_100", "dpn68",
    ],
}
TITLES = {"torchvision": "torchvision models beyond ResNets and MobileNets",
          "timm": "timm models: ResNets, MobileNets and relatives from another library"}
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


def build(library: str, name: str) -> nn.Module:
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    return torchvision.models.get_model(name, weights=None)


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
    base = build(library, name).eval()
    base_macs = compscale.profile(base, BASE_SIZE).macs
    return {mode: try_scale(base, base_macs, kwargs) for mode, kwargs in MODES.items()}


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
    return "\n\n".join([
        f"# {TITLES[library]}",
        f"Generated by `{WRITE_COMMANDS[library]}`: each model scaled with `phi=1`, `depth=1.5` and `width=1.5`;"
        " a success shows MACs(scaled) / MACs(base), each at its own input size.",
        table(results),
        "## Successes\n\n" + details(results),
        "## Failures\n\n" + failures(results),
    ]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=sorted(MODELS), default="torchvision")
    parser.add_argument("--write", type=Path, metavar="PATH", help="also write the Markdown page to PATH")
    args = parser.parse_args()
    results = {name: run_model(args.library, name) for name in MODELS[args.library]}
    print(table(results))
    if args.write:
        args.write.write_text(page(args.library, results))
        print(f"\nwrote {args.write}")


if __name__ == "__main__":
    main()
