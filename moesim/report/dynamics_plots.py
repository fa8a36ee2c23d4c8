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


def has_series(records: Sequence[dict[str, Any]]) -> bool:
    return any((r.get("result") or {}).get("dynamics") for r in records)


def plot_series(
    records: Sequence[dict[str, Any]],
    labels: dict[int, str],
    out_dir: str | Path,
    *,
    title: str = "",
) -> list[Path]:
    """``<series>_vs_step.png`` per series: mean over seeds per variant, min..max band."""
    by_variant: dict[int, list[dict[str, list[float]]]] = {}
    for r in records:
        dyn = (r.get("result") or {}).get("dynamics")
        if dyn:
            by_variant.setdefault(int(r["index"]), []).append(dyn["series"])
    paths = []
    for key, (ylabel, scale, _) in SERIES.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for index, runs in by_variant.items():
            y = np.array([run[key] for run in runs]) * scale
            x = np.asarray(runs[0]["step"])
            line = ax.plot(x, y.mean(0), label=labels.get(index, str(index)), lw=1.4)[0]
            if len(runs) > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2, lw=0)
        n_seeds = max(len(v) for v in by_variant.values())
        band = f"; band: min..max over {n_seeds} seeds" if n_seeds > 1 else ""
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(
            f"{title}: {ylabel} per step{band}" if title else f"{ylabel} per step{band}",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"{key}_vs_step.png"
        _save(fig, path)
        paths.append(path)
    return paths


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
