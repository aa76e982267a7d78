"""The cost of scaled models against phi, drawn to a PNG (``compscale table ... --plot out.png``).

One panel per metric (MACs, parameters, activations, latency), one line per scaling strategy, phi along x and
the cost on a log scale: as a multiple of the strategy's phi=0 row where every strategy has one, else in
absolute units. A measured metric's spread (``"latency_iqr"``: its interquartile range) is drawn as error bars
spanning the IQR around the median, so that a difference within the noise shows as one.
matplotlib is an optional dependency (``compscale[recipes]``), imported only here, and drawn through its Agg canvas
directly so that the user's pyplot backend is left as it was.

Example:
    >>> rows = [{"strategy": "compound", "phi": phi, "macs": 4.1e9 * 2**phi, "params": 25.6e6 * 1.6**phi}
    ...         for phi in range(4)]
    >>> plot_costs(rows, "costs.png", title="resnet50")
    'costs.png'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from compscale.errors import CompscaleError

__all__ = ["METRICS", "plot_costs"]


@dataclasses.dataclass(frozen=True)
class _Metric:
    title: str
    unit: str  # the label of absolute values, once multiplied by ``scale``
    scale: float


METRICS: dict[str, _Metric] = {
    "macs": _Metric("MACs", "GMACs", 1e-9),
    "params": _Metric("parameters", "M params", 1e-6),
    "acts": _Metric("activations", "M activations", 1e-6),
    "latency": _Metric("latency", "ms", 1e3),  # rows give seconds
}

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_costs(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None,
               metrics: Sequence[str] | None = None) -> str:
    """Draw each metric of ``rows`` against phi, one line per strategy, and write the figure as a PNG.

    Args:
        rows: one mapping per (strategy, phi): ``"strategy"``, ``"phi"`` and any of ``"macs"``, ``"params"``,
            ``"acts"``, ``"latency"`` (seconds); a metric missing or ``None`` in a row leaves that point out.
            ``"<metric>_iqr"`` (``"latency_iqr"``) gives the metric's spread, drawn as error bars.
        path: the PNG to write; its directory must exist.
        title: the figure's title.
        metrics: the panels, in order; by default every metric of :data:`METRICS` that some row has.

    Returns:
        ``path``, as a string.

    Raises:
        ValueError: no rows, a row without strategy or phi, an unknown metric, or no metric with a value.
        FileNotFoundError: the directory of ``path`` does not exist.
        CompscaleError: matplotlib is not installed.
    """
    out = os.fspath(path)
    names = _metrics_to_plot(rows, metrics)
    directory = os.path.dirname(out) or "."
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"plot_costs: cannot write {out!r}, directory {directory!r} does not exist")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise CompscaleError("plotting costs needs matplotlib, which is not installed",
                             "pip install matplotlib (or compscale[recipes])") from e

    fig = Figure(figsize=(4.2 * len(names), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    strategies = list(dict.fromkeys(str(row["strategy"]) for row in rows))  # one colour and marker each, everywhere
    for ax, name in zip(axes, names):
        _draw_metric(ax, rows, name, strategies)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    axes[0].legend([handles[s] for s in strategies if s in handles], [s for s in strategies if s in handles],
                   title="strategy")
    if title:
        fig.suptitle(title)
    fig.savefig(out, format="png")
    return out


def _metrics_to_plot(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    """The metrics to draw, checked: each known, and each with a value in some row."""
    if not rows:
        raise ValueError("plot_costs: no rows to plot")
    for i, row in enumerate(rows):
        if "strategy" not in row or "phi" not in row:
            raise ValueError(f"plot_costs: row {i} has no 'strategy' or no 'phi': {dict(row)!r:.200}")
    unknown = [m for m in metrics or () if m not in METRICS]
    if unknown:
        raise ValueError(f"plot_costs: unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    present = [m for m in METRICS if any(row.get(m) is not None for row in rows)]
    names = present if metrics is None else [m for m in metrics if m in present]
    if not names:
        asked = ", ".join(metrics) if metrics is not None else ", ".join(METRICS)
        raise ValueError(f"plot_costs: no row has a value for any metric to plot ({asked})")
    return names


def _series(rows: Sequence[Mapping[str, Any]], name: str) -> dict[str, list[tuple[float, float, float]]]:
    """Each strategy's (phi, value, spread) points of one metric, by phi, in the order the strategies first appear
    (the spread is the row's ``<name>_iqr``, 0 without one)."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows:
        if row.get(name) is not None:
            spread = float(row.get(f"{name}_iqr") or 0.0)
            series.setdefault(str(row["strategy"]), []).append((float(row["phi"]), float(row[name]), spread))
    return {strategy: sorted(points) for strategy, points in series.items()}


def _draw_metric(ax: Any, rows: Sequence[Mapping[str, Any]], name: str, strategies: list[str]) -> None:
    """One panel: relative to phi=0 when every strategy has a positive phi=0 value, else in absolute units."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, LogLocator

    metric = METRICS[name]
    series = _series(rows, name)
    bases = {s: next((v for phi, v, _ in points if phi == 0.0), None) for s, points in series.items()}
    relative = all(base is not None and base > 0 for base in bases.values())
    for strategy, points in series.items():
        i, base = strategies.index(strategy), bases[strategy]
        divisor = base if relative and base is not None else 1 / metric.scale
        xs, ys = [phi for phi, _, _ in points], [value / divisor for _, value, _ in points]
        spreads = [spread / divisor for _, _, spread in points]
        style = {"marker": _MARKERS[i % len(_MARKERS)], "color": f"C{i % 10}", "label": strategy}
        if any(spreads):  # the IQR around the median, kept above zero on the log scale
            low = [min(s / 2, y * 0.999) for s, y in zip(spreads, ys)]
            ax.errorbar(xs, ys, yerr=[low, [s / 2 for s in spreads]], capsize=3, **style)
        else:
            ax.plot(xs, ys, **style)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    if relative:
        ax.set_yscale("log", base=2)  # compound scaling aims at 2**phi: powers of two are the natural ticks
        ax.set_ylabel("× its phi=0 value")
        low, high = ax.get_ylim()
        if high / low < 4:  # under two octaves, label the ticks between the powers of two too
            ax.yaxis.set_minor_locator(LogLocator(base=2, subs=(1.25, 1.5, 1.75)))
            ax.yaxis.set_minor_formatter(plain)
    else:
        ax.set_yscale("log")
        ax.set_ylabel(metric.unit)
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.yaxis.set_major_formatter(plain)
    ax.set_title(metric.title)
    ax.set_xlabel("phi")
    ax.grid(alpha=0.3, which="both")
