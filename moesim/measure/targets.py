"""The issue's headline figures, computed from one run's rows (pure pandas, no torch).

- ``permute`` / ``unpermute``: best strategy's % of the copy ceiling at the
  largest balanced T (target on an H100: >= 50 %);
- ``grouped_vs_dense``: balanced grouped expert FFN throughput as % of a dense
  GEMM of the same FLOPs (the ``dense`` strategy), at the largest T; the worst
  over E (target: >= 80 %);
- ``gating``: softmax-top-k time as a multiple of its memory roofline
  (bytes / copy ceiling) at the largest T (target: <= 5x).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

GROUPED = ("grouped_mm", "bmm", "loop")  # the first one measured is "the grouped path"


def target_figures(df: pd.DataFrame) -> dict[str, Any]:
    """Whichever of the figures this run's rows allow; empty dict when none."""
    ok = df[df["status"] == "ok"]
    out: dict[str, Any] = {}
    for op in ("permute", "unpermute"):
        fig = _dispatch(ok, op)
        if fig:
            out[op] = fig
    for name, fig in (("grouped_vs_dense", _grouped_vs_dense(ok)), ("gating", _gating(ok))):
        if fig:
            out[name] = fig
    return out


def _largest_t(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["T"] == rows["T"].max()] if len(rows) else rows


def _dispatch(ok: pd.DataFrame, op: str) -> dict[str, Any] | None:
    rows = _largest_t(ok[(ok["suite"] == "dispatch") & (ok["op"] == op) & (ok["skew"] == 0)])
    rows = rows.dropna(subset=["pct_of_ceiling"])
    if rows.empty:
        return None
    best = rows.sort_values("pct_of_ceiling").iloc[-1]
    return {
        "pct_of_copy": float(best["pct_of_ceiling"]),
        "strategy": best["strategy"],
        "T": int(best["T"]),
        "E": int(best["E"]),
    }


def _grouped_vs_dense(ok: pd.DataFrame) -> dict[str, Any] | None:
    experts = ok[(ok["suite"] == "experts") & (ok["skew"] == 0)]
    dense = experts[experts["strategy"] == "dense"]
    for strategy in GROUPED:
        grouped = _largest_t(experts[experts["strategy"] == strategy])
        if grouped.empty:
            continue
        pairs = grouped.merge(dense, on=["T", "D", "F", "K", "dtype"], suffixes=("", "_dense"))
        if pairs.empty:
            return None
        pct = 100.0 * pairs["achieved_TFLOPs"] / pairs["achieved_TFLOPs_dense"]
        worst = pairs.assign(pct=pct).sort_values("pct").iloc[0]
        return {
            "pct_of_dense": float(worst["pct"]),
            "strategy": strategy,
            "T": int(worst["T"]),
            "E": int(worst["E"]),
        }
    return None


def _gating(ok: pd.DataFrame) -> dict[str, Any] | None:
    rows = _largest_t(ok[(ok["suite"] == "gating") & (ok["op"] == "softmax_topk")])
    rows = rows.dropna(subset=["pct_of_ceiling"])
    if rows.empty:
        return None
    best = rows.sort_values("pct_of_ceiling").iloc[-1]
    return {
        "x_of_roofline": 100.0 / float(best["pct_of_ceiling"]),
        "T": int(best["T"]),
        "D": int(best["D"]),
        "E": int(best["E"]),
    }
