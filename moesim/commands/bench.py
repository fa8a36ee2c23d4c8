"""`moesim bench`: time real gating, dispatch, expert and all-to-all kernels on this device.

Bad arguments raise :class:`moesim.errors.UserError` from ``run_bench`` or the grid
loader (exit 2, one line); Ctrl-C or SIGTERM keeps the rows measured so far (exit 130).
Under ``torchrun`` every rank measures, rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from types import FrameType

from moesim.measure.grids import SUITES, load_grid_file
from moesim.measure.results import read_results
from moesim.report.bench_tables import ceilings_text, summary_table, targets_text
from moesim.report.progress import progress_bar
from moesim.report.tables import Footnotes, err_console, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--suite",
        default=",".join(SUITES),
        help=f"comma-separated suites (default all): {','.join(SUITES)}; "
        "roofline always runs (it gives every row its ceiling)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--dtype",
        default=None,
        help="comma-separated dtypes: fp32, bf16, fp16 (default fp32 on cpu, bf16 on cuda)",
    )
    parser.add_argument("--quick", action="store_true", help="small grid for CI and first runs")
    parser.add_argument("--out", default="results", help="output folder (default results/)")
    parser.add_argument("--csv", action="store_true", help="also write a CSV copy of the results")
    parser.add_argument(
        "--world",
        type=int,
        default=None,
        help="ranks for the all-to-all suite (default 2 on cpu, GPUs on cuda)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default 1 on cpu: stable timings on a shared "
        "machine; raise it to measure all cores)",
    )
    parser.add_argument(
        "--grid",
        default=None,
        metavar="FILE.yaml",
        help="YAML overriding grid axes per suite, e.g. experts: {T: [4096]}",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="timing budget per case (default 0.05 quick, 0.25 full)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and loads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from moesim.measure.bench import BenchInterrupted, run_bench  # torch: only when running

    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    grids = load_grid_file(args.grid) if args.grid else None
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    start = time.perf_counter()
    try:
        path = run_bench(
            suites,
            device=args.device,
            dtype=dtype,
            quick=args.quick,
            out_dir=args.out,
            progress=lambda total, desc: progress_bar(total, desc, enabled=not args.no_progress),
            grids=grids,
            world=args.world,
            threads=args.threads,
            budget_s=args.budget,
            seed=args.seed,
            csv=args.csv,
        )
    except BenchInterrupted as stop:
        _summary(stop.path, time.perf_counter() - start, args.csv)
        err_console.print(
            f"moesim bench: interrupted; kept {stop.rows} rows in {stop.path} (complete: false)"
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    _summary(path, time.perf_counter() - start, args.csv)
    return 0


def _summary(path: Path, wall_s: float, csv: bool) -> None:
    from moesim.measure.bench import is_writer

    if not is_writer():  # torchrun ranks other than 0 write and show nothing
        return
    df, meta = read_results(path)
    notes = Footnotes()
    render(summary_table(df, meta, notes=notes))
    notes.render()
    failed = int((df["status"] != "ok").sum())
    err_console.print(ceilings_text(meta))
    if targets_text(meta):
        err_console.print(targets_text(meta))
    where = f"{path}" + (f" and {path.with_suffix('.csv')}" if csv else "")
    note = f", {failed} not ok" if failed else ""
    err_console.print(f"{len(df)} rows{note} in {wall_s:.1f} s wall → {where}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
