"""The ``compscale`` command: ``compscale scale resnet50 --phi 2``.

Prints what changed (per-stage depth, per-group width, input size) and the cost before -> after;
``--json`` prints one JSON object for scripts. A user mistake gives one line on stderr and exit code 2,
checked before any work where it can be. ``--help`` and argument errors answer without importing torch:
this module imports compscale's heavy parts inside the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from compscale.errors import CompscaleError

if TYPE_CHECKING:
    from torch import nn

    from compscale.planning.plan import ScalingPlan
    from compscale.verify.profile import Profile

__all__ = ["main"]

_MODEL_HELP = "torchvision model name (resnet50), timm/NAME, or package.module:callable (see `compscale models`)"

_EXAMPLES = """\
examples:
  compscale scale resnet50 --phi 2                 # compound scaling, EfficientNet's alpha/beta/gamma
  compscale scale resnet50 --phi -1                # a negative phi scales down
  compscale scale mobilenet_v2 --width 1.4         # one dimension only (== mobilenet_v2(width_mult=1.4))
  compscale scale resnet50 --target-macs 8.2G      # the phi that lands on a MACs budget
  compscale scale resnet50 --target-macs 16G --strategy fast   # width-dominant: fewer activations, faster
  compscale scale resnet50 --target-latency 40ms   # planned on activations, confirmed by timing candidates
  compscale scale mynets:tiny --depth 2 --json     # your own constructor, JSON for scripts
  compscale table resnet50 --phi 0:8               # cost per phi, no weights built
  compscale table resnet50 --phi 0:4 --strategy compound,fast --latency --plot costs.png
  compscale stages resnet50                        # the stages compscale would deepen
  compscale models resnet                          # the model names it knows
"""


def _version() -> str:
    """The installed distribution's version (``importlib.metadata``), else the package's own."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compscale")
    except PackageNotFoundError:
        from compscale import __version__

        return __version__


class UsageError(Exception):
    """A bad command line: reported on one line, exit code 2."""


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive_with_unit(text: str, units: Sequence[tuple[str, float]], what: str) -> float:
    """``text`` as a positive finite number, times the factor of the first unit of ``units`` it ends with (case
    matters only for units listed twice); ``what`` names the accepted form in the error."""
    unit, factor = next(((u, f) for u, f in units if text.endswith(u)), ("", 1.0))
    try:
        value = float(text[: len(text) - len(unit)]) * factor
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"not a positive {what}: {text!r}")
    return value


_COUNT_UNITS = (("G", 1e9), ("g", 1e9), ("M", 1e6), ("m", 1e6), ("K", 1e3), ("k", 1e3))
_TIME_UNITS = (("ms", 1e-3), ("us", 1e-6), ("µs", 1e-6), ("s", 1.0))


def _macs(text: str) -> float:
    """``8.2G``, ``600M`` or ``8.2e9``."""
    return _positive_with_unit(text, _COUNT_UNITS, "MACs count (like 8.2G, 600M or 8.2e9)")


def _seconds(text: str) -> float:
    """``40ms``, ``0.04s``, ``800us`` or ``0.04`` (seconds)."""
    return _positive_with_unit(text, _TIME_UNITS, "time (like 40ms, 0.04s or 800us)")


