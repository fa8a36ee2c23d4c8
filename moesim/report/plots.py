"""PNG plots of a sweep: each chosen metric against each varied axis (matplotlib, Agg).

One figure per (metric, axis). The other varied axes become one line each
(up to :data:`MAX_LINES`); beyond that the line is their mean and a band
spans their min..max. Error bars show the 95 % interval when seeds > 1.
``None`` values (e.g. ``capacity_factor: null`` = dropless) plot as a
category named ``null``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from moesim.explore.metrics import metric
from moesim.explore.variants import format_value
from moesim.io import atomic_write
from moesim.report.compare_tables import unit_scale

MAX_LINES = 8


def plot_sweep(
    summary: pd.DataFrame,
    axis_cols: Sequence[str],
    metrics: Sequence[str],
    out_dir: str | Path,
    *,
    title: str = "",
) -> list[Path]:
    """Write ``<metric>_vs_<axis>.png`` for every metric and every axis with > 1 value."""
    varied = [c for c in axis_cols if summary[c].map(format_value).nunique() > 1]
    # a linked axis (dp that moves with ep) is a function of its partner: no own plot, no lines
    shown = [c for i, c in enumerate(varied) if not any(_linked(summary, p, c) for p in varied[:i])]
    paths = []
    for m in metrics:
        if m not in summary.columns:
            continue
        for axis in shown:
            others = [c for c in shown if c != axis and not _linked(summary, axis, c)]
            path = Path(out_dir) / f"{m}_vs_{_slug(axis)}.png"
            paths.append(plot_metric(summary, m, axis, others, path, title=title))
    return paths


def _linked(summary: pd.DataFrame, a: str, b: str) -> bool:
    """True when ``a`` and ``b`` determine each other (they vary together)."""
    fa, fb = summary[a].map(format_value), summary[b].map(format_value)
    return bool((fb.groupby(fa).nunique() <= 1).all() and (fa.groupby(fb).nunique() <= 1).all())


def plot_metric(
    summary: pd.DataFrame,
    metric_key: str,
    axis: str,
    others: Sequence[str],
    path: Path,
    *,
    title: str = "",
) -> Path:
    """One PNG of ``metric_key`` against ``axis``, one line per combination of ``others``."""
    info = metric(metric_key)
    xs = list({format_value(x): x for x in reversed(summary[axis].tolist())}.values())[::-1]
    numeric = all(_is_num(x) for x in xs)
    if numeric:
        xs = sorted(xs)
    scale, suffix = unit_scale(_max_abs(summary[metric_key]), info.unit)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    try:
        groups = _groups(summary, others)
        by = next((o for o in others if summary[o].map(format_value).nunique() <= MAX_LINES), None)
        if len(groups) > MAX_LINES and by is not None:
            _draw_means(ax, summary, metric_key, axis, by, xs, numeric, scale)
        elif len(groups) > MAX_LINES:
            _draw_band(ax, summary, metric_key, axis, xs, numeric, scale, len(groups))
        else:
            for label, frame in groups:
                _draw_line(ax, frame, metric_key, axis, xs, numeric, scale, label)
        ci = summary.get(f"{metric_key}_ci95")
        if ci is not None and (ci.fillna(0) > 0).any():
            title = f"{title}  (bars: 95 % interval over seeds)".strip()
        _decorate(ax, xs, numeric, axis, f"{info.title} ({suffix})", title)
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
    return path


def _groups(summary: pd.DataFrame, others: Sequence[str]) -> list[tuple[str, pd.DataFrame]]:
    if not others:
        return [("", summary)]
    keys = summary[list(others)].apply(
        lambda row: ", ".join(f"{c}={format_value(row[c])}" for c in others), axis=1
    )
    return [(label, summary[keys == label]) for label in dict.fromkeys(keys)]


def _positions(values: Sequence[Any], xs: Sequence[Any], numeric: bool) -> list[float]:
    if numeric:
        return [float(v) for v in values]
    names = [format_value(x) for x in xs]
    return [float(names.index(format_value(v))) for v in values]


def _draw_line(
    ax: Any,
    frame: pd.DataFrame,
    m: str,
    axis: str,
    xs: Sequence[Any],
    numeric: bool,
    scale: float,
    label: str,
) -> None:
    order = sorted(range(len(frame)), key=lambda i: _positions([frame[axis].iloc[i]], xs, numeric))
    frame = frame.iloc[order]
    x = _positions(frame[axis].tolist(), xs, numeric)
    y = frame[m].to_numpy(dtype=float) / scale
    ci_col = f"{m}_ci95"
    yerr = frame[ci_col].to_numpy(dtype=float) / scale if ci_col in frame else None
    if yerr is not None and not (yerr > 0).any():
        yerr = None
    # categories (router kinds, schemes) have no order between them: markers, no line
    ls = "-" if numeric else "none"
    ax.errorbar(x, y, yerr=yerr, marker="o", ls=ls, capsize=3, label=label or None)


def _draw_means(
    ax: Any,
    summary: pd.DataFrame,
    m: str,
    axis: str,
    by: str,
    xs: Sequence[Any],
    numeric: bool,
    scale: float,
) -> None:
    """One line per value of ``by``: the mean over every other setting."""
    names = [format_value(x) for x in xs]
    x = _positions(xs, xs, numeric)
    for value, frame in summary.groupby(summary[by].map(format_value), sort=False):
        vals = frame.groupby(frame[axis].map(format_value), sort=False)[m]
        mean = vals.mean().reindex(names).to_numpy(dtype=float) / scale
        n = int(vals.size().max())
        ax.plot(x, mean, marker="o", label=f"{by}={value} (mean of {n})")


def _draw_band(
    ax: Any,
    summary: pd.DataFrame,
    m: str,
    axis: str,
    xs: Sequence[Any],
    numeric: bool,
    scale: float,
    n: int,
) -> None:
    by_x = summary.groupby(summary[axis].map(format_value), sort=False)[m]
    names = [format_value(x) for x in xs]
    mean = by_x.mean().reindex(names).to_numpy(dtype=float) / scale
    lo = by_x.min().reindex(names).to_numpy(dtype=float) / scale
    hi = by_x.max().reindex(names).to_numpy(dtype=float) / scale
    x = _positions(xs, xs, numeric)
    ax.plot(x, mean, marker="o", label=f"mean over {n} other settings")
    ax.fill_between(x, lo, hi, alpha=0.25, label="min..max")


def _decorate(
    ax: Any, xs: Sequence[Any], numeric: bool, axis: str, ylabel: str, title: str
) -> None:
    if numeric:
        positive = [float(x) for x in xs if float(x) > 0]
        if len(positive) == len(xs) and max(positive) / min(positive) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks([float(x) for x in xs], [format_value(x) for x in xs])
    else:
        ax.set_xticks(range(len(xs)), [format_value(x) for x in xs])
        ax.set_xlim(-0.5, len(xs) - 0.5)  # end categories off the frame
    ax.set_xlabel(axis)
    ax.set_ylabel(ylabel)
    lo, hi = ax.get_ylim()
    lo = min(0.0, lo)
    ax.set_ylim(lo, hi + 0.05 * (hi - lo))  # a zero-based axis keeps a margin above the top bar
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _is_num(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _max_abs(series: pd.Series) -> float:
    vals = series.dropna().abs()
    return float(vals.max()) if len(vals) else 0.0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_traffic(traffic: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Heatmaps of one dispatch's GPU x GPU bytes and each link kind's utilisation.

    ``traffic`` is :attr:`moesim.simulate.SimResult.traffic`; writes
    ``dispatch_matrix.png`` and ``link_utilization.png`` under ``out_dir``.
    """
    import numpy as np

    out = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 5))
    mat = np.asarray(traffic["dispatch_bytes"], dtype=float)
    im = ax.imshow(mat / 1e6, cmap="viridis")
    fig.colorbar(im, ax=ax, label="MB")
    ax.set_xlabel("destination rank (EP group 0)")
    ax.set_ylabel("source rank")
    ax.set_title("one dispatch (layer 0, micro-batch 0)")
    paths.append(_save(fig, out / "dispatch_matrix.png"))
    kinds = [k for k, v in traffic["link_utilization"].items() if len(v) and len(v[0])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        im = ax.imshow(np.asarray(traffic["link_utilization"][kind]), aspect="auto",
                       cmap="magma", vmin=0.0, vmax=1.0)  # fmt: skip
        ax.set_title(kind)
        ax.set_xlabel("link (rank / node)")
    axes[0][0].set_ylabel("EP group")
    fig.colorbar(im, ax=axes[0].tolist(), label="utilisation over the step")
    paths.append(_save(fig, out / "link_utilization.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
