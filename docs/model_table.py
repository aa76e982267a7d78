"""Which models of a library compscale scales, and why the others fail: every name ``compscale models`` lists.

    python docs/model_table.py --names resnet18,vgg11,squeezenet1_0   # a few models, printed
    python docs/model_table.py --write docs/torchvision.md              # every torchvision model, and the page
    python docs/model_table.py --library timm --write docs/timm.md      # every timm model (pip install timm)

Each model (``compscale.models.torchvision_model(name)``, ``timm.create_model(name)``) is built on the meta device
(shapes only, no weights: a ViT-giant costs no memory and no time to initialise), then scaled three ways: ``phi=1``,
depth only (``depth=1.5``) and width only (``width=1.5``). A success reports MACs(scaled) / MACs(base), each measured
with ``compscale.profile`` at its own input size; a failure reports the exception (a model that cannot even be built
or profiled at its base input size too). The base input size is the model's own: 224x224 for an image model unless
timm's ``pretrained_cfg`` (or torchvision's Inception, 299) says otherwise, ``(16, H, W)`` clips for torchvision's
video models, two 224x224 images for RAFT (optical flow). A model whose constructor computes with tensors (which the
meta device cannot) is built on the CPU and moved to the meta device; one that fails on the meta device for the meta
device's own sake (an op with no meta kernel: a detector's ``nonzero``) is run again on the CPU with random weights.

Workers (``--jobs`` at a time) each take a chunk of names (``--chunk``), so that torch is imported once per chunk,
and report one JSON line per model as they go. A worker that crashes or runs past ``--timeout`` seconds on one model
is stopped, and the models it had not reported are run again one per process: a crash, a timeout or running out of
memory is pinned to its model and is a failure row like the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import re
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

import compscale
from compscale.models import TIMM_PREFIX, list_models
from compscale.trace.parts import network_part

TITLES = {"torchvision": "torchvision: every model compscale lists",
          "timm": "timm: every model compscale lists"}
MODES: dict[str, dict[str, Any]] = {"phi=1": {"phi": 1}, "depth x1.5": {"depth": 1.5}, "width x1.5": {"width": 1.5}}
BASE_SIZE = (224, 224)
WRITE_COMMANDS = {"torchvision": "python docs/model_table.py --write docs/torchvision.md",
                  "timm": "python docs/model_table.py --library timm --write docs/timm.md"}
# torchvision's video classifiers take (N, 3, T, H, W) clips: 16 frames at the crop size of their weights' transforms
VIDEO_SIZES = {"r3d_18": (16, 112, 112), "mc3_18": (16, 112, 112), "r2plus1d_18": (16, 112, 112),
               "s3d": (16, 224, 224), "mvit_v1_b": (16, 224, 224), "mvit_v2_s": (16, 224, 224),
               "swin3d_t": (16, 224, 224), "swin3d_s": (16, 224, 224), "swin3d_b": (16, 224, 224)}
TWO_IMAGES = {"raft_small", "raft_large"}  # optical flow: forward(image1, image2)
OTHER_SIZES = {"inception_v3": (299, 299), "quantized_inception_v3": (299, 299)}
CPU_PARAMS_LIMIT = 300_000_000  # a larger model that fails on the meta device is not built on the CPU again
FIRST_EXTRA_S = 60.0  # a worker's first model also waits for torch (and timm) to import


@dataclass
class Success:
    macs_ratio: float
    params_before: int
    params_after: int
    input_size: tuple[int, ...]


@dataclass
class Failure:
    error: str
    first_line: str
    hint: str | None
    ours: bool  # False: not a CompscaleError, which is a compscale bug (or a crash, a timeout)


Outcome = Success | Failure


@dataclass
class Inputs:
    """What a model's forward takes: ``count`` tensors of shape ``(1, channels, *size)``."""

    size: tuple[int, ...]
    channels: int = 3
    count: int = 1

    def make(self, size: tuple[int, ...] | None = None, device: str = "meta") -> tuple[torch.Tensor, ...]:
        shape = (1, self.channels, *(size or self.size))
        return tuple(torch.zeros(shape, device=device) for _ in range(self.count))