def _count(text: str) -> int:
    """A positive count: ``50M``, ``2G``, ``1500000``."""
    value = _macs(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole count (like 50M or 1500000): {text!r}")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value


def _comma_list(what: str, example: str) -> Callable[[str], list[str]]:
    """The parser of a non-empty comma-separated list of ``what`` (module paths, as in ``model.named_modules()``;
    strategy names: compound, fast, depth, width, resolution, or pycls strings like d1_w8_r1)."""

    def parse(text: str) -> list[str]:
        items = [n.strip() for n in text.split(",") if n.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} in {text!r} (like {example})")
        return items

    return parse


_strategies = _comma_list("strategy", "compound,fast")
_paths = _comma_list("module path", "layer3,layer4")


def _phi_range(text: str) -> list[float]:
    """``0:8`` (0, 1, ..., 8), ``0:4:0.5`` (with a step) or ``1,2,3``; never empty."""
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) > 3 or not all(math.isfinite(p) for p in parts):
                raise ValueError
            start, stop, step = parts[0], parts[1], parts[2] if len(parts) > 2 else 1.0
            if step <= 0:
                raise ValueError
            values = [start + i * step for i in range(int((stop - start) / step + 1e-9) + 1)] if stop >= start else []
        else:
            values = [float(p) for p in text.split(",")]
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a phi range (like 0:8, 0:4:0.5 or 1,2,3): {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"empty phi range {text!r}: START:STOP needs STOP >= START (like 0:8)")
    if len(values) > 1000:
        raise argparse.ArgumentTypeError(f"phi range {text!r} has {len(values)} values; give at most 1000")
    return [round(v, 10) for v in values]


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="compscale", description="EfficientNet's compound scaling for any ResNet or MobileNet.",
                epilog=_EXAMPLES, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"compscale {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{scale,table,stages,models}")
    s = sub.add_parser("scale", help="scale a model and report what changed and what it costs", formatter_class=fmt,
                       description="Scale MODEL by phi (d = alpha^phi, w = beta^phi, r = gamma^phi) or by explicit "
                                   "multipliers, and print what changed and the cost before -> after.",
                       epilog=_EXAMPLES)
    s.add_argument("model", help=_MODEL_HELP)
    s.add_argument("--phi", type=_number, help="compound coefficient; negative scales down (e.g. 2, -1)")
    for name in ("depth", "width", "resolution"):
        s.add_argument(f"--{name}", type=_number, help=f"{name} multiplier (overrides phi's)")
    for name, kind, metavar, what in (
        ("macs", _macs, "MACS", "many MACs (e.g. 8.2G, 600M); searches phi, or --vary one multiplier"),
        ("acts", _macs, "ACTS", "many activations (conv output elements, e.g. 30M)"),
        ("latency", _seconds, "TIME", "latency per image on this machine (e.g. 40ms): planned on activations, "
                                      "confirmed by building and timing a few candidates"),
    ):
        s.add_argument(f"--target-{name}", type=kind, metavar=metavar, help=f"scale to about this {what}")
    s.add_argument("--strategy", default="compound",
                   help="how phi becomes depth/width/resolution: compound (default), fast (Dollar et al.'s "
                        "width-dominant dWr), depth, width, resolution, or a pycls string like d1_w8_r1")
    s.add_argument("--vary", choices=("phi", "depth", "width", "resolution"),
                   help="with --target-macs: what to search (default phi; depth, width or resolution search that "
                        "multiplier alone, the others as given or 1; the same as --strategy depth etc.)")
    s.add_argument("--fixed", type=_paths, default=[], metavar="PATHS",
                   help="comma-separated layers whose output width must not change (e.g. fc,layer4.2.conv3)")
    s.add_argument("--init", choices=("fresh", "preserve"), default="fresh",
                   help="preserve: grow the model's weights so that it computes what it did (Net2Net), e.g. a trained "
                        "model from module:callable; fresh (default): new layers drawn as its constructor would")
    s.add_argument("--neck-width", type=float, metavar="W",
                   help="a detector's feature network and heads width multiplier (default EfficientDet's 1.35^phi)")
    s.add_argument("--head-depth", type=int, metavar="K",
                   help="layers added to each of a detector's head towers (default floor(phi / 3))")
    s.add_argument("--max-params", type=_count, metavar="N",
                   help="refuse, before building anything, a network with more parameters (e.g. 50M); by default "
                        "what fits in half the free memory")
    s.add_argument("--save", metavar="PATH",
                   help="save weights and what rebuilds them (reload with compscale.checkpoint.load(PATH))")
    _add_common(s)
    t = sub.add_parser("table", help="MACs, params and input size for a range of phi, without building weights",
                       formatter_class=fmt, epilog="example:\n  compscale table resnet50 --phi 0:8 --json\n")
    t.add_argument("model", help=_MODEL_HELP)
    t.add_argument("--phi", type=_phi_range, default=_phi_range("0:8"),
                   help="START:STOP[:STEP] or a comma list, e.g. 0:8 (default), 0:4:0.5, -2,-1,0")
    t.add_argument("--strategy", type=_strategies, default=["compound"], metavar="NAMES",
                   help="comma-separated strategies, one row per phi each: compound (default), fast, depth, width, "
                        "resolution, or pycls strings like d1_w8_r1 (phi ~ log2 of the MACs factor for all)")
    t.add_argument("--latency", action="store_true",
                   help="also build each network (fresh weights) and time it on this machine: median and IQR")
    t.add_argument("--batch-size", type=int, default=1, help="with --latency: images per timed call (default 1)")
    t.add_argument("--plot", metavar="PNG",
                   help="draw MACs, params, activations (and latency) against phi, one line per strategy "
                        "(needs matplotlib: pip install 'compscale[recipes]')")
    _add_common(t)
    st = sub.add_parser("stages", help="print the stages compscale finds in a model", formatter_class=fmt,
                        epilog="example:\n  compscale stages mobilenet_v2\n")
    st.add_argument("model", help=_MODEL_HELP)
    _add_progress(st)
    m = sub.add_parser("models", help="list the model names MODEL accepts (torchvision; timm when installed)",
                       formatter_class=fmt, epilog="examples:\n  compscale models\n  compscale models 'resnet*'\n")
    m.add_argument("pattern", nargs="?", help="shell pattern or substring to filter by")
    m.add_argument("--library", choices=("torchvision", "timm"), help="one library's names only")
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    for name, default in (("alpha", 1.2), ("beta", 1.1), ("gamma", 1.15)):
        p.add_argument(f"--{name}", type=_number, default=default, help=f"compound base (default {default})")
    p.add_argument("--stages", type=_paths, metavar="PATHS",
                   help="deepen only the blocks under these comma-separated module paths (e.g. layer3,layer4)")
    p.add_argument("--strict", action="store_true",
                   help="refuse what would be decided on a guess (a stage found on a weak signal, a phi whose depth "
                        "cannot be applied) instead of warning")
    p.add_argument("--input-size", type=int,
                   help="the base model's input size (default 224; a detector's: what its transform resizes to)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads torch uses, pinned for timing (--target-latency, --latency) and shown with it "
                        "(default: torch's own count)")
    _add_progress(p)


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="show each step and its time on stderr (default: when stderr is a terminal)")


