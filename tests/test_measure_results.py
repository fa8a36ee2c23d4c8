"""Results files round-trip rows and metadata, parquet and CSV, atomically."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from moesim.measure.results import (
    ALL_COLUMNS,
    ResultsError,
    read_results,
    results_path,
    to_frame,
    write_results,
)

ROWS = [
    {
        "suite": "experts",
        "op": "experts",
        "strategy": "grouped",
        "T": 64,
        "D": 32,
        "F": 48,
        "E": 4,
        "K": 2,
        "skew": 1.2,
        "dtype": "fp32",
        "device": "cpu",
        "median_s": 1e-4,
        "p20_s": 9e-5,
        "p80_s": 1.1e-4,
        "n_samples": 3,
        "samples_s": [9e-5, 1e-4, 1.1e-4],
        "flops": 1e6,
        "tokens_per_expert": "[100, 28, 0, 0]",
    },
    {"suite": "roofline", "op": "copy", "status": "oom"},
]
META = {"device_name": "test cpu", "threads": 1, "complete": False, "suites": ["experts"]}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_round_trip_with_metadata(tmp_path: Path, suffix: str) -> None:
    path = write_results(to_frame(ROWS), tmp_path / f"r{suffix}", META)
    df, meta = read_results(path)
    assert meta == META
    assert list(df.columns) == list(ALL_COLUMNS)
    assert df.loc[0, "samples_s"] == [9e-5, 1e-4, 1.1e-4]
    assert df.loc[1, "samples_s"] == []
    assert df.loc[0, "tokens_per_expert"] == "[100, 28, 0, 0]"
    assert df.loc[1, "strategy"] == "" and df.loc[1, "status"] == "oom"
    assert df.loc[0, "T"] == 64 and df.loc[1, "world"] == 1
    assert df.loc[0, "skew"] == pytest.approx(1.2)
    assert math.isnan(df.loc[1, "median_s"])
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_empty_frame_round_trips(tmp_path: Path) -> None:
    path = write_results(to_frame([]), tmp_path / "e.parquet", {"complete": False})
    df, meta = read_results(path)
    assert len(df) == 0 and meta == {"complete": False}


def test_unknown_column_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown result columns"):
        to_frame([{"suite": "x", "typo": 1}])


def test_results_path_layout() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert results_path("results", "cpu", when) == Path("results/cpu/20260102T030405Z.parquet")


def test_unreadable_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="no such results file"):
        read_results(tmp_path / "missing.parquet")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ResultsError, match="not a readable results file"):
        read_results(bad)
    other = tmp_path / "other.csv"
    pd.DataFrame({"a": [1]}).to_csv(other, index=False)
    with pytest.raises(ResultsError, match="missing columns"):
        read_results(other)


def test_results_path_never_overwrites(tmp_path: Path) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    first = results_path(tmp_path, "cpu", when)
    write_results(to_frame([]), first, {})
    second = results_path(tmp_path, "cpu", when)
    assert second.name == "20260102T030405Z-1.parquet"


def test_files_are_readable_by_others(tmp_path: Path) -> None:
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = write_results(to_frame(ROWS), tmp_path / "r.csv", META)
    finally:
        os.umask(umask)
    for p in (path, tmp_path / "r.csv.meta.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
