"""Read ``moesim bench`` results files (parquet + ``moesim`` metadata) without torch.

Only what the fits need is checked here; a bad file is one :class:`UserError`
line naming the file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from moesim.config.base import DTYPE_BYTES
from moesim.errors import UserError
from moesim.measure.results import read_results

#: columns every results file has (the bench contract); the fits read these
REQUIRED_COLUMNS = (
    "suite",
    "op",
    "strategy",
    "T",
    "D",
    "F",
    "E",
    "K",
    "world",
    "skew",
    "split",
    "dtype",
    "device",
    "device_name",
    "median_s",
    "p20_s",
    "p80_s",
    "flops",
    "bytes",
    "msg_bytes",
    "tokens_per_expert",
    "status",
)


def resolve(path: str | Path) -> Path:
    """A results file (``.parquet`` or ``.csv``), or the newest ``*.parquet`` in a directory."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise UserError(f"{p}: no *.parquet results files in this directory")
        return files[-1]
    if not p.is_file():
        raise UserError(f"{p}: file not found (expected a results file from `moesim bench`)")
    return p


#: files read in this process, by (path, mtime, size): one command reads a file once
_READ: dict[tuple[str, int, int], tuple[pd.DataFrame, dict[str, Any]]] = {}
_READ_MAX = 8


def read_one(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Rows and the ``moesim`` metadata of one results file (parquet, or CSV + sidecar).

    A parquet file read before in this process, unchanged since (same
    modification time and size), comes from memory (a copy; ``moesim
    calibrate`` reads its inputs for the device, the kind of results and the fit).
    """
    if path.suffix != ".parquet":  # a CSV's metadata lives in a sidecar file
        return _read_checked(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _READ:
        if len(_READ) >= _READ_MAX:
            _READ.pop(next(iter(_READ)))
        _READ[key] = _read_checked(path)
    df, meta = _READ[key]
    return df.copy(), dict(meta)


def _read_checked(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    try:
        df, meta = read_results(path)
    except UserError as err:  # keep it one line whatever the parquet reader said
        raise UserError(str(err).splitlines()[0]) from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: not a moesim bench results file, missing columns: {missing}")
    dtypes = sorted(set(df["dtype"].astype(str)) - set(DTYPE_BYTES))
    if dtypes:
        allowed = ", ".join(DTYPE_BYTES)
        raise UserError(f"{path}: dtype = {dtypes[0]!r}: unknown dtype; allowed: {allowed}")
    bad = [s for s in df["tokens_per_expert"] if isinstance(s, str) and s and not _counts(s)]
    if bad:
        raise UserError(f"{path}: tokens_per_expert = {bad[0][:40]!r}: not a JSON list of counts")
    return df, meta if isinstance(meta, dict) else {}


def _counts(text: str) -> bool:
    """Whether ``text`` is a JSON list of non-negative numbers."""
    try:
        values = json.loads(text)
    except ValueError:
        return False
    return isinstance(values, list) and all(isinstance(v, int | float) and v >= 0 for v in values)


def load(paths: list[Path]) -> tuple[pd.DataFrame, list[dict[str, Any]], list[Path]]:
    """All rows with ``status == 'ok'`` and a positive time, from files of one device."""
    if not paths:
        raise UserError("no results files given")
    files = [resolve(p) for p in paths]
    frames, metas = [], []
    for f in files:
        df, meta = read_one(f)
        frames.append(df.assign(_file=str(f)))
        metas.append(meta)
    df = pd.concat(frames, ignore_index=True)
    ok = (df["status"].astype(str) == "ok") & (df["median_s"] > 0)
    df = df[ok & df["median_s"].notna()].reset_index(drop=True)
    if df.empty:
        raise UserError(f"{', '.join(map(str, files))}: no rows with status 'ok' to fit")
    devices = sorted(df["device_name"].astype(str).unique())
    if len(devices) > 1:
        raise UserError(f"results come from several devices {devices}; calibrate one at a time")
    return df, metas, files
