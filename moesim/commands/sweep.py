"""`moesim sweep`: a declared grid of variants, run in parallel, tables and plots.

    moesim sweep scenarios/sweeps/mixtral-topk-capacity.yaml --jobs 2 [--out DIR] [--ray ADDRESS]

Writes ``runs.parquet``/``runs.csv`` (one row per variant and seed),
``summary.csv`` and ``plots/<metric>_vs_<axis>.png`` under ``--out``
(default ``results/sweeps/<name>``). Restarted with the same ``--out``, a
killed sweep only runs the variants that had not finished.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from moesim.explore.metrics import METRICS
from moesim.explore.runner import auto_jobs

if TYPE_CHECKING:
    from moesim.explore.summary import VariantSummary
    from moesim.explore.sweep import SweepOutcome

MAX_TABLE_ROWS = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file (see scenarios/sweeps)")
    parser.add_argument(
        "--out", metavar="DIR", help="output directory (default results/sweeps/NAME)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        metavar="N",
        help="local processes (default 0 = all cores when there are 16+ runs)",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on an existing Ray cluster (e.g. auto or ray://host:10001); needs moesim[ray]",
    )
    parser.add_argument("--seeds", type=int, metavar="N", help="override the sweep file's seeds")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    from moesim.commands.compare import add_feasible_only

    add_feasible_only(parser)


def run(args: argparse.Namespace) -> int:
    from moesim.explore.sweep import default_out_dir, prepare_sweep, run_sweep
    from moesim.report.progress import progress_bar
    from moesim.report.tables import err_console

    prepared = prepare_sweep(args.sweep, seeds=args.seeds)
    spec, _, p = prepared
    out = args.out or default_out_dir(args.sweep, spec)
    jobs = auto_jobs(len(p.tasks), args.jobs)
    where = f"Ray at {args.ray}" if args.ray else f"{jobs} local process(es)"
    err_console.print(
        f"sweep {args.sweep}: {len(p.variants)} variants x {spec.seeds} seed(s) "
        f"= {len(p.tasks)} runs on {where}; skipped {len(p.skipped)} invalid"
    )
    with progress_bar(len(p.tasks), "sweep") as advance:
        outcome = run_sweep(
            args.sweep,
            out_dir=out,
            jobs=jobs,
            ray_address=args.ray,
            progress=advance,
            prepared=prepared,
        )
    plots = [] if args.no_plots else _plots(outcome)
    _report(outcome, plots, feasible_only=args.feasible_only)
    return 0


def _plots(outcome: SweepOutcome) -> list[Path]:
    from moesim.report.plots import plot_sweep

    title = outcome.spec.name or ""
    paths = plot_sweep(
        outcome.summary,
        outcome.axis_cols,
        outcome.spec.metrics,
        outcome.out_dir / "plots",
        title=title,
    )
    from moesim.report.dynamics_plots import has_series, plot_series

    if has_series(outcome.records):
        labels = {v.index: v.label() for v in outcome.plan.variants}
        paths += plot_series(outcome.records, labels, outcome.out_dir / "plots", title=title)
    return paths


def _report(outcome: SweepOutcome, plots: list[Path], *, feasible_only: bool = False) -> None:
    from moesim.commands.compare import drop_infeasible
    from moesim.report.compare_tables import comparison_table
    from moesim.report.tables import console, render

    rows, dropped = drop_infeasible(outcome.summaries, feasible_only, quiet=False)
    title = f"{outcome.spec.name or 'sweep'}: {len(rows)} variants"
    if dropped:
        title += f" ({len(dropped)} that do not fit dropped)"
    if len(rows) > MAX_TABLE_ROWS:
        first = outcome.spec.metrics[0]
        better = METRICS[first].higher_is_better if first in METRICS else False
        ranked = sorted(rows[1:], key=lambda s: _rank(s, first, better))
        rows = [rows[0], *ranked[: MAX_TABLE_ROWS - 1]]
        title += f" (first row, then the best {len(rows) - 1} by {first}; all in summary.csv)"
    from moesim.explore.metrics import table_metrics

    metrics = table_metrics([s.result for s in rows])
    table = comparison_table(rows, outcome.axes_keys, title=title, metrics=metrics)
    render(table, key_columns=len(outcome.axes_keys))
    for variant, why in outcome.plan.skipped:
        console.print(f"[yellow]skipped[/] {variant.label()}: {why}")
    console.print(f"tables: {outcome.out_dir}/runs.parquet, runs.csv, summary.csv")
    if plots:
        console.print(f"plots:  {len(plots)} PNG in {outcome.out_dir / 'plots'}")


def _rank(summary: VariantSummary, key: str, higher_is_better: bool) -> tuple[int, float]:
    """Sort key: best first, then variants that do not fit, then those without the metric."""
    est = summary.stats.get(key)
    if est is None or not math.isfinite(est.mean):
        return (2, 0.0)
    return (0 if summary.fits else 1, -est.mean if higher_is_better else est.mean)
