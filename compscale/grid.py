"""Step 1 of the EfficientNet recipe: grid-search alpha, beta, gamma at phi = 1 on a small model.

Candidates whose ``alpha * beta**2 * gamma**2`` is within ``tolerance`` of ``cost_factor`` (2 by default)
are scaled, profiled and scored by the user's ``evaluate(model, input_size) -> float`` (higher is
better). They run on any ``concurrent.futures.Executor``: in-process by default, a
``ProcessPoolExecutor`` on one machine, Dask's or Ray's executor on a cluster. Each finished candidate
is appended to a JSONL file; a rerun with the same file skips what is already there. A candidate that
raises is recorded with its error and the search goes on.

Example:
    >>> result = search(make_net, evaluate, {"alpha": [1.1, 1.2], "beta": [1.1], "gamma": [1.1, 1.15]},
    ...                 results="search.jsonl", executor=ProcessPoolExecutor(2))   # doctest: +SKIP
    >>> print(result)                                                             # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future, as_completed
from typing import Any

from torch import nn

from compscale.analyse.rules import channel_rules, user_rules
from compscale.planning.plan import ScalingPlan

__all__ = ["Candidate", "SearchResult", "candidates", "search"]

log = logging.getLogger("compscale.grid")

Evaluate = Callable[[nn.Module, tuple[int, ...]], float]


@dataclasses.dataclass(frozen=True)
class Candidate:
    alpha: float
    beta: float
    gamma: float

    @property
    def cost_factor(self) -> float:
        return self.alpha * self.beta**2 * self.gamma**2

    def key(self, phi: float) -> str:
        return f"{self.alpha:.6g}/{self.beta:.6g}/{self.gamma:.6g}@{phi:.6g}"


@dataclasses.dataclass
class SearchResult:
    """Rows (dicts with alpha, beta, gamma, cost_factor, input_size, macs, params, score or error), best first."""

    rows: list[dict[str, Any]]

    @property
    def best(self) -> dict[str, Any]:
        return self.rows[0]

    def __str__(self) -> str:
        lines = [f"{'alpha':>6} {'beta':>6} {'gamma':>6} {'a*b2*g2':>8} {'input':>6} {'GMACs':>8} {'params M':>9} "
                 f"{'score':>9}"]
        for r in self.rows:
            score = f"{r['score']:>9.4g}" if r.get("error") is None else f"  error: {r['error']}"
            lines.append(f"{r['alpha']:>6.3g} {r['beta']:>6.3g} {r['gamma']:>6.3g} {r['cost_factor']:>8.3f} "
                         f"{r.get('input_size', [0])[0]:>6} {r.get('macs', 0) / 1e9:>8.3f} "
                         f"{r.get('params', 0) / 1e6:>9.3f} {score}")
        return "\n".join(lines)


def candidates(grid: Mapping[str, Iterable[float]], cost_factor: float = 2.0,
               tolerance: float = 0.1) -> list[Candidate]:
    """The grid's (alpha, beta, gamma) with ``|alpha * beta**2 * gamma**2 - cost_factor| <= tolerance``."""
    out = [Candidate(a, b, g) for a, b, g in itertools.product(grid["alpha"], grid["beta"], grid["gamma"])]
    return [c for c in out if abs(c.cost_factor - cost_factor) <= tolerance]


class _InlineExecutor(Executor):
    """Runs each task when submitted, in this process (the default)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # the future carries it, as a pool's would
            future.set_exception(e)
        return future


def evaluate_candidate(build: Callable[[], nn.Module], evaluate: Evaluate, cand: Candidate, phi: float,
                       scale_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Scale ``build()`` with the candidate at ``phi``, profile it and score it (runs on a worker)."""
    from compscale.api import scale
    from compscale.verify.profile import profile

    row: dict[str, Any] = {"alpha": cand.alpha, "beta": cand.beta, "gamma": cand.gamma,
                           "cost_factor": cand.cost_factor, "phi": phi, "key": cand.key(phi)}
    try:
        model = scale(build(), phi, alpha=cand.alpha, beta=cand.beta, gamma=cand.gamma, **scale_kwargs)
        plan: ScalingPlan = model.scaling  # type: ignore[assignment]
        size = plan.input_size
        cost = profile(model, size)
        row.update(input_size=list(size), macs=cost.macs, params=cost.params, score=float(evaluate(model, size)),
                   error=None)
    except Exception as e:  # recorded, and the search goes on
        row.update(score=None, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return row


def search(
    build: Callable[[], nn.Module],
    evaluate: Evaluate,
    grid: Mapping[str, Iterable[float]],
    *,
    phi: float = 1.0,
    cost_factor: float = 2.0,
    tolerance: float = 0.1,
    executor: Executor | None = None,
    results: str | os.PathLike[str] | None = None,
    **scale_kwargs: Any,
) -> SearchResult:
    """Evaluate every admissible (alpha, beta, gamma) of ``grid`` and rank them by score.

    Args:
        build: makes a fresh base model (picklable, a module-level function, for a process pool).
        evaluate: ``evaluate(model, input_size) -> float``, higher is better (picklable likewise).
        grid: ``{"alpha": [...], "beta": [...], "gamma": [...]}``.
        phi: the compound coefficient the candidates are compared at (the paper's step 1: 1).
        cost_factor, tolerance: keep candidates with ``|alpha * beta**2 * gamma**2 - cost_factor| <= tolerance``.
        executor: where candidates run; in-process when omitted.
        results: a JSONL file; finished candidates are appended as they complete, and skipped on a rerun.
        scale_kwargs: passed to :func:`compscale.scale` (``input_size=``, ``stages=``, ``rules=``...). The channel
            rules in force where ``search`` is called go to every candidate, in whatever process it runs.
    """
    todo = candidates(grid, cost_factor, tolerance)
    done = _load(results)
    pending = [c for c in todo if c.key(phi) not in done]
    log.info("%d candidates, %d already in %s, %d to evaluate", len(todo), len(todo) - len(pending), results,
             len(pending))
    pool = executor or _InlineExecutor()
    # the rules in force here (registered, or scoped with channel_rules) travel with each candidate, so that a
    # process pool's workers, which import compscale anew, see them too
    with channel_rules(scale_kwargs.pop("rules", None)):
        scale_kwargs["rules"] = user_rules()
    futures = [pool.submit(evaluate_candidate, build, evaluate, c, phi, scale_kwargs) for c in pending]
    for future in as_completed(futures):
        row = future.result()
        done[row["key"]] = row
        if results is not None:
            with open(results, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    rows = [done[c.key(phi)] for c in todo]
    rows.sort(key=lambda r: (r.get("error") is not None, -(r.get("score") or 0.0), r["key"]))
    return SearchResult(rows)


def _load(results: str | os.PathLike[str] | None) -> dict[str, dict[str, Any]]:
    if results is None or not os.path.exists(results):
        return {}
    with open(results, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {row["key"]: row for row in rows}
