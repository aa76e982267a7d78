"""The ``compscale`` command: ``compscale scale resnet50 --phi 2``.

Prints what changed (per-stage depth, per-group width, input size) and the cost before -> after;
``--json`` prints one JSON object for scripts. Bad input gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compscale.api import scale
from compscale.errors import CompscaleError
from compscale.planning.plan import ScalingPlan
from compscale.verify.profile import Profile, profile

__all__ = ["load_model", "main"]


class UsageError(Exception):
    """A bad command line: reported on one line, exit code 2."""


def load_model(spec: str) -> nn.Module:
    """A torchvision model name (``resnet50``) or ``package.module:callable`` returning an ``nn.Module``."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"cannot load {spec!r}: {e}") from e
        model = factory()
    else:
        import torchvision.models

        if spec not in torchvision.models.list_models():
            raise UsageError(f"unknown model {spec!r}: not a torchvision model name nor package.module:callable")
        model = torchvision.models.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compscale", description="Compound scaling for ResNets and MobileNets.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scale", help="scale a model and report what changed and what it costs")
    s.add_argument("model", help="torchvision model name, or package.module:callable")
    s.add_argument("--phi", type=_positive, default=None, help="compound coefficient")
    for name in ("alpha", "beta", "gamma"):
        s.add_argument(f"--{name}", type=_positive, default=None)
    s.add_argument("--depth", type=_positive, default=None, help="depth multiplier (overrides phi's)")
    s.add_argument("--width", type=_positive, default=None, help="width multiplier (overrides phi's)")
    s.add_argument("--resolution", type=_positive, default=None, help="resolution multiplier (overrides phi's)")
    s.add_argument("--input-size", type=int, default=224, help="the base model's input size (default 224)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--save", default=None, help="save the scaled model (torch.save of the module) to PATH")
    st = sub.add_parser("stages", help="print the stages compscale finds in a model")
    st.add_argument("model")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "stages":
            return _stages(args)
        return _scale(args)
    except (UsageError, CompscaleError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0]
        hint = getattr(e, "hint", None)
        print(f"compscale: error: {first}" + (f" (hint: {hint})" if hint else ""), file=sys.stderr)
        return 2


def _stages(args: argparse.Namespace) -> int:
    from compscale.analyse.stages import find_stages
    from compscale.trace import trace

    print(find_stages(trace(load_model(args.model))))
    return 0


def _scale(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    kwargs = {k: getattr(args, k) for k in ("alpha", "beta", "gamma", "depth", "width", "resolution")}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if args.phi is None and not {"depth", "width", "resolution"} & kwargs.keys():
        raise UsageError("nothing to scale: give --phi and/or --depth/--width/--resolution")
    scaled = scale(model, args.phi, input_size=args.input_size, **kwargs)
    plan: ScalingPlan = scaled.scaling  # type: ignore[assignment]
    before = profile(model, plan.base_input_size)
    after = profile(scaled, plan.input_size)
    if args.save:
        torch.save(scaled, args.save)
    if args.json:
        print(json.dumps(_report(args.model, plan, before, after)))
    else:
        print(_human(args.model, plan, before, after))
    return 0


def _report(name: str, plan: ScalingPlan, before: Profile, after: Profile) -> dict[str, Any]:
    m = plan.multipliers
    return {
        "model": name,
        "phi": m.phi,
        "depth": m.depth,
        "width": m.width,
        "resolution": m.resolution,
        "input_size": list(after.input_size),
        "params": after.params,
        "macs": after.macs,
        "base": {"input_size": list(before.input_size), "params": before.params, "macs": before.macs},
        "macs_ratio": after.macs / before.macs if before.macs else None,
        "stages": [{"name": s.name, "blocks": [s.blocks_before, s.blocks_after]} for s in plan.stages],
        "groups_changed": sum(g.before != g.after for g in plan.groups),
    }


def _human(name: str, plan: ScalingPlan, before: Profile, after: Profile) -> str:
    ratio = after.macs / before.macs if before.macs else float("nan")
    lines = [
        f"{name}",
        str(plan),
        f"params {before.params / 1e6:.2f} M -> {after.params / 1e6:.2f} M "
        f"(x{after.params / max(1, before.params):.2f})",
        f"MACs   {before.macs / 1e9:.3f} G -> {after.macs / 1e9:.3f} G (x{ratio:.2f})",
    ]
    return "\n".join(lines)