class Progress:
    """Each step's name and elapsed time on stderr: a spinner on a terminal, one line per finished step otherwise."""

    FRAMES = "|/-\\"

    def __init__(self, enabled: bool, stream: TextIO) -> None:
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.monotonic()
        done = threading.Event()
        spinner = threading.Thread(target=self._spin, args=(text, start, done), daemon=True) if self.tty else None
        if spinner is not None:
            spinner.start()
        try:
            yield
        finally:
            done.set()
            if spinner is not None:
                spinner.join()
                self.stream.write("\r\033[K")
            else:
                self.stream.write(f"compscale: {text} ({time.monotonic() - start:.1f} s)\n")
            self.stream.flush()

    def _spin(self, text: str, start: float, done: threading.Event) -> None:
        i = 0
        while not done.wait(0.1):
            self.stream.write(f"\r{self.FRAMES[i % 4]} {text} ({time.monotonic() - start:.1f} s)")
            self.stream.flush()
            i += 1


# Hints are written for the Python API; on the command line they name the flags.
_FLAG_HINTS = {
    "`depth=1`": "`--depth 1`",
    "(depth=1)": "(--depth 1)",
    "`resolution=1`": "`--resolution 1`",
    "`stages=`": "`--stages`",
    "`fixed=`": "`--fixed`",
    "strict=True": "--strict",
}