def names_of(library: str) -> list[str]:
    """Every model name ``compscale models --library LIBRARY`` lists, without the ``timm/`` prefix."""
    return [n.removeprefix(TIMM_PREFIX) for n in list_models(library=library)]  # type: ignore[arg-type]


def build(library: str, name: str, device: str = "meta") -> nn.Module:
    """The model with no weights (every parameter and buffer on the meta device), or random ones on the CPU."""
    with torch.device(device):
        if library == "timm":
            import timm

            return cast(nn.Module, timm.create_model(name, pretrained=False))
        from compscale.models import torchvision_model

        return torchvision_model(name)


def inputs_of(library: str, name: str, model: nn.Module) -> Inputs:
    if library == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(int(s) for s in cfg.get("input_size", (3, *BASE_SIZE)))
        return Inputs(size[1:], channels=size[0])
    if name in VIDEO_SIZES:
        return Inputs(VIDEO_SIZES[name])
    if name in TWO_IMAGES:
        return Inputs(BASE_SIZE, count=2)
    return Inputs(OTHER_SIZES.get(name, BASE_SIZE))


def failure(e: BaseException, prefix: str = "") -> Failure:
    hint = e.hint if isinstance(e, compscale.CompscaleError) else None
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return Failure(type(e).__name__, prefix + first, hint, isinstance(e, compscale.CompscaleError))


def try_scale(base: nn.Module, base_macs: int, inputs: Inputs, kwargs: dict[str, Any], device: str) -> Outcome:
    """Scale ``base`` with ``kwargs`` and measure it, or record why it cannot be scaled."""
    try:
        scaled = compscale.scale(base, example_inputs=inputs.make(device=device), **kwargs)
        size = tuple(int(s) for s in cast(compscale.ScalingPlan, scaled.scaling).input_size)
        after = compscale.profile(scaled, example_inputs=inputs.make(size, device))
    except Exception as e:  # a report: anything compscale raises, on purpose or not, is a row
        return failure(e)
    before_params = sum(p.numel() for p in base.parameters())
    return Success(after.macs / base_macs, before_params, after.params, size)


def meta_only(outcomes: dict[str, Outcome]) -> bool:
    """Whether a failure on the meta device is the meta device's own (an op with no meta kernel, a value read
    off a tensor that holds none), not compscale's."""
    return any(isinstance(o, Failure) and not o.ours and "meta" in f"{o.error} {o.first_line}".lower()
               for o in outcomes.values())


def run_model(library: str, name: str) -> tuple[dict[str, Outcome], str]:
    """The model's outcomes, and where they were found: ``"meta"`` (built on the meta device), ``"moved"`` (its
    constructor computes with tensors, which the meta device cannot: built on the CPU, then moved to the meta device),
    or ``"cpu"`` (random weights, where the meta device itself was what failed: an op with no meta kernel)."""
    where = "meta"
    try:
        base = build(library, name, "meta")
    except Exception:
        try:
            base, where = build(library, name, "cpu").to("meta"), "moved"
        except Exception as e:  # the library's own constructor: a row in every column
            failed = failure(e, "building the model: ")
            return {mode: failed for mode in MODES}, where
    outcomes = run_on(library, name, base.eval(), "meta")
    if meta_only(outcomes) and sum(p.numel() for p in base.parameters()) <= CPU_PARAMS_LIMIT:
        del base
        try:
            base = build(library, name, "cpu")
        except Exception as e:
            failed = failure(e, "building the model: ")
            return {mode: failed for mode in MODES}, "cpu"
        return run_on(library, name, base.eval(), "cpu"), "cpu"
    return outcomes, where


