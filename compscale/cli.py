"""The ``compscale`` command: ``compscale scale resnet50 --phi 2``.

Prints what changed (per-stage depth, per-group width, input size) and the cost before -> after;
``--json`` prints one JSON object for scripts. Bad input gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from compscale.api import scale
from compscale.checkpoint import load_model, save
from compscale.errors import CompscaleError
from compscale.planning.plan import ScalingPlan
from compscale.planning.planner import Planner
from compscale.verify.profile import Profile, profile

__all__ = ["main"]


class UsageError(Exception):
    """A bad command line: reported on one line, exit code 2."""


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _macs(text: str) -> float:
    """``8.2G``, ``600M`` or ``8.2e9``."""
    scale = {"G": 1e9, "M": 1e6, "K": 1e3}.get(text[-1:].upper(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a MACs count (like 8.2G, 600M or 8.2e9): {text!r}") from None


def _phi_range(text: str) -> list[float]:
    """``0:8`` (0, 1, ..., 8), ``0:4:0.5`` (with a step) or ``1,2,3``."""
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            start, stop, step = parts[0], parts[1], parts[2] if len(parts) > 2 else 1.0
            if step <= 0 or len(parts) > 3:
                raise ValueError
            return [start + i * step for i in range(int((stop - start) / step + 1e-9) + 1)]
        return [float(p) for p in text.split(",")]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a phi range (like 0:8, 0:4:0.5 or 1,2,3): {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="compscale", description="Compound scaling for ResNets and MobileNets.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scale", help="scale a model and report what changed and what it costs")
    s.add_argument("model", help="torchvision model name, or package.module:callable")
    s.add_argument("--phi", type=_number, default=None, help="compound coefficient")
    _add_common(s)
    s.add_argument("--depth", type=_number, default=None, help="depth multiplier (overrides phi's)")
    s.add_argument("--width", type=_number, default=None, help="width multiplier (overrides phi's)")
    s.add_argument("--resolution", type=_number, default=None, help="resolution multiplier (overrides phi's)")
    s.add_argument("--save", default=None, help="save weights and what rebuilds them (compscale.checkpoint.load)")
    s.add_argument("--target-macs", type=_macs, default=None,
                   help="scale to about this many MACs (e.g. 8.2G, 600M); searches phi, or --vary one multiplier")
    s.add_argument("--vary", choices=("phi", "depth", "width", "resolution"), default="phi")
    t = sub.add_parser("table", help="MACs, params and input size for a range of phi, without building weights")
    t.add_argument("model", help="torchvision model name, or package.module:callable")
    t.add_argument("--phi", type=_phi_range, default=_phi_range("0:8"), help="range, e.g. 0:8 (default)")
    _add_common(t)
    st = sub.add_parser("stages", help="print the stages compscale finds in a model")
    st.add_argument("model")
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    for name, default in (("alpha", 1.2), ("beta", 1.1), ("gamma", 1.15)):
        p.add_argument(f"--{name}", type=_number, default=default, help=f"compound base (default {default})")
    p.add_argument("--input-size", type=int, default=224, help="the base model's input size (default 224)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "stages":
            return _stages(args)
        if args.command == "table":
            return _table(args)
        return _scale(args)
    except (UsageError, CompscaleError, ValueError, TypeError) as e:  # one line, no traceback
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
    if args.phi is None and args.target_macs is None and not {"depth", "width", "resolution"} & kwargs.keys():
        raise UsageError("nothing to scale: give --phi, --target-macs and/or --depth/--width/--resolution")
    if args.target_macs is not None:
        kwargs.update(target_macs=args.target_macs, vary=args.vary)
    scaled = scale(model, args.phi, input_size=args.input_size, **kwargs)
    plan: ScalingPlan = scaled.scaling  # type: ignore[assignment]
    before = profile(model, plan.base_input_size)
    after = profile(scaled, plan.input_size)
    if args.save:
        save(scaled, args.save, model=args.model)
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
    m = plan.multipliers
    ideal = (m.depth * m.width**2 * m.resolution**2)
    lines = [
        f"{name}",
        str(plan),
        f"params {before.params / 1e6:.2f} M -> {after.params / 1e6:.2f} M "
        f"(x{after.params / max(1, before.params):.2f})",
        f"MACs   {before.macs / 1e9:.3f} G -> {after.macs / 1e9:.3f} G (x{ratio:.2f}; "
        f"d*w^2*r^2 = x{ideal:.2f})",
    ]
    return "\n".join(lines)


def _table(args: argparse.Namespace) -> int:
    planner = Planner(load_model(args.model), input_size=args.input_size)
    factor = args.alpha * args.beta**2 * args.gamma**2
    rows = []
    for phi in args.phi:
        p = planner.plan(phi, alpha=args.alpha, beta=args.beta, gamma=args.gamma)
        assert p.macs is not None and p.params is not None
        rows.append({"phi": phi, "depth": p.depth, "width": p.width, "resolution": p.resolution,
                     "input_size": list(p.input_size), "params": p.params, "macs": p.macs,
                     "macs_ratio": p.macs / planner.base_macs, "ideal_ratio": factor**phi})
    if args.json:
        print(json.dumps({"model": args.model, "base": {"macs": planner.base_macs, "params": planner.base_params},
                          "rows": rows}))
        return 0
    print(f"{args.model}: alpha={args.alpha:g} beta={args.beta:g} gamma={args.gamma:g} "
          f"(alpha*beta^2*gamma^2 = {factor:.3f})")
    print(f"{'phi':>5} {'depth':>6} {'width':>6} {'input':>7} {'params (M)':>11} {'GMACs':>9} {'x base':>7} "
          f"{'ideal':>7}")
    for r in rows:
        print(f"{r['phi']:>5g} {r['depth']:>6.3f} {r['width']:>6.3f} {r['input_size'][0]:>7} "
              f"{r['params'] / 1e6:>11.2f} {r['macs'] / 1e9:>9.3f} {r['macs_ratio']:>7.2f} {r['ideal_ratio']:>7.2f}")
    return 0
