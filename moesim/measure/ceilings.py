"""The device's ceilings measured in a run, and every row's percent of its ceiling.

* copy: the largest roofline copy (smaller ones may run from the last-level
  cache: useful points for calibration curves, not a memory ceiling);
* GEMM, per dtype: the best of that dtype's roofline GEMMs.

A ceiling is a *peak*, so it is taken at each roofline row's 20th-percentile
time (bytes or FLOPs / ``p20_s``): on a shared machine the median of a long
GEMM can catch a neighbour's burst, the fast fifth rarely does. Kernel rows
are compared at their median: ``pct_of_ceiling = 100 · achieved / ceiling``.
"""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]


def apply_ceilings(rows: list[Row]) -> dict[str, Any]:
    """Set ``pct_of_ceiling`` on every ok row with a ``ceiling``; return the ceilings
    as ``{"copy_GBps": float | None, "gemm_TFLOPs": {dtype: float}}``."""
    copy = copy_ceiling(rows)
    gemm = gemm_ceilings(rows)
    for row in rows:
        if row.get("status") != "ok":
            continue
        if row.get("ceiling") == "copy" and copy:
            row["pct_of_ceiling"] = 100.0 * row["achieved_GBps"] / copy
        elif row.get("ceiling") == "gemm" and gemm.get(row["dtype"]):
            row["pct_of_ceiling"] = 100.0 * row["achieved_TFLOPs"] / gemm[row["dtype"]]
    return {"copy_GBps": copy, "gemm_TFLOPs": gemm}


def copy_ceiling(rows: list[Row]) -> float | None:
    """GB/s of the largest roofline copy at its p20 time, or None without one."""
    copies = _roofline(rows, "copy")
    if not copies:
        return None
    largest = max(r["bytes"] for r in copies)
    return max(r["bytes"] / r["p20_s"] / 1e9 for r in copies if r["bytes"] == largest)


def gemm_ceilings(rows: list[Row]) -> dict[str, float]:
    """TFLOP/s per dtype: the best roofline GEMM at its p20 time."""
    out: dict[str, float] = {}
    for r in _roofline(rows, "gemm"):
        peak = r["flops"] / r["p20_s"] / 1e12
        out[r["dtype"]] = max(out.get(r["dtype"], 0.0), peak)
    return out


def _roofline(rows: list[Row], op: str) -> list[Row]:
    return [
        r
        for r in rows
        if r.get("suite") == "roofline"
        and r.get("op") == op
        and r.get("status") == "ok"
        and r.get("p20_s", 0) > 0
    ]
