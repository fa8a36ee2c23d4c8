"""Rich rendering of a calibration: per-family fit, held-out error and the targets."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from moesim.calibrate import CalibrationReport
from moesim.config.hardware import Calibration, CommFit, MemoryOpFit
from moesim.report.tables import console, render


def calibration_table(report: CalibrationReport, mape_target: float) -> Table:
    """One row per family: the fitted line, shapes, held-out MAPE and worst error."""
    cal = report.profile.calibration
    table = Table(
        title="Calibration: held-out error per op family",
        caption="fixed: latency [+ per expert]; timing ±: typical half (p80 - p20) / median",
        title_justify="left",
    )
    for col, just in [
        ("family", "left"),
        ("fixed\nus", "right"),
        ("rate over size", "right"),
        ("shapes", "right"),
        ("MAPE", "right"),
        ("max\nAPE", "right"),
        ("timing\n±", "right"),
        ("strategy", "left"),
    ]:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, err in report.families.items():
        latency, rate = _describe(cal, name) if cal else ("", "")
        table.add_row(
            name,
            latency,
            rate,
            str(int(err["n"])),
            f"[{'green' if err['mape'] <= mape_target else 'red'}]{err['mape']:.1%}[/]"
            + ("*" if err.get("flagged") else ""),
            f"{err['max_ape']:.1%}",
            f"{report.noise[name]:.0%}" if name in report.noise else "",
            _strategy(report.strategies.get(name, {})),
        )
    for line in report.fallbacks:
        table.add_row(line.split(":")[0], "", "[yellow]spec values[/]", "0", "—", "—", "", "")
    return table


def _describe(cal: Calibration, family: str) -> tuple[str, str]:
    """``(latency, rate range)`` of the fitted line, as short strings."""
    if family in ("experts", "gemm"):
        gemm = (cal.gemm if family == "experts" else cal.dense).get(cal.dtype)
        if gemm is None:
            return "", ""
        per = f"+{gemm.per_expert_us:.3g}/e" if family == "experts" else ""
        return f"{gemm.latency_us:.3g}{per}", f"{_span(gemm.tflops.y)} TFLOP/s"
    line: MemoryOpFit | CommFit | None = (
        next(iter(cal.alltoall.values()), None) if family == "alltoall" else cal.memory.get(family)
    )
    if line is None:
        return "", ""
    return f"{line.latency_us:.3g}", f"{_span(line.bandwidth_GBps.y)} GB/s"


def _span(ys: list[float]) -> str:
    lo, hi = min(ys), max(ys)
    return f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}"


def _strategy(wins: dict[str, int]) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1]))


def print_calibration(
    report: CalibrationReport, path: Path, *, mape_target: float, time_target_s: float
) -> None:
    """The table, where the profile went, and whether the targets were met."""
    render(calibration_table(report, mape_target))
    prof = report.profile
    console.print(f"wrote [bold]{path}[/] (profile {prof.name!r}, base spec values kept)")
    worst = max(report.families.items(), key=lambda kv: kv[1]["mape"])
    met = worst[1]["mape"] <= mape_target
    verdict = "[green]met[/]" if met else "[red]missed[/]"
    flagged = {k: e for k, e in report.families.items() if e.get("flagged")}
    console.print(
        f"target held-out MAPE <= {mape_target:.0%} per family: {verdict} "
        f"(worst {worst[0]} {worst[1]['mape']:.1%})" + (" on the rows fitted" if flagged else "")
    )
    if flagged:
        with_all = {k: float(e["mape_all"] or e["mape"]) for k, e in flagged.items()}
        over = [k for k, v in with_all.items() if v > mape_target]
        rows = ", ".join(
            f"{k} {with_all[k]:.1%} ({int(e['flagged'])} rows)" for k, e in flagged.items()
        )
        console.print(
            f"  * counting the rows a stated rule flagged (see the notes): {rows}; "
            + (f"[red]missed[/] ({', '.join(over)})" if over else "[green]met[/]")
        )
    fast = report.elapsed_s <= time_target_s
    console.print(
        f"target calibration time <= {time_target_s:.0f} s: "
        f"{'[green]met[/]' if fast else '[red]missed[/]'} ({report.elapsed_s:.1f} s)"
    )
    for line in report.fallbacks:
        console.print(f"[yellow]fallback[/] {line}")
    for line in report.notes:
        console.print(f"[yellow]note[/] {line}")
