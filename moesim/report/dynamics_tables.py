"""Rich tables for ``moesim simulate --steps N``: placement, run summary and a thinned series."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from moesim.report.sim_tables import _bytes, _time
from moesim.report.tables import render

#: rows of the series table (evenly spaced steps, first and last included)
SERIES_ROWS = 12


def placement_line(r: Any) -> str:
    p = r.details.get("placement") or {}
    if not p:
        return ""
    extra = f", {p['redundant_experts']} redundant" if p.get("redundant_experts") else ""
    tier = ", hierarchical" if p.get("hierarchical") else ""
    return (
        f"placement {p['kind']}{extra}{tier}: {p['experts_per_gpu']} experts/GPU, "
        f"{_bytes(p['expert_weight_bytes_per_gpu'])} routed-expert weights/GPU, "
        f"up to {p['max_copies']} cop{'y' if p['max_copies'] == 1 else 'ies'} of an expert"
    )


def summary_table(r: Any) -> Table:
    s = r.dynamics["summary"]
    table = Table(title=f"Over {s['steps']} steps (dynamics)", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    reach = s["steps_to_target"]
    rows = [
        ("mean step time", _time(s["mean_step_time_s"])),
        ("total time", _time(s["total_time_s"])),
        ("perfectly balanced step", _time(s["balanced_step_time_s"])),
        (
            "extra time vs perfectly balanced",
            f"{_time(s['extra_time_vs_balanced_s'])} "
            f"(+{100 * s['extra_fraction_vs_balanced']:.1f} %)",
        ),
        ("mean dropped assignments", f"{100 * s['mean_drop_fraction']:.2f} %"),
        (
            "mean / last expert imbalance",
            f"{s['mean_expert_imbalance']:.2f}x / {s['final_expert_imbalance']:.2f}x",
        ),
        ("mean GPU imbalance", f"{s['mean_gpu_imbalance']:.2f}x"),
        (
            f"steps to imbalance <= {s['imbalance_target']:.2f}x (10-step mean)",
            "never" if reach is None else f"{reach} ({_time(s['time_to_target_s'])})",
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def series_table(r: Any) -> Table:
    ser = r.dynamics["series"]
    n = len(ser["step"])
    idx = (
        sorted({round(i * (n - 1) / (SERIES_ROWS - 1)) for i in range(SERIES_ROWS)})
        if n > 1
        else [0]
    )
    table = Table(title="Per step (evenly spaced rows; all steps in --json)", title_justify="left")
    for col in ("step", "step time", "dropped", "expert imb.", "GPU imb.", "dispatch/GPU"):
        table.add_column(col, justify="right")
    for i in idx:
        table.add_row(
            f"{int(ser['step'][i])}",
            _time(ser["step_time_s"][i]),
            f"{100 * ser['drop_fraction'][i]:.2f} %",
            f"{ser['expert_imbalance'][i]:.2f}x",
            f"{ser['gpu_imbalance'][i]:.2f}x",
            _bytes(ser["dispatch_bytes_per_gpu"][i]),
        )
    return table


def render_dynamics(r: Any) -> None:
    from moesim.report.tables import console

    line = placement_line(r)
    if line:
        console.print(line)
    if r.dynamics is None:
        return
    render(summary_table(r))
    render(series_table(r))


def print_dynamics_validation(report: dict[str, Any]) -> None:
    """``moesim validate --dynamics``: per run, fitted parameters, predicted vs measured."""
    from moesim.report.tables import console, render

    tol = report["tolerance"]
    table = Table(
        title=f"Load dynamics: fit on the first {100 * report['fit_fraction']:.0f} % of each "
        "measured run, predict the rest from the fitted process alone",
        title_justify="left",
        caption=f"ok: |drop error| <= {tol['drop_pp']} pp and |max/mean error| <= "
        f"{100 * tol['max_mean']:.0f} % (means over the predicted steps); [95 %]: the predicted "
        "paths' spread of that mean; step MAE / MAPE: per-step errors; rho, drift: medians "
        "over experts; sharpen: growth of the level's spread per 100 steps at the fit's "
        "learning rate; drop fit end: "
        f"measured over the last {report['level_steps']} fitted steps",
        caption_justify="left",
    )
    cols = ("run", "cf", "fit/pred.", "rho, drift", "sharpen", "rule rate", "drop fit end",
            "drop meas. → pred. [95 %]",
            "err", "step MAE", "max/mean meas. → pred. [95 %]", "err", "step MAPE",
            "ok")  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c == "run" else "right")
    for r in report["runs"]:
        lo, hi = r["predicted_drop_pct_band95"]
        ilo, ihi = r["predicted_max_mean_band95"]
        table.add_row(
            r["run"],
            f"{r['capacity_factor']:g}",
            f"{r['fit_steps']}/{r['predicted_steps']}",
            f"{r['persistence']:.2f}, {r['drift']:.3f}",
            f"{1e4 * r['sharpening']:+.0f} %",
            "—" if r["balancing"] == "none" else f"{r['balancing']} {r['rate']:.4f}",
            f"{r['measured_drop_pct_fit_end']:.2f} %",
            f"{r['measured_drop_pct']:.2f} → {r['predicted_drop_pct']:.2f} % [{lo:.1f}, {hi:.1f}]",
            f"{r['drop_error_pp']:+.2f} pp",
            f"{r['drop_step_mae_pp']:.2f} pp",
            f"{r['measured_max_mean']:.3f} → {r['predicted_max_mean']:.3f} [{ilo:.2f}, {ihi:.2f}]",
            f"{100 * r['max_mean_error']:+.1f} %",
            f"{100 * r['max_mean_step_mape']:.1f} %",
            "[green]yes[/]" if r["ok"] else "[red]no[/]",
        )
    render(table)
    reach: list[str] = []
    for cf in report["capacity_factors"]:
        rows = [r for r in report["runs"] if r["capacity_factor"] == cf]
        by: dict[str, list[bool]] = {}
        for r in rows:
            by.setdefault(r["scheme"], []).append(r["ok"])
        parts = ", ".join(f"{k} {sum(v)}/{len(v)}" for k, v in by.items())
        band = sum(r["drop_in_band"] for r in rows)
        expected = sum(r["expected_ok"] for r in rows)
        moved = sum(
            abs(r["measured_drop_pct"] - r["measured_drop_pct_fit_end"]) > tol["drop_pp"]
            for r in rows
        )
        console.print(
            f"cf {cf:g}: within tolerance {sum(r['ok'] for r in rows)}/{len(rows)} ({parts}); "
            f"measured drop inside the predicted 95 % band {band}/{len(rows)}; the measured "
            f"drop itself moved by more than {tol['drop_pp']} pp from the fit's last "
            f"{report['level_steps']} steps to the rest in {moved}/{len(rows)}"
        )
        reach.append(f"cf {cf:g} {expected:.1f}/{len(rows)}")
    console.print(
        "expected within tolerance were each run a path of its fitted process "
        f"(the target's reach on these runs): {', '.join(reach)}"
    )
    console.print(
        f"trace {report['trace']} ({report.get('schedule', 'unknown')}); AR(1) innovations: "
        f"{report.get('innovations', 'gaussian')}"
    )
