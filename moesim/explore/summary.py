"""From task records to a comparison: tidy per-run frame and per-variant estimates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from moesim.explore.metrics import flatten, is_number
from moesim.explore.runner import Record
from moesim.explore.stats import Estimate, t_interval
from moesim.explore.variants import Variant, short_name


@dataclass(frozen=True)
class VariantSummary:
    """One comparison row: the variant, its runs (one per seed) and estimates per metric."""

    variant: Variant
    runs: list[Record]
    stats: dict[str, Estimate]

    @property
    def p_oom(self) -> float:
        """Share of the seeds at which some GPU exceeds its HBM (0 when memory is unknown)."""
        flags = [not r["result"].get("fits", True) for r in self.runs]
        return sum(flags) / len(flags) if flags else 0.0

    @property
    def fits(self) -> bool:
        """Every seed fits in HBM: a variant that runs out at some seed is not feasible."""
        return self.p_oom == 0.0

    @property
    def result(self) -> dict[str, Any]:
        """The run at the scenario's own seed (what ``moesim simulate`` prints)."""
        return dict(self.runs[0]["result"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "variant": dict(self.variant.values),
            "label": self.variant.label(),
            "result": self.result,
            "fits": self.fits,
            "p_oom": self.p_oom,
        }
        if len(self.runs) > 1:
            out["seeds"] = [r["seed"] for r in self.runs]
            out["runs"] = [r["result"] for r in self.runs]
            out["stats"] = {k: e.to_dict() for k, e in self.stats.items()}
        return out


def summarize(variants: Sequence[Variant], records: Sequence[Record]) -> list[VariantSummary]:
    """Group records by variant (in variant order) and estimate every numeric metric."""
    by_index: dict[int, list[Record]] = {}
    for rec in records:
        by_index.setdefault(int(rec["index"]), []).append(rec)
    out = []
    for v in variants:
        runs = sorted(by_index.get(v.index, []), key=lambda r: int(r["seed"]))
        if not runs:
            continue
        flat = [flatten(r["result"]) for r in runs]
        keys = [k for k in flat[0] if k != "seed"]
        stats = {k: t_interval([f[k] for f in flat if is_number(f.get(k))]) for k in keys}
        out.append(VariantSummary(v, runs, stats))
    return out


def feasible(
    summaries: Sequence[VariantSummary],
) -> tuple[list[VariantSummary], list[VariantSummary]]:
    """``(fitting, not fitting)`` variants, each in the given order."""
    return [s for s in summaries if s.fits], [s for s in summaries if not s.fits]


def axis_columns(axes_keys: Sequence[str]) -> dict[str, str]:
    """Canonical key -> column name in frames: the short name unless that is taken."""
    return {k: k if short_name(k) in _RESERVED else short_name(k) for k in axes_keys}


_RESERVED = {"variant", "label", "scenario", "seed", "key", "n_seeds", "result"}


def runs_frame(records: Sequence[Record], axes_keys: Sequence[str]) -> pd.DataFrame:
    """Tidy table: one row per (variant, seed), axis columns, then every numeric result."""
    cols = axis_columns(axes_keys)
    rows = []
    for rec in records:
        res = rec["result"]
        row: dict[str, Any] = {"variant": int(rec["index"])}
        row.update({cols[k]: rec["variant"].get(k) for k in axes_keys})
        row["scenario"] = res.get("scenario")
        row.setdefault("hardware", res.get("hardware"))
        row["seed"] = int(rec["seed"])
        row.update({k: v for k, v in flatten(res).items() if k != "seed"})
        row["key"] = rec["key"]
        rows.append(row)
    return _arrow_safe(pd.DataFrame(rows))


def summary_frame(summaries: Sequence[VariantSummary], axes_keys: Sequence[str]) -> pd.DataFrame:
    """One row per variant: axis columns, ``<metric>`` means and ``<metric>_ci95`` half-widths."""
    cols = axis_columns(axes_keys)
    rows = []
    for s in summaries:
        row: dict[str, Any] = {"variant": s.variant.index, "label": s.variant.label()}
        row.update({cols[k]: s.variant.values.get(k) for k in axes_keys})
        row.setdefault("hardware", s.result.get("hardware"))
        row["n_seeds"] = len(s.runs)
        row["fits"] = s.fits
        row["p_oom"] = s.p_oom
        for k, e in s.stats.items():
            row[k] = e.mean
            row[f"{k}_ci95"] = e.half_width
        rows.append(row)
    return _arrow_safe(pd.DataFrame(rows))


def _arrow_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing types (``1.0`` and ``'x'``) become strings for parquet."""
    for col in df.columns:
        if df[col].dtype != object:
            continue
        kinds = {type(v) for v in df[col] if v is not None}
        numeric = kinds <= {int, float}
        if kinds and not numeric and len(kinds) > 1:
            df[col] = df[col].map(lambda v: None if v is None else str(v))
        elif kinds and numeric and float in kinds:
            df[col] = df[col].astype(float)
    return df
