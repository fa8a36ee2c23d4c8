"""PNG plots of per-step series (``dynamics.series``): one line per variant, seeds as a band."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from moesim.io import atomic_write

#: series key -> (axis label, scale, log y)
SERIES = {
    "expert_imbalance": ("expert load imbalance (max/mean)", 1.0, False),
    "gpu_imbalance": ("GPU load imbalance (max/mean)", 1.0, False),
    "step_time_s": ("step time (s)", 1.0, False),
    "drop_fraction": ("dropped assignments (%)", 100.0, False),
}
#: series key -> (summary key drawn as a dashed reference line, its legend label)
REFERENCE = {
    "expert_imbalance": ("imbalance_target", "target {v:g}x (the tables' 'to target')"),
    "step_time_s": ("balanced_step_time_s", "every expert equally loaded ({v:.3f} s)"),
}


def has_series(records: Sequence[dict[str, Any]]) -> bool:
    return any((r.get("result") or {}).get("dynamics") for r in records)


def plot_series(
    records: Sequence[dict[str, Any]],
    labels: dict[int, str],
    out_dir: str | Path,
    *,
    title: str = "",
) -> list[Path]:
    """``<series>_vs_step.png`` per series: mean over seeds per variant, min..max band.

    The title names the scenario and hardware of the runs; the expert-imbalance
    plot marks the imbalance target, the step-time plot the perfectly balanced step.
    """
    by_variant: dict[int, list[dict[str, list[float]]]] = {}
    summaries = []
    for r in records:
        dyn = (r.get("result") or {}).get("dynamics")
        if dyn:
            by_variant.setdefault(int(r["index"]), []).append(dyn["series"])
            summaries.append(dyn["summary"])
    n_seeds = max(len(v) for v in by_variant.values())
    sub = _subtitle(records, n_seeds)
    paths = []
    for key, (ylabel, scale, _) in SERIES.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for index, runs in by_variant.items():
            y = np.array([run[key] for run in runs]) * scale
            x = np.asarray(runs[0]["step"])
            line = ax.plot(x, y.mean(0), label=labels.get(index, str(index)), lw=1.4)[0]
            if len(runs) > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2, lw=0)
        _reference(ax, key, summaries)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        head = f"{title}: {ylabel} per step" if title else f"{ylabel} per step"
        ax.set_title(f"{head}\n{sub}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, framealpha=0.9)
        fig.tight_layout()
        path = Path(out_dir) / f"{key}_vs_step.png"
        _save(fig, path)
        paths.append(path)
    return paths


def _subtitle(records: Sequence[dict[str, Any]], n_seeds: int) -> str:
    res: dict[str, Any] = next(
        (r["result"] for r in records if (r.get("result") or {}).get("dynamics")), {}
    )
    where = " on ".join(str(res[k]) for k in ("scenario", "hardware") if res.get(k))
    spread = f"line: mean over {n_seeds} seeds, band: min..max" if n_seeds > 1 else "one seed"
    return f"{where}; {spread}" if where else spread


def _reference(ax: Any, key: str, summaries: Sequence[dict[str, Any]]) -> None:
    """Dashed line at the summaries' mean of the series' reference value, if any."""
    if key not in REFERENCE:
        return
    field, label = REFERENCE[key]
    vals = [float(s[field]) for s in summaries if s.get(field) is not None]
    if vals:
        v = float(np.mean(vals))
        ax.axhline(v, color="0.35", ls="--", lw=1.0, label=label.format(v=v))


def _save(fig: Any, path: Path) -> None:
    def write(tmp: Path) -> None:
        fig.savefig(tmp, dpi=110, format="png")

    atomic_write(path, write)
    plt.close(fig)


def plot_trace(rows: Any, path: str | Path, *, title: str = "") -> Path:
    """Measured max/mean expert load per step of a ``train-router`` trace, one line per scheme.

    ``rows``: the trace as a DataFrame (``scheme``, ``seed``, ``step``, ``layer``,
    ``load``); layers averaged, the line the mean over seeds, the band min..max.
    """
    import pandas as pd

    df = pd.DataFrame(rows)
    loads = np.asarray(df["load"].tolist(), dtype=np.float64)
    df = df.assign(imbalance=loads.max(1) / np.maximum(loads.mean(1), 1e-12))
    per = df.groupby(["scheme", "seed", "step"], sort=False)["imbalance"].mean().reset_index()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for scheme, g in per.groupby("scheme", sort=False):
        wide = g.pivot(index="step", columns="seed", values="imbalance")
        x = wide.index.to_numpy()
        line = ax.plot(x, wide.mean(axis=1), label=str(scheme), lw=1.4)[0]
        if wide.shape[1] > 1:
            ax.fill_between(
                x, wide.min(axis=1), wide.max(axis=1), color=line.get_color(), alpha=0.2, lw=0
            )
    seeds = per["seed"].nunique()
    ax.set_xlabel("training step")
    ax.set_ylabel("expert load imbalance (max/mean)")
    band = f"; band: min..max over {seeds} seeds" if seeds > 1 else ""
    ax.set_title(f"{title}measured max/mean expert load per step{band}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    _save(fig, out)
    return out
