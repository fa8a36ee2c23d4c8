"""Run a sweep file end to end (minus plots and printing, which the command does).

Output directory layout::

    OUT/parts/<key>.json   one finished (variant, seed), written as it finishes
    OUT/runs.parquet       tidy: one row per (variant, seed), axis columns + metrics
    OUT/runs.csv           the same rows as CSV
    OUT/summary.csv        one row per variant: mean and 95 % half-width per metric
    OUT/sweep.json         the sweep file as run, skipped variants, provenance

A killed sweep restarted with the same ``OUT`` re-runs only the missing parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.config.loader import load_scenario
from moesim.explore.runner import Plan, Progress, Record, plan, run_tasks
from moesim.explore.spec import SweepSpec, load_sweep, sweep_variants
from moesim.explore.summary import VariantSummary, axis_columns, runs_frame, summarize
from moesim.explore.summary import summary_frame as make_summary_frame
from moesim.io import atomic_write, atomic_write_json, atomic_write_text, provenance

META_KEY = b"moesim"


@dataclass
class SweepOutcome:
    spec: SweepSpec
    out_dir: Path
    axes_keys: list[str]
    plan: Plan
    records: list[Record]
    summaries: list[VariantSummary]
    runs: pd.DataFrame
    summary: pd.DataFrame

    @property
    def axis_cols(self) -> list[str]:
        return list(axis_columns(self.axes_keys).values())


def default_out_dir(sweep_path: str | Path, spec: SweepSpec) -> Path:
    name = spec.name or Path(sweep_path).stem
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "sweep"
    return Path("results") / "sweeps" / safe


def prepare_sweep(
    sweep_path: str | Path, *, seeds: int | None = None
) -> tuple[SweepSpec, list[str], Plan]:
    """Load and validate the sweep file and every variant (fails before running anything)."""
    spec, scenario_path = load_sweep(sweep_path)
    if seeds is not None:
        spec = spec.model_copy(update={"seeds": seeds})
    variants, keys = sweep_variants(spec, str(sweep_path))
    base = load_scenario(scenario_path, spec.set).model_dump(mode="json")
    p = plan(
        base, variants, seeds=spec.seeds, file=str(scenario_path), skip_invalid=spec.skip_invalid
    )
    return spec, keys, p


def run_sweep(
    sweep_path: str | Path,
    *,
    out_dir: str | Path | None = None,
    jobs: int = 1,
    ray_address: str | None = None,
    seeds: int | None = None,
    progress: Progress | None = None,
    prepared: tuple[SweepSpec, list[str], Plan] | None = None,
) -> SweepOutcome:
    """Run (or resume) the sweep and write its tables; returns everything for reporting."""
    spec, keys, p = prepared or prepare_sweep(sweep_path, seeds=seeds)
    out = Path(out_dir) if out_dir else default_out_dir(sweep_path, spec)
    records = run_tasks(
        p.tasks, jobs=jobs, ray_address=ray_address, parts_dir=out / "parts", progress=progress
    )
    summaries = summarize(p.variants, records)
    runs = runs_frame(records, keys)
    summary = make_summary_frame(summaries, keys)
    meta = {
        "sweep": spec.model_dump(mode="json"),
        "sweep_file": str(sweep_path),
        "variants": len(p.variants),
        "tasks": len(p.tasks),
        "skipped": [{"variant": v.values, "reason": why} for v, why in p.skipped],
        "provenance": provenance(),
    }
    write_tables(out, runs, summary, meta)
    return SweepOutcome(spec, out, keys, p, records, summaries, runs, summary)


def write_tables(out: Path, runs: pd.DataFrame, summary: pd.DataFrame, meta: dict) -> None:
    """``runs.parquet`` (metadata under key ``moesim``), ``runs.csv``, ``summary.csv``."""
    table = pa.Table.from_pandas(runs, preserve_index=False)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta[META_KEY] = json.dumps(meta, default=str).encode()
    table = table.replace_schema_metadata(schema_meta)
    atomic_write(out / "runs.parquet", lambda p: pq.write_table(table, p))
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    atomic_write_json(out / "sweep.json", meta)
