"""Rich tables for ``moesim bench``: a summary per suite/op/strategy, plus the ceilings."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from rich.markup import escape
from rich.table import Table

from moesim.report.tables import Footnotes

GROUP = ["suite", "op", "strategy", "split", "dtype"]


def summary_table(
    df: pd.DataFrame,
    meta: dict[str, Any],
    *,
    title: str | None = None,
    notes: Footnotes | None = None,
) -> Table:
    """One line per (suite, op, strategy, split, dtype): cases, median range, best rate,
    % of the measured ceiling; a dtype column when several, a "not ok" column when any.

    A "not ok" cell counts the failed cases; the statuses themselves go to ``notes``
    (numbered, printed below the table), so no cell is wrapped or cut."""
    notes = notes if notes is not None else Footnotes()
    many_dtypes = df["dtype"].nunique() > 1
    any_bad = bool((df["status"] != "ok").any())
    table = Table(title=title or _title(meta), title_justify="left")
    columns = [
        ("case", "left"),
        ("dtype", "left"),
        ("n", "right"),
        ("median", "right"),
        ("best rate", "right"),
        ("% ceil", "right"),
        ("not ok", "left"),
    ]
    shown = [
        i
        for i, (col, _) in enumerate(columns)
        if (col != "dtype" or many_dtypes) and (col != "not ok" or any_bad)
    ]
    for i in shown:
        col, just = columns[i]
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for _, group in df.groupby(GROUP, sort=False):
        cells = _group_cells(group, notes)
        table.add_row(*[cells[i] for i in shown])
    return table


def _title(meta: dict[str, Any]) -> str:
    state = "complete" if meta.get("complete") else "INCOMPLETE"
    dtypes = ",".join(meta.get("dtypes") or [])
    return (
        f"moesim bench: {meta.get('device_name', '?')} ({meta.get('device', '?')}), "
        f"{dtypes} {meta.get('threads', '?')} threads, {state}"
    )


def case_name(row: Any) -> str:
    """``dispatch permute sort``, ``experts bmm``, ``alltoall gloo uneven``."""
    parts = [row["suite"]] + [row[c] for c in ("op", "strategy", "split") if row[c]]
    return " ".join(p for i, p in enumerate(parts) if i == 0 or p != row["suite"])


def _group_cells(group: pd.DataFrame, notes: Footnotes) -> list[str]:
    first = group.iloc[0]
    ok = group[group["status"] == "ok"]
    bad = group[group["status"] != "ok"]["status"].value_counts()
    return [
        case_name(first),
        first["dtype"],
        str(len(group)),
        _range(ok["median_s"]) if len(ok) else "",
        best_rate(ok) if len(ok) else "",
        _pct(ok["pct_of_ceiling"]),
        ", ".join(f"{n} {escape(notes.ref(str(s)))}" for s, n in bad.items()),
    ]


def _range(seconds: pd.Series) -> str:
    lo, hi = float(seconds.min()), float(seconds.max())
    return seconds_text(lo) if lo == hi else f"{seconds_text(lo)}–{seconds_text(hi)}"


def best_rate(ok: pd.DataFrame) -> str:
    """The best achieved rate of a group: busbw for all-to-all, FLOP/s for GEMMs, else GB/s."""
    first = ok.iloc[0]
    if first["suite"] == "alltoall":
        return f"bus {ok['busbw_GBps'].max():.3g} GB/s"
    if first["ceiling"] == "gemm":
        return flops_text(float(ok["achieved_TFLOPs"].max()))
    return f"{ok['achieved_GBps'].max():.3g} GB/s"


def flops_text(tflops: float) -> str:
    return f"{tflops * 1e3:.3g} GFLOP/s" if tflops < 1 else f"{tflops:.3g} TFLOP/s"


def _pct(values: pd.Series) -> str:
    values = values.dropna()
    if not len(values):
        return ""
    lo, hi = float(values.min()), float(values.max())
    return _pct_num(hi) if lo == hi else f"{_pct_num(lo)}–{_pct_num(hi)}"


def _pct_num(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def seconds_text(seconds: float) -> str:
    """``412µs``, ``3.1ms``, ``1.2s``."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds:.3g}s"


def ceilings_text(meta: dict[str, Any]) -> str:
    """One line: the copy bandwidth and GEMM throughput measured in this run."""
    ceilings = meta.get("ceilings") or {}
    parts = []
    if ceilings.get("copy_GBps"):
        parts.append(f"copy {ceilings['copy_GBps']:.3g} GB/s")
    for dtype, tflops in (ceilings.get("gemm_TFLOPs") or {}).items():
        parts.append(f"{dtype} GEMM {flops_text(tflops)}")
    return "measured ceilings: " + (", ".join(parts) if parts else "none")


def targets_text(meta: dict[str, Any]) -> str:
    """One line of the headline figures (see :mod:`moesim.measure.targets`), or ""."""
    t = meta.get("targets") or {}
    parts = []
    for op in ("permute", "unpermute"):
        if op in t:
            parts.append(
                f"{op} {t[op]['pct_of_copy']:.0f}% of copy ({t[op]['strategy']}, T={t[op]['T']})"
            )
    if "grouped_vs_dense" in t:
        g = t["grouped_vs_dense"]
        parts.append(
            f"{g['strategy']} experts {g['pct_of_dense']:.0f}% of dense GEMM "
            f"(T={g['T']}, E={g['E']})"
        )
    if "gating" in t:
        parts.append(
            f"softmax_topk gating {t['gating']['x_of_roofline']:.1f}x its memory "
            f"roofline (T={t['gating']['T']})"
        )
    return "targets: " + "; ".join(parts) if parts else ""