def run_on(library: str, name: str, base: nn.Module, device: str) -> dict[str, Outcome]:
    """Profile ``base`` (on ``device``) at its own input size, then scale it each way. A detector's own size is what
    its transform resizes to (found from its network part, which only a model with weights can run)."""
    inputs = inputs_of(library, name, base)
    if device == "cpu":
        try:
            own = network_part(base).input_size
        except compscale.CompscaleError:  # no detector
            own = None
        inputs = Inputs(own) if own is not None else inputs
    try:
        base_macs = compscale.profile(base, example_inputs=inputs.make(device=device)).macs
    except Exception as e:  # not profiled at its base input size: a row in every column
        failed = failure(e, "the base model: ")
        return {mode: failed for mode in MODES}
    return {mode: try_scale(base, base_macs, inputs, kwargs, device) for mode, kwargs in MODES.items()}


def decode(data: dict[str, Any]) -> dict[str, Outcome]:
    return {mode: Success(**{**o, "input_size": tuple(o["input_size"])}) if "macs_ratio" in o else Failure(**o)
            for mode, o in data.items()}


def worker(library: str, names: list[str]) -> None:
    """Run ``names`` one after the other, one JSON line per model on stdout as each finishes."""
    for name in names:
        start = time.perf_counter()
        outcomes, device = run_model(library, name)
        seconds = time.perf_counter() - start
        line = {"name": name, "seconds": round(seconds, 3), "device": device,
                "outcomes": {mode: dataclasses.asdict(o) for mode, o in outcomes.items()}}
        print(json.dumps(line), flush=True)


Report = Callable[[str, dict[str, Outcome], float, str], None]


def run_chunk(library: str, names: list[str], timeout: float, report: Report) -> None:
    """Run ``names`` in one worker process; ``report(name, outcomes, seconds, device)`` for each. A crash or a
    timeout stops the worker: the models it had not reported are run again one per process (a lone model's crash is
    its row)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--library", library, "--worker", ",".join(names)]
    pending = list(names)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout + FIRST_EXTRA_S
        timed_out = False
        while pending:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(timeout=left):
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                continue
            line = proc.stdout.readline()
            if not line:  # the worker exited (a crash, or killed for memory)
                break
            if not line.startswith('{"name": '):  # something the model's own code printed
                continue
            data = json.loads(line)
            pending.remove(data["name"])
            report(data["name"], decode(data["outcomes"]), float(data["seconds"]), data["device"])
            deadline = time.monotonic() + timeout
        if pending:
            proc.kill()
        proc.wait()
        sel.close()
        proc.stdout.close()
        err.seek(0)
        last = (err.read().strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    if not pending:
        return
    if len(names) == 1:
        if timed_out:
            failed = Failure("Timeout", f"took more than {timeout:g} s", None, False)
        else:
            failed = Failure("Crash", f"exit code {proc.returncode}: {last}", None, False)
        report(names[0], {mode: failed for mode in MODES}, timeout if timed_out else 0.0, "")
        return
    for name in pending:
        run_chunk(library, [name], timeout, report)


def run_all(library: str, names: list[str], jobs: int, chunk: int, timeout: float, progress: bool = True,
            cache: Path | None = None) -> tuple[dict[str, dict[str, Outcome]], dict[str, float], dict[str, str]]:
    """Every model of ``names``, ``jobs`` workers at a time, ``chunk`` models per worker; the results in the
    order of ``names``, the seconds each took in its worker, and where each ran (:func:`run_model`). With ``cache``
    (a JSON-lines file), each result is appended to it as it comes, and models it holds already are not run again:
    a long run (every timm model) can stop and go on. Delete the file after changing compscale."""
    cached = _read_cache(cache, names) if cache is not None else {}
    todo = [n for n in names if n not in cached]
    chunks: queue.Queue[list[str]] = queue.Queue()
    for i in range(0, len(todo), max(1, chunk)):
        chunks.put(todo[i:i + max(1, chunk)])
    results: dict[str, dict[str, Outcome]] = {n: decode(c["outcomes"]) for n, c in cached.items()}
    seconds: dict[str, float] = {n: float(c["seconds"]) for n, c in cached.items()}
    devices: dict[str, str] = {n: str(c["device"]) for n, c in cached.items()}
    lock = threading.Lock()
    start = time.monotonic()

    def report(name: str, outcomes: dict[str, Outcome], took: float, device: str) -> None:
        with lock:
            results[name], seconds[name], devices[name] = outcomes, took, device
            if cache is not None:
                with cache.open("a") as f:
                    f.write(json.dumps({"name": name, "seconds": round(took, 3), "device": device,
                                        "outcomes": {m: dataclasses.asdict(o) for m, o in outcomes.items()}}) + "\n")
            if progress:
                ok = sum(isinstance(o, Success) for o in outcomes.values())
                where = {"cpu": " (on the CPU)", "moved": " (built on the CPU, moved to meta)"}.get(device, "")
                print(f"[{len(results)}/{len(names)} {time.monotonic() - start:.0f} s] {name}: {took:.1f} s, "
                      f"{ok}/{len(outcomes)} scaled{where}", file=sys.stderr, flush=True)

    def pull() -> None:
        while True:
            try:
                part = chunks.get_nowait()
            except queue.Empty:
                return
            run_chunk(library, part, timeout, report)

    threads = [threading.Thread(target=pull) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {n: results[n] for n in names}, {n: seconds[n] for n in names}, {n: devices[n] for n in names}


def _read_cache(cache: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The results ``cache`` holds for ``names`` (a line cut short by a stopped run is skipped)."""
    if not cache.exists():
        return {}
    found: dict[str, dict[str, Any]] = {}
    wanted = set(names)
    text = cache.read_text()
    if text and not text.endswith("\n"):  # the cut line ends here, so that the next result starts a line
        with cache.open("a") as f:
            f.write("\n")
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if data.get("name") in wanted:
            found[data["name"]] = data
    return found


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


