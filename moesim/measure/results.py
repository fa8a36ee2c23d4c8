"""Bench results store: tidy rows in parquet (or CSV) with metadata, written atomically.

One row per measured shape; the columns are the cross-team contract (see
:data:`COLUMNS`). The metadata dict (provenance, device, threads, suites,
``complete``) lives in the parquet schema metadata under the key ``moesim``;
for CSV it lives in a sidecar ``<file>.meta.json`` written before the CSV.
Torch-free on purpose: the calibration (which must not import torch) reads these files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.errors import UserError
from moesim.io import atomic_write

META_KEY = b"moesim"

#: column -> (kind, default); kinds: str, int, float, list (list of float)
COLUMNS: dict[str, tuple[str, Any]] = {
    "suite": ("str", ""),
    "op": ("str", ""),
    "strategy": ("str", ""),
    "T": ("int", 0),
    "D": ("int", 0),
    "F": ("int", 0),
    "E": ("int", 0),
    "K": ("int", 0),
    "world": ("int", 1),
    "skew": ("float", 0.0),
    "split": ("str", ""),
    "dtype": ("str", ""),
    "device": ("str", ""),
    "device_name": ("str", ""),
    "median_s": ("float", float("nan")),
    "p20_s": ("float", float("nan")),
    "p80_s": ("float", float("nan")),
    "n_samples": ("int", 0),
    "samples_s": ("list", None),
    "flops": ("float", 0.0),
    "bytes": ("float", 0.0),
    "msg_bytes": ("float", 0.0),
    "tokens_per_expert": ("str", ""),
    "achieved_GBps": ("float", float("nan")),
    "achieved_TFLOPs": ("float", float("nan")),
    "ceiling": ("str", ""),
    "pct_of_ceiling": ("float", float("nan")),
    "algbw_GBps": ("float", float("nan")),
    "busbw_GBps": ("float", float("nan")),
    "status": ("str", "ok"),
}
#: provenance columns of imported (not locally measured) rows: empty for ``moesim bench``
#: files; files written before they existed read back with these defaults
PROVENANCE_COLUMNS: dict[str, tuple[str, Any]] = {
    "source": ("str", ""),  # e.g. "aiconfigurator_core 0.12.0"
    "source_version": ("str", ""),  # the framework version the table was collected with
    "framework": ("str", ""),  # trtllm, sglang, vllm, nccl
    "kernel": ("str", ""),  # the table's kernel_source
    "collected": ("str", ""),  # collection date
    "table": ("str", ""),  # the source table, relative to the package's data folder
}
ALL_COLUMNS: dict[str, tuple[str, Any]] = {**COLUMNS, **PROVENANCE_COLUMNS}

_ARROW = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "list": pa.list_(pa.float64()),
}


class ResultsError(UserError):
    """A results file is missing, unreadable or not a moesim bench file."""


def results_path(out_dir: str | Path, device: str, when: datetime | None = None) -> Path:
    """``<out_dir>/<device>/<UTC timestamp>.parquet``: ``results/cpu/20260101T120000Z.parquet``."""
    when = when or datetime.now(timezone.utc)
    stamp = when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(out_dir) / device / f"{stamp}.parquet"
    n = 1
    while path.exists():  # two runs started in the same second
        path = path.with_name(f"{stamp}-{n}.parquet")
        n += 1
    return path


def to_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (dicts) → a DataFrame with exactly :data:`COLUMNS`, missing values defaulted.

    Raises :class:`ValueError` for a key that is not a column (a programming error).
    """
    records = []
    for row in rows:
        unknown = set(row) - set(ALL_COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}")
        records.append({c: _coerce(c, row.get(c, ALL_COLUMNS[c][1])) for c in ALL_COLUMNS})
    return pd.DataFrame.from_records(records, columns=list(ALL_COLUMNS))