def cli_hint(hint: str) -> str:
    """``hint`` with the Python keywords it names replaced by the command's flags."""
    for python, flag in _FLAG_HINTS.items():
        hint = hint.replace(python, flag)
    return hint


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        sys.stderr.write(parser.format_usage() + "compscale: error: give a command; `compscale --help` shows "
                                                 "examples\n")
        return 2
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("give a command: scale, table, stages or models")
    progress = Progress(args.progress if getattr(args, "progress", None) is not None else sys.stderr.isatty(),
                        sys.stderr)
    try:
        if args.command == "models":
            return _models(args)
        command = {"scale": _scale, "table": _table, "stages": _stages}[args.command]
        if getattr(args, "threads", None) is None:
            return command(args, progress)
        from compscale.verify.latency import pinned_threads  # torch's CPU threads, restored afterwards

        with pinned_threads(args.threads):
            return command(args, progress)
    except (UsageError, CompscaleError, ValueError, TypeError, OSError) as e:  # one line, no traceback
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = getattr(e, "hint", None)
        print(f"compscale: error: {first}" + (f" (hint: {cli_hint(hint)})" if hint else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compscale: interrupted", file=sys.stderr)
        return 130


def _load(spec: str, progress: Progress) -> nn.Module:
    with progress.step("importing torch"):
        from compscale.models import load_model
    with progress.step(f"building {spec}"):
        return load_model(spec)


def _models(args: argparse.Namespace) -> int:
    from compscale.models import list_models

    names = list_models(args.pattern, args.library)
    if not names:
        raise UsageError(f"no model name matches {args.pattern!r}; `compscale models` lists them all")
    print("\n".join(names))
    return 0


def _stages(args: argparse.Namespace, progress: Progress) -> int:
    model = _load(args.model, progress)
    from compscale.analyse.stages import find_stages
    from compscale.trace import trace

    with progress.step(f"tracing {args.model}"):
        table = find_stages(trace(model))
    if not len(table):
        raise CompscaleError(
            f"{args.model} ({type(model).__name__}) has no stage to deepen: no block merges its own input back "
            f"into its output",
            f"scale its width and resolution only: compscale scale {args.model} --width 1.2 --resolution 1.15",
        )
    print(table)
    return 0


def _check_save_path(path: str, flag: str = "--save", example: str = "model.pt") -> None:
    """Refuse a ``--save`` (or ``--plot``) path that cannot be written, before any work is done."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; give a file name, like {os.path.join(path, example)}")
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {parent} is not writable")
    existed = os.path.exists(path)
    try:  # what the work would do at the end (a file system such as /proc refuses new files whatever access says)
        with open(path, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be written ({e.strerror or e})") from None
    if not existed:
        os.remove(path)


def _check_scale_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments for ``compscale.scale``, checked before the model is built."""
    from compscale.planning.plan import resolve_multipliers
    from compscale.planning.strategy import get_strategy

    given = {k: getattr(args, k) for k in ("depth", "width", "resolution") if getattr(args, k) is not None}
    targets = [f"--target-{n}" for n in ("macs", "acts", "latency") if getattr(args, f"target_{n}") is not None]
    if args.phi is None and not targets and not given:
        raise UsageError("nothing to scale: give --phi, --target-macs and/or --depth/--width/--resolution")
    if len(targets) > 1:
        raise UsageError(f"give one target, not {' and '.join(targets)}")
    if targets and args.phi is not None:
        raise UsageError(f"{targets[0]} searches phi: give no --phi with it (or --vary one multiplier)")
    if args.vary is not None and not targets:
        raise UsageError("--vary chooses what --target-macs searches: give --target-macs with it")
    get_strategy(args.strategy)
    if args.vary not in (None, "phi") and args.strategy not in ("compound", args.vary):
        raise UsageError(f"--vary {args.vary} is --strategy {args.vary}; give one of them, not --strategy "
                         f"{args.strategy} too")
    if args.save:
        _check_save_path(args.save)
    resolve_multipliers(args.phi, args.alpha, args.beta, args.gamma, args.depth, args.width, args.resolution)
    # an option not given is left to scale's default (a detector's input size is its transform's)
    optional = ("input_size", "max_params", "stages", "target_macs", "target_acts", "target_latency", "neck_width",
                "head_depth")
    return {**given, **{name: getattr(args, name) for name in optional if getattr(args, name) is not None},
            "alpha": args.alpha, "beta": args.beta, "gamma": args.gamma, "strategy": args.strategy,
            "vary": args.vary or "phi", "init": args.init, "strict": args.strict, "fixed": args.fixed}


def _scale(args: argparse.Namespace, progress: Progress) -> int:
    kwargs = _check_scale_args(args)
    model = _load(args.model, progress)
    from compscale import profile, scale

    with progress.step(f"scaling {args.model}"):
        scaled = scale(model, args.phi, **kwargs)
    plan: ScalingPlan = scaled.scaling  # type: ignore[assignment]
    with progress.step("counting MACs"):
        before = profile(model, plan.base_input_size)
        after = profile(scaled, plan.input_size)
    saved = None
    if args.save:
        from compscale.checkpoint import save

        with progress.step(f"saving {args.save}"):
            save(scaled, args.save, model=args.model)
        saved = os.path.abspath(args.save)
    report = _report(args.model, plan, before, after, args.target_macs, saved)
    if args.target_acts is not None:
        report.update(target_acts=int(args.target_acts), target_miss=round(after.acts / args.target_acts - 1, 4))
    if args.target_latency is not None:
        import torch

        report.update(target_latency=args.target_latency, latency=plan.latency, latency_iqr=plan.latency_iqr,
                      threads=torch.get_num_threads(),
                      target_miss=round((plan.latency or 0) / args.target_latency - 1, 4))
    print(json.dumps(report) if args.json else _human(args.model, plan, before, after, report))
    return 0


def _num(x: float | None, digits: int = 6) -> float | None:
    """``x`` to ``digits`` significant digits, for JSON (no float noise like 1.2100000000000002)."""
    return None if x is None else float(f"{x:.{digits}g}")


def _report(name: str, plan: ScalingPlan, before: Profile, after: Profile, target: float | None,
            saved: str | None) -> dict[str, Any]:
    m = plan.multipliers
    report: dict[str, Any] = {
        "model": name,
        "phi": _num(m.phi),
        "strategy": m.strategy,
        "depth": _num(m.depth),
        "width": _num(m.width),
        "resolution": _num(m.resolution),
        "input_size": list(after.input_size),
        "params": after.params,
        "macs": after.macs,
        "acts": after.acts,
        "base": {"input_size": list(before.input_size), "params": before.params, "macs": before.macs,
                 "acts": before.acts},
        "macs_ratio": round(after.macs / before.macs, 4) if before.macs else None,
        "acts_ratio": round(after.acts / before.acts, 4) if before.acts else None,
        "stages": [{"name": s.name, "blocks": [s.blocks_before, s.blocks_after]} for s in plan.stages],
        "groups_changed": sum(g.before != g.after for g in plan.groups),
    }
    if m.neck_width is not None:  # a detector
        report.update(neck_width=_num(m.neck_width), head_layers=m.head_layers, neck_layers=m.neck_layers)
    if plan.init == "preserve":
        report["init"] = {"init": plan.init, "output_error": plan.init_error, "inexact": plan.inexact}
    if target is not None:
        report["target_macs"] = int(target)
        report["target_miss"] = round(after.macs / target - 1, 4)  # relative: 0.011 is 1.1% above the target
    if saved is not None:
        report["saved"] = saved
    return report


def _human(name: str, plan: ScalingPlan, before: Profile, after: Profile, report: dict[str, Any]) -> str:
    ratio = after.macs / before.macs if before.macs else float("nan")
    m = plan.multipliers
    ideal = m.depth * m.width**2 * m.resolution**2
    lines = [
        f"{name}",
        str(plan),
        f"params {before.params / 1e6:.2f} M -> {after.params / 1e6:.2f} M "
        f"(x{after.params / max(1, before.params):.2f})",
        f"MACs   {before.macs / 1e9:.3f} G -> {after.macs / 1e9:.3f} G (x{ratio:.2f}; "
        f"d*w^2*r^2 = x{ideal:.2f})",
        f"activations {before.acts / 1e6:.2f} M -> {after.acts / 1e6:.2f} M (x{after.acts / max(1, before.acts):.2f})",
    ]
    if "target_macs" in report:
        lines.append(f"target {report['target_macs'] / 1e9:.3f} G MACs: got {after.macs / 1e9:.3f} G "
                     f"({report['target_miss'] * 100:+.1f}%)")
    if "target_acts" in report:
        lines.append(f"target {report['target_acts'] / 1e6:.2f} M activations: got {after.acts / 1e6:.2f} M "
                     f"({report['target_miss'] * 100:+.1f}%)")
    if "target_latency" in report:
        lines.append(f"target {report['target_latency'] * 1e3:.3g} ms: measured {(plan.latency or 0) * 1e3:.3g} ms "
                     f"± {(plan.latency_iqr or 0) * 1e3:.2g} ms (IQR; {_threads(report['threads'])}) "
                     f"({report['target_miss'] * 100:+.1f}%)")
    if "saved" in report:
        lines.append(f"saved to {report['saved']} ({os.path.getsize(report['saved']) / 1e6:.1f} MB); "
                     f"reload with compscale.checkpoint.load({report['saved']!r})")
    return "\n".join(lines)


def _table(args: argparse.Namespace, progress: Progress) -> int:
    from compscale.planning.strategy import get_strategy

    strategies = [get_strategy(name) for name in args.strategy]  # a bad name fails before the model is built
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.plot:
        _check_save_path(args.plot, "--plot", "costs.png")
        try:
            import matplotlib  # noqa: F401  (checked before the work: the plot needs it)
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'compscale[recipes]'") from None
    model = _load(args.model, progress)
    import torch

    from compscale import Planner

    options = {"input_size": args.input_size or 224, "stages": args.stages, "strict": args.strict}
    with progress.step(f"analysing {args.model}"):
        planner = Planner(model, **options)
    factor = args.alpha * args.beta**2 * args.gamma**2
    with progress.step(f"planning {len(args.phi)} phi x {len(strategies)} strategies"):
        rows = [_table_row(planner, name, strategy, phi, args, factor)
                for name, strategy in zip(args.strategy, strategies) for phi in args.phi]
    if args.latency:
        _time_rows(model, options, rows, args.batch_size, progress)
    for r in rows:
        del r["multipliers"]  # for the timing only: JSON has them as depth, width, resolution
    if args.plot:
        from compscale.verify.plot import plot_costs

        with progress.step(f"plotting {args.plot}"):
            plot_costs([{**r, "latency": (r.get("latency") or {}).get("median"),
                         "latency_iqr": (r.get("latency") or {}).get("iqr")} for r in rows], args.plot,
                       title=f"{args.model}: cost against phi")
    if args.json:
        timing = {"threads": torch.get_num_threads(), "rounds": _ROUNDS} if args.latency else {}
        print(json.dumps({"model": args.model, "base": {"macs": planner.base_macs, "params": planner.base_params,
                                                         "acts": planner.base_acts}, "rows": rows, **timing,
                          **({"plot": os.path.abspath(args.plot)} if args.plot else {})}))
        return 0
    print(f"{args.model}: alpha={args.alpha:g} beta={args.beta:g} gamma={args.gamma:g} "
          f"(alpha*beta^2*gamma^2 = {factor:.3f}); ideal = the strategy's MACs factor")
    if args.latency:
        print(f"latency: median ± IQR over the runs of {_ROUNDS} interleaved rounds, batch {args.batch_size}, "
              f"{_threads(torch.get_num_threads())}; ! marks a row whose spread exceeds {_NOISY:.0%} or that is 3x off "
              "its neighbours")
    timed = " latency (ms, median ± IQR) (runs)" if args.latency else ""
    print(f"{'strategy':<10} {'phi':>5} {'depth':>6} {'width':>6} {'input':>6} {'params (M)':>11} {'GMACs':>9} "
          f"{'x base':>7} {'ideal':>7} {'acts (M)':>9} {'x base':>7}{timed}")
    for r in rows:
        lat = r.get("latency")
        print(f"{r['strategy']:<10} {r['phi']:>5g} {r['depth']:>6.3f} {r['width']:>6.3f} {r['input_size'][0]:>6} "
              f"{r['params'] / 1e6:>11.2f} {r['macs'] / 1e9:>9.3f} {_ratio(r['macs_ratio'])} {r['ideal_ratio']:>7.2f} "
              f"{r['acts'] / 1e6:>9.2f} {_ratio(r['acts_ratio'])}"
              + (f" {lat['median'] * 1e3:>9.2f} ± {lat['iqr'] * 1e3:.2f} ({lat['runs']})" if lat else "")
              + (f" ! {r['flag']}" if r.get("flag") else ""))
    if args.plot:
        print(f"plot: {os.path.abspath(args.plot)}")
    return 0


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _ratio(x: float | None) -> str:
    """A ratio to the base, 7 wide (``-`` when the base has none of it: no conv, no MACs)."""
    return f"{x:>7.2f}" if x is not None else f"{'-':>7}"


def _table_row(planner: Any, name: str, strategy: Any, phi: float, args: argparse.Namespace,
               factor: float) -> dict[str, Any]:
    """One row of ``compscale table``: the plan of ``strategy`` at ``phi``, with its costs."""
    if name == "compound":
        p = planner.plan(phi, alpha=args.alpha, beta=args.beta, gamma=args.gamma)
        ideal = factor**phi
    else:
        p = planner.plan(phi, strategy=strategy)
        ideal = p.depth * p.width**2 * p.resolution**2
    return {"strategy": name, "phi": phi, "depth": _num(p.depth), "width": _num(p.width),
            "resolution": _num(p.resolution), "input_size": list(p.input_size), "params": p.params, "macs": p.macs,
            "acts": p.acts, "macs_ratio": round(p.macs / planner.base_macs, 4) if planner.base_macs else None,
            "acts_ratio": round(p.acts / planner.base_acts, 4) if planner.base_acts else None,
            "ideal_ratio": round(ideal, 4),
            "multipliers": p.multipliers}


_ROUNDS = 3  # interleaved rounds of a table's timing
_NOISY = 0.25  # a spread (IQR / median) above this is flagged


def _time_rows(model: nn.Module, options: dict[str, Any], rows: list[dict[str, Any]], batch_size: int,
               progress: Progress) -> None:
    """Build each row's network (``compscale.scale`` with ``options``, fresh weights, seed 0) and time them all,
    interleaved in rounds (:func:`compscale.verify.latency.compare`): ``row["latency"] = {median, iqr, runs,
    batch_size}``. A row larger than memory allows is not built; a noisy row, or one 3x off both its neighbours, gets
    ``row["flag"]``."""
    from compscale import latency, scale
    from compscale.planning.budget import params_limit
    from compscale.verify.latency import compare

    limit = params_limit(model)
    fits = [r for r in rows if limit is None or r["params"] <= limit]
    for r in rows:
        if r not in fits:
            r["flag"] = f"not timed: {r['params']:,} parameters, more than {limit:,} fit in memory"
    keep = limit is None or sum(r["params"] for r in fits) <= limit  # every network held at once, or rebuilt
    nets: dict[int, Any] = {}

    def measure(i: int) -> Any:
        r, m = fits[i], fits[i]["multipliers"]
        net = nets[i] if i in nets else scale(model, depth=m.depth, width=m.width, resolution=m.resolution, seed=0,
                                              **options)
        if keep:
            nets[i] = net
        return latency(net, tuple(r["input_size"]), batch_size=batch_size, min_run_time=0.2)

    with progress.step(f"timing {len(fits)} networks, {_ROUNDS} interleaved rounds"):
        timed = compare([functools.partial(measure, i) for i in range(len(fits))], _ROUNDS)
    for r, t in zip(fits, timed):
        r["latency"] = {"median": t.median, "iqr": t.iqr, "runs": len(t.times), "batch_size": batch_size,
                        "remeasured": t.remeasured}
    _flag_rows(fits)


def _flag_rows(rows: list[dict[str, Any]]) -> None:
    """Flag a row whose latency spread exceeds ``_NOISY``, or that is 3x off both neighbours of its strategy."""
    for i, r in enumerate(rows):
        lat = r["latency"]
        if lat["median"] > 0 and lat["iqr"] / lat["median"] > _NOISY:
            r["flag"] = f"noisy: IQR {lat['iqr'] / lat['median']:.0%} of the median"
            continue
        if _off(rows, i, -1) and _off(rows, i, 1):
            r["flag"] = "3x off its neighbours: time it again"


def _off(rows: list[dict[str, Any]], i: int, step: int) -> bool:
    """Whether row ``i``'s latency is 3x off its neighbour in direction ``step`` (of its strategy). Past the end of
    the strategy's rows, whether the neighbour on the other side agrees with its own next one (so that it is row
    ``i`` that is off, as a disturbed first row is)."""
    def median(j: int) -> float | None:
        ok = 0 <= j < len(rows) and rows[j]["strategy"] == rows[i]["strategy"]
        return float(rows[j]["latency"]["median"]) if ok else None

    def far(a: float, b: float) -> bool:
        return max(a / b, b / a) > 3

    here, there = median(i), median(i + step)
    if here is None:
        return False
    if there is not None:
        return far(here, there)
    near, next_ = median(i - step), median(i - 2 * step)
    return near is not None and next_ is not None and not far(near, next_)