def format_size(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def details(results: dict[str, dict[str, Outcome]]) -> str:
    lines = ["| model | scaling | input size | params | MACs x base |", "|---|---|---|---|---|"]
    for name, outcomes in results.items():
        for mode, o in outcomes.items():
            if isinstance(o, Success):
                params = f"{o.params_before / 1e6:.2f} M -> {o.params_after / 1e6:.2f} M"
                lines.append(f"| {name} | {mode} | {format_size(o.input_size)} | {params} | {o.macs_ratio:.2f} |")
    return "\n".join(lines)


def failures(results: dict[str, dict[str, Outcome]]) -> str:
    lines = []
    for name, outcomes in results.items():
        for mode, o in outcomes.items():
            if isinstance(o, Failure):
                bug = "" if o.ours else " (not a `CompscaleError`: a compscale bug)"
                first = o.first_line.replace("\n", " ")
                lines.append(f"- **{name}**, {mode}: `{o.error}`{bug}: {first}")
                lines.append(f"  Hint: {o.hint}" if o.hint else "  (no hint)")
    return "\n".join(lines) if lines else "None."


def counts(results: dict[str, dict[str, Outcome]]) -> tuple[int, int, int]:
    """Models that scale all three ways; that fail (one way or more) with CompscaleErrors only; that raise another
    exception (or crash, or time out) one way or more."""
    scaled = ours = other = 0
    for outcomes in results.values():
        failed = [o for o in outcomes.values() if isinstance(o, Failure)]
        if not failed:
            scaled += 1
        elif all(o.ours for o in failed):
            ours += 1
        else:
            other += 1
    return scaled, ours, other


def page(library: str, results: dict[str, dict[str, Outcome]], where: dict[str, str] | None = None,
         unmeasured: list[str] | None = None) -> str:
    scaled, ours, other = counts(results)
    listed = len(names_of(library))
    which = f"each of the {listed} models" if len(results) == listed else f"{len(results)} of the {listed} models"
    sizes = {"torchvision": "224x224, 299x299 for Inception v3, 16-frame clips (16x112x112 or 16x224x224) for the "
                            "video models, two 224x224 images for RAFT, a detector's transform size (800x800 for "
                            "R-CNNs, RetinaNet and FCOS, 320x320 for SSDlite, 300x300 for SSD300) on its network part",
             "timm": "the `input_size` of the model's `pretrained_cfg`, 224x224 for most"}[library]
    notes = ""
    moved = [n for n, w in (where or {}).items() if w == "moved"]
    on_cpu = [n for n, w in (where or {}).items() if w == "cpu"]
    if moved:
        notes += (f" {len(moved)} compute with tensors in their constructor, which the meta device cannot: they were "
                  f"built on the CPU, then moved to the meta device: {', '.join(moved)}.")
    if on_cpu:
        notes += (f" {len(on_cpu)} failed on the meta device for the meta device's own sake (an op with no meta "
                  f"kernel) and were run on the CPU with random weights instead: {', '.join(on_cpu)}.")
    counted = [f"- listed by `compscale models --library {library}`: {listed}"]
    if len(results) != listed:
        counted.append(f"- in this table: {len(results)}")
    counted += [f"- scale all three ways: {scaled}",
                f"- fail (one way or more) with a `CompscaleError` only: {ours}",
                f"- fail (one way or more) with another exception, a crash or a timeout (a compscale bug): {other}"]
    return "\n\n".join([
        f"# {TITLES[library]}",
        f"Generated by `{WRITE_COMMANDS[library]}`: {which} `compscale models --library "
        f"{library}` lists, built on the meta device (shapes only, no weights), scaled with `phi=1`, `depth=1.5` and "
        f"`width=1.5`; a success shows MACs(scaled) / MACs(base), each at its own input size (the base model's: "
        f"{sizes}). {scaled} of {len(results)} scale all three ways.{notes}",
        "\n".join(counted),
        table(results),
        "## Successes\n\n" + details(results),
        "## Failures\n\n" + failures(results),
        *([f"## Not measured yet\n\nThe run stopped before these {len(unmeasured)} models; "
           f"`{WRITE_COMMANDS[library]} --cache PATH` goes on where it stopped:\n\n" + ", ".join(unmeasured)]
          if unmeasured else []),
    ]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", choices=("torchvision", "timm"), default="torchvision")
    parser.add_argument("--names", default=None, metavar="A,B,...",
                        help="these models only (comma-separated, as `compscale models` lists them); default: all")
    parser.add_argument("--write", type=Path, metavar="PATH", help="also write the Markdown page to PATH")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes at once")
    parser.add_argument("--chunk", type=int, default=16, help="models per worker process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model before it is a failure")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--cache", type=Path, default=None, metavar="PATH",
                        help="append each result to this JSON-lines file and skip the models it holds (a long run "
                             "can stop and go on; delete it after changing compscale)")
    parser.add_argument("--from-cache", action="store_true",
                        help="run nothing: write the page from what --cache holds, the other models listed as not "
                             "measured yet")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a worker: these models, JSON lines
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.library, args.worker.split(","))
        return
    known = names_of(args.library)
    names = known if args.names is None else [n.strip().removeprefix(TIMM_PREFIX) for n in args.names.split(",")]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"not listed by `compscale models --library {args.library}`: {', '.join(unknown)}")
    if args.from_cache:
        if args.cache is None or args.write is None:
            parser.error("--from-cache writes the page (--write) from a cache (--cache)")
        cached = _read_cache(args.cache, names)
        done = {n: decode(cached[n]["outcomes"]) for n in names if n in cached}
        args.write.write_text(page(args.library, done, {n: str(cached[n]["device"]) for n in done},
                                   [n for n in names if n not in cached]))
        print(f"wrote {args.write}: {len(done)} of {len(names)} models measured")
        return
    start = time.monotonic()
    results, seconds, devices = run_all(args.library, names, args.jobs, args.chunk, args.timeout,
                                        progress=not args.quiet, cache=args.cache)
    print(table(results))
    total = sum(seconds.values())
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:5]
    print(f"\n{len(names)} models in {time.monotonic() - start:.0f} s wall; {total / max(1, len(names)):.2f} s per "
          f"model in its worker; slowest: " + ", ".join(f"{n} {s:.1f} s" for n, s in slowest))
    if args.write:
        args.write.write_text(page(args.library, results, devices))
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
