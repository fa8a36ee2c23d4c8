"""Comparison tables: one row per variant, deltas against the first, best highlighted.

Numbers are shown in units a person reads (``1.23 M tok/s``, ``12.3 ms``,
``4.5 %``, ``1.23×``) with three significant digits; with several seeds a cell
reads ``mean ± 95 % half-width`` and a delta whose intervals overlap the first
row's is marked ``≈`` (not distinguishable from noise).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from moesim.explore.metrics import METRICS, Metric, Unit, metric
from moesim.explore.stats import Estimate
from moesim.explore.summary import VariantSummary
from moesim.explore.variants import format_value, short_name

BEST_STYLE = "bold green"
_SCALES: dict[Unit, list[tuple[float, str]]] = {
    "tokens_per_s": [(1e9, "G tok/s"), (1e6, "M tok/s"), (1e3, "k tok/s"), (1.0, "tok/s")],
    "seconds": [(1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")],
    "bytes": [(1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1.0, "B")],
    "tflops": [(1.0, "TFLOP/s/GPU")],
    "GiB": [(1.0, "GiB")],
}
NO_FIT_STYLE = "bold red"


# -- numbers ------------------------------------------------------------------
def sig3(x: float) -> str:
    """Three significant digits, no exponent for ordinary magnitudes: 1.23, 12.3, 123."""
    if x == 0 or not math.isfinite(x):
        return "0" if x == 0 else str(x)
    digits = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{digits}f}"


def human(value: float, unit: Unit, half_width: float = 0.0) -> str:
    """``value`` (± ``half_width``) in readable units: ``12.3 ± 0.4 ms``."""
    if value is None or not math.isfinite(value):
        return "—"
    scale, suffix = unit_scale(value, unit)
    sep = "" if suffix in ("%", "×") else " "
    return f"{scaled(value, scale, half_width)}{sep}{suffix}"


def unit_scale(value: float, unit: Unit) -> tuple[float, str]:
    if unit == "fraction":
        return 0.01, "%"
    if unit == "ratio":
        return 1.0, "×"
    if value == 0 or not math.isfinite(value):
        return next((s, u) for s, u in _SCALES[unit] if s == 1.0)
    for scale, suffix in _SCALES[unit]:
        if abs(value) >= scale:
            return scale, suffix
    return _SCALES[unit][-1]


def delta_text(m: Metric, value: Estimate, ref: Estimate) -> Text:
    """Change against the reference row: relative %, or percentage points for fractions."""
    if not (math.isfinite(value.mean) and math.isfinite(ref.mean)):
        return Text("")
    if m.unit == "fraction":
        d = (value.mean - ref.mean) * 100
        text = f"{d:+.1f} pp"
    elif ref.mean == 0 or value.mean / ref.mean <= 0:
        return Text("")
    else:
        ratio = value.mean / ref.mean
        d = (ratio - 1) * 100
        text = f"{d:+.1f} %"
        if ratio >= 10:
            text = f"×{sig3(ratio)}"
        elif ratio <= 0.1:
            text = f"÷{sig3(1 / ratio)}"
    if abs(d) < 0.05:
        return Text("=", style="dim")
    if value.n > 1 and ref.n > 1 and value.overlaps(ref):
        return Text(f"≈{text}", style="dim")
    better = (d > 0) == m.higher_is_better
    return Text(text, style="green" if better else "red")


def best_rows(m: Metric, estimates: Sequence[Estimate | None]) -> set[int]:
    """Indices of the best value of column ``m`` (none when every row is equal)."""
    vals = [(i, e.mean) for i, e in enumerate(estimates) if e is not None and math.isfinite(e.mean)]
    if len({v for _, v in vals}) < 2:
        return set()
    target = max(v for _, v in vals) if m.higher_is_better else min(v for _, v in vals)
    return {i for i, v in vals if v == target}


# -- tables -------------------------------------------------------------------
def comparison_table(
    summaries: Sequence[VariantSummary],
    axes_keys: Sequence[str],
    *,
    title: str = "Comparison",
    metrics: Sequence[str] = tuple(METRICS),
) -> Table:
    """One row per variant: its axis values, then each metric with its delta vs row 1.

    Each metric column has one unit (in its header), chosen from its largest value.
    """
    seeds = max((len(s.runs) for s in summaries), default=1)
    caption = (
        "best per column (among variants that fit) in bold green; second line: change "
        "against the first row; red: some GPU exceeds its HBM, not ranked"
    )
    if seeds > 1:
        caption += f"; mean ± 95 % interval over {seeds} seeds, ≈ = intervals overlap"
        caption += "; fits: share of seeds at which some GPU runs out of memory"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for key in axes_keys:
        table.add_column(short_name(key), justify="left", no_wrap=True)
    table.add_column("fits", justify="left", no_wrap=True)
    cols = [metric(k) for k in metrics]
    scales = {}
    for m in cols:
        ests = [s.stats.get(m.key) for s in summaries]
        scale, suffix = unit_scale(_max_abs([e.mean for e in ests if e is not None]), m.unit)
        scales[m.key] = scale
        table.add_column(f"{m.title}\n{suffix}", justify="right", no_wrap=True)
    best = {
        m.key: best_rows(m, [s.stats.get(m.key) if s.fits else None for s in summaries])
        for m in cols
    }
    ref = summaries[0].stats if summaries else {}
    for i, s in enumerate(summaries):
        style = "" if s.fits else NO_FIT_STYLE
        cells: list[Text | str] = [
            Text(format_value(s.variant.values.get(k)), style=style) for k in axes_keys
        ]
        cells.append(fits_text(s.p_oom, len(s.runs)))
        for m in cols:
            est, r = s.stats.get(m.key), ref.get(m.key)
            cell = _cell(m, est, r, scales[m.key], i, i in best[m.key])
            if m.key == "memory_peak_GiB" and not s.fits:
                cell.stylize(NO_FIT_STYLE)
            cells.append(cell)
        table.add_row(*cells)
    return table


def fits_text(p_oom: float, seeds: int) -> Text:
    """``yes`` (green), ``NO`` (red), or with several seeds ``P(OOM) 40 %`` (red)."""
    if p_oom == 0.0:
        return Text("yes", style="green")
    if p_oom == 1.0 or seeds == 1:
        return Text("NO", style=NO_FIT_STYLE)
    return Text(f"P(OOM) {100 * p_oom:.0f} %", style=NO_FIT_STYLE)


def _cell(
    m: Metric, est: Estimate | None, ref: Estimate | None, scale: float, row: int, best: bool
) -> Text:
    if est is None or not math.isfinite(est.mean):
        return Text("—")
    text = Text(scaled(est.mean, scale, est.half_width), style=BEST_STYLE if best else "")
    if row > 0 and ref is not None:
        text.append("\n")
        text.append_text(delta_text(m, est, ref))
    return text


def scaled(value: float, scale: float, half_width: float = 0.0) -> str:
    """``value / scale`` to three significant digits, the half-width to the same decimals."""
    v = value / scale
    text = sig3(v)
    if half_width and math.isfinite(half_width):
        decimals = len(text.split(".")[1]) if "." in text else 0
        hw = f"{half_width / scale:.{decimals}f}"
        if hw.strip("0."):  # an interval that rounds to zero is not shown
            text += f" ± {hw}"
    return text


def _max_abs(values: Sequence[float]) -> float:
    finite = [abs(v) for v in values if math.isfinite(v)]
    return max(finite) if finite else 0.0


def phases_table(results: Mapping[str, Mapping[str, Any]], *, title: str) -> Table:
    """Where the time of one MoE layer goes, per profile: ``{label: SimResult.to_dict()}``."""
    table = Table(title=title, title_justify="left")
    table.add_column("phase", justify="left")
    phases: list[str] = []
    for res in results.values():
        phases += [p for p in (res.get("phases_s") or {}) if p not in phases]
    totals = {label: sum((r.get("phases_s") or {}).values()) for label, r in results.items()}
    for label in results:
        table.add_column(label, justify="right")
    for phase in phases:
        cells = [phase]
        for label, res in results.items():
            t = float((res.get("phases_s") or {}).get(phase, 0.0))
            share = t / totals[label] if totals[label] > 0 else 0.0
            cells.append(f"{human(t, 'seconds')}  {share * 100:4.1f} %" if t > 0 else "—")
        table.add_row(*cells)
    table.add_row(
        Text("total", style="bold"),
        *[Text(human(totals[label], "seconds"), style="bold") for label in results],
    )
    return table