def frame_from_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Vectorised :func:`to_frame` for a DataFrame (large imports): defaults filled, types set.

    Raises :class:`ValueError` for a column that is not a result column.
    """
    unknown = set(df.columns) - set(ALL_COLUMNS)
    if unknown:
        raise ValueError(f"unknown result columns {sorted(unknown)}")
    out = pd.DataFrame(index=df.index)
    for c, (kind, default) in ALL_COLUMNS.items():
        if kind == "list":
            out[c] = [[] for _ in range(len(df))] if c not in df else df[c]
            continue
        col = df[c] if c in df else pd.Series(default, index=df.index)
        cast = {"int": "int64", "float": "float64", "str": "object"}[kind]
        out[c] = col.fillna(default).astype(cast) if kind != "str" else col.fillna("").astype(str)
    return out.reset_index(drop=True)


def _coerce(column: str, value: Any) -> Any:
    kind, default = ALL_COLUMNS[column]
    if value is None:
        value = default
    if kind == "list":
        return [float(v) for v in (value if value is not None else [])]
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return str(value)


def write_results(df: pd.DataFrame, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write ``df`` (the :data:`COLUMNS`, in that order) and ``meta`` atomically.

    ``.parquet`` paths get the metadata in the schema under ``moesim``; ``.csv``
    paths get ``samples_s`` as a JSON list string and a ``<path>.meta.json``
    sidecar. ``meta`` must be JSON-serialisable. Returns the path.
    """
    path = Path(path)
    frame = frame_from_columns(df)
    meta_json = json.dumps(dict(meta), sort_keys=True, default=str)
    if path.suffix == ".csv":
        csv = frame.assign(samples_s=[json.dumps(s) for s in frame["samples_s"]])
        _publish(_sidecar(path), lambda tmp: tmp.write_text(meta_json + "\n", encoding="utf-8"))
        return _publish(path, lambda tmp: csv.to_csv(tmp, index=False))
    table = _to_arrow(frame).replace_schema_metadata({META_KEY: meta_json.encode()})
    return _publish(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _publish(path: Path, write: Callable[[Path], object]) -> Path:
    """Atomic write with the usual ``0666 & ~umask`` permissions (temp files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)

    def write_readable(tmp: Path) -> None:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)

    return atomic_write(path, write_readable)


def _to_arrow(frame: pd.DataFrame) -> pa.Table:
    schema = pa.schema([(c, _ARROW[kind]) for c, (kind, _) in ALL_COLUMNS.items()])
    arrays = [pa.array(frame[c].tolist(), type=schema.field(c).type) for c in ALL_COLUMNS]
    return pa.Table.from_arrays(arrays, schema=schema)


def read_results(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a results file written by :func:`write_results`: ``(rows, metadata)``.

    ``samples_s`` comes back as a list of float per row. Raises
    :class:`ResultsError` (one line naming the file) if it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: no such results file")
    try:
        frame, meta = _read_csv(path) if path.suffix == ".csv" else _read_parquet(path)
    except ResultsError:
        raise
    except Exception as err:
        raise ResultsError(
            f"{path}: not a readable results file ({type(err).__name__}: {err})"
        ) from err
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ResultsError(f"{path}: not a moesim bench file; missing columns {missing}")
    for c, (_, default) in PROVENANCE_COLUMNS.items():
        if c not in frame.columns:
            frame[c] = default
    return frame, meta


def _read_parquet(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    frame = table.to_pandas()
    if "samples_s" in frame:
        frame["samples_s"] = [_float_list(s) for s in frame["samples_s"]]
    return frame, meta


def _read_csv(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    text_cols = {c: str for c, (kind, _) in ALL_COLUMNS.items() if kind == "str"}
    frame = pd.read_csv(path, dtype=text_cols, keep_default_na=False, na_values=[""])
    for column in text_cols:
        if column in frame:
            frame[column] = frame[column].fillna("")
    if "samples_s" in frame:
        frame["samples_s"] = [_float_list(json.loads(s)) for s in frame["samples_s"]]
    sidecar = _sidecar(path)
    meta = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    return frame, meta


def _float_list(values: Any) -> list[float]:
    return [] if values is None else [float(v) for v in values]


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")
