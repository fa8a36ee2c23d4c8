"""Import aiconfigurator-core's measured GPU kernel tables into moesim's results schema.

The package ships parquet tables under
``aiconfigurator_core/systems/data/<system>/<family>/<framework>/<version>/``
with a ``collection_meta.yaml`` beside them. This module reads the tables the
calibration uses, checks their columns, converts units (the GEMM, MoE and NCCL
tables give milliseconds, DeepEP microseconds; NCCL message sizes are elements)
and returns rows in :data:`moesim.measure.results.COLUMNS` plus the provenance
columns :data:`moesim.measure.results.PROVENANCE_COLUMNS`.

Suites written (one row per measured configuration):

* ``gemm``: op ``gemm``, ``T, D, F = m, k, n``; strategy = the table's quant
  recipe (``bfloat16``, ``fp8``, ``fp8_block``), dtype ``bf16`` / ``fp8``.
* ``moe``: op ``moe``: ``T`` = tokens over the whole EP group (the table's
  ``num_tokens``; a rank runs ``T*K/ep`` rows: the EP8 time is 1/8 of EP1),
  ``D, F, E, K``, ``world`` = EP size, ``split`` = load distribution
  (``balanced``, ``power_law_<alpha>``), ``skew`` = alpha (0: balanced);
  a balanced rank runs ``T*K/ep`` rows spread evenly over its ``E/ep`` experts
  (:func:`moesim.calibrate.gpu.active_tokens`). Only ``moe_tp_size == 1``
  rows and gated (SwiGLU) kernels are kept.
* ``collective``: op = ``all_gather``, ``all_reduce``, ``reduce_scatter``,
  ``alltoall``; ``world`` = GPUs; ``msg_bytes`` = message bytes.
* ``deepep_ll`` / ``deepep_normal``: ops ``dispatch`` and ``combine``; ``T``
  tokens per rank, ``D, K, E``; ``world`` = 8 x nodes; normal mode's strategy
  is ``sms<N>`` (SMs given to the kernel). ``msg_bytes`` = ``T*K`` rows (fp8
  with scales for dispatch, bf16 for combine).
* ``attention``: the causal context (prefill) attention forward of one layer as
  TensorRT-LLM's attention op runs it (the collector times ``attn.forward`` on
  packed QKV in a CUDA graph: RoPE and the KV-cache write, then the fused FMHA
  kernel, causal mask). op ``context`` (MHA/GQA table) or ``context_mla``
  (DeepSeek-V3's context MLA: q/k head dim 192 = 128 + 64 rope, v 128, K and V
  expanded per head). ``T`` = tokens of the call (batch x isl), ``F`` = isl
  (every sequence's length), ``E`` = query heads, ``K`` = KV heads, ``D`` =
  q/k head dim; ``split`` = the mask (``causal``, ``causal_window<w>``),
  ``dtype`` = the FMHA dtype, ``strategy`` = ``kv_<kv cache dtype>``, ``flops``
  = :func:`moesim.costs.work.attention_core_flops` (v head dim: ``D``, MLA 128).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from moesim.costs import work
from moesim.errors import UserError

PACKAGE = "aiconfigurator_core"
PIP = "pip install 'moesim[gpu-data]'  (or: pip install aiconfigurator-core)"
#: GPUs per node of every system the tables cover (HGX / DGX boards)
GPUS_PER_NODE = 8
#: the table's quant recipe -> moesim dtype (recipes not listed are not imported)
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "fp8": "fp8", "fp8_block": "fp8"}
NCCL_DTYPES = {"half": ("fp16", 2.0), "int8": ("int8", 1.0), "float": ("fp32", 4.0)}
FP8_SCALE_BLOCK = 128


class ImportError_(UserError):
    """The tables are missing, unknown or not in the layout this importer reads."""


def data_root() -> Path:
    """``.../aiconfigurator_core/systems/data``; exit-2 error with the pip command if absent."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError_(f"the {PACKAGE} package is not installed; run: {PIP}")
    root = Path(next(iter(spec.submodule_search_locations))) / "systems" / "data"
    if not root.is_dir():
        raise ImportError_(f"{root}: no measured tables in this {PACKAGE} install; run: {PIP}")
    return root


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aiconfigurator-core")
    except PackageNotFoundError:
        return "unknown"


def systems(root: Path | None = None) -> list[str]:
    root = root or data_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))


def frameworks(system: str, root: Path | None = None) -> list[str]:
    """Frameworks with a GEMM or MoE table for ``system`` (``trtllm``, ``sglang``, ``vllm``)."""
    root = root or data_root()
    found: set[str] = set()
    for family in ("gemm", "moe"):
        d = root / system / family
        if d.is_dir():
            found.update(p.name for p in d.iterdir() if p.is_dir())
    return sorted(found)


def check_choice(system: str, framework: str | None, root: Path) -> str:
    """The framework to import (``trtllm`` if present); exit-2 errors list what exists."""
    known = systems(root)
    if system not in known:
        raise ImportError_(f"--system = {system!r}: unknown system; available: {', '.join(known)}")
    fws = frameworks(system, root)
    if framework is None:
        if not fws:
            raise ImportError_(f"--system = {system!r}: no GEMM or MoE tables in {root / system}")
        return "trtllm" if "trtllm" in fws else fws[0]
    if framework not in fws:
        raise ImportError_(
            f"--framework = {framework!r}: no tables for {system}; available: {', '.join(fws)}"
        )
    return framework


def _version_key(name: str) -> tuple[Any, ...]:
    """Order ``1.3.0rc20`` after ``1.3.0rc5`` and ``0.5.6.post2`` after ``0.5.6``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def newest(root: Path, system: str, family: str, framework: str, table: str) -> Path | None:
    """The version directory's ``<table>.parquet`` with the most rows (ties: newest), or None.

    Versions differ in coverage (a newer directory may hold one model's shapes
    only), so the widest table is the one the fits learn most from.
    """
    import pyarrow.parquet as pq

    base = root / system / family / framework
    if not base.is_dir():
        return None
    found = []
    for vdir in (p for p in base.iterdir() if p.is_dir()):
        f = vdir / f"{table}.parquet"
        if f.is_file():
            try:
                n = pq.ParquetFile(f).metadata.num_rows
            except Exception:  # unreadable: read_table reports it if chosen
                n = 0
            found.append((n, _version_key(vdir.name), f))
    return max(found, key=lambda x: (x[0], x[1]))[2] if found else None


def collection_date(table_path: Path) -> str:
    """The collection date from ``collection_meta.yaml`` (or the file's mtime date)."""
    meta = table_path.with_name("collection_meta.yaml")
    info: dict[str, Any] = {}
    if meta.is_file():
        try:
            loaded = yaml.safe_load(meta.read_text(encoding="utf-8"))
            info = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            info = {}
    for key in ("collected_at", "collection_date", "date", "created"):
        if key in info:
            return str(info[key])
    table = (
        (info.get("tables") or {}).get(table_path.stem)
        if isinstance(info.get("tables"), dict)
        else None
    )
    if isinstance(table, dict):
        for key in ("collected_at", "collection_date", "date"):
            if key in table:
                return str(table[key])
    return "not stated"


@dataclass(frozen=True)
class TableSpec:
    """One table kind: the columns it must have and how its rows become moesim rows."""

    family: str  # directory under <system>/
    table: str  # parquet stem
    columns: tuple[str, ...]
    convert: Callable[[pd.DataFrame], pd.DataFrame]


def read_table(path: Path, spec: TableSpec) -> pd.DataFrame:
    """The parquet at ``path`` with ``spec.columns`` checked (one-line error naming the column)."""
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises many types for a bad file
        raise ImportError_(f"{path}: not a readable parquet table ({type(err).__name__})") from None
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise ImportError_(
            f"{path}: column {missing[0]!r} missing (expected {', '.join(spec.columns)}; "
            f"found {', '.join(map(str, df.columns))}); a newer {PACKAGE}? this importer reads 0.12"
        )
    for col in spec.columns:
        numeric = col == "latency" or col.endswith("_us")
        if numeric and not pd.api.types.is_numeric_dtype(df[col]):
            raise ImportError_(f"{path}: column {col!r} is {df[col].dtype}, expected numbers")
    return df


# -- converters: table rows -> moesim rows (a DataFrame of result columns) ------------


def _base(df: pd.DataFrame, suite: str) -> dict[str, Any]:
    return {
        "suite": suite,
        "device": "cuda",
        "device_name": df["device"].astype(str).to_numpy(),
        "framework": df["framework"].astype(str).str.lower().to_numpy(),
        "source_version": df["version"].astype(str).to_numpy(),
        "kernel": df["kernel_source"].astype(str).to_numpy(),
        "status": "ok",
        "n_samples": 1,
    }


def convert_gemm(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df["gemm_dtype"].isin(list(DTYPES))]
    m, n, k = (df[c].to_numpy(dtype=np.int64) for c in ("m", "n", "k"))
    t = df["latency"].to_numpy(dtype=np.float64) * 1e-3
    flops = 2.0 * m * n * k
    out = pd.DataFrame(_base(df, "gemm") | {"op": "gemm", "T": m, "D": k, "F": n})
    out["strategy"] = df["gemm_dtype"].astype(str).to_numpy()
    out["dtype"] = df["gemm_dtype"].map(DTYPES).to_numpy()
    out["median_s"] = t
    out["flops"] = flops
    out["achieved_TFLOPs"] = flops / t / 1e12
    return out


def _skew(dist: pd.Series) -> np.ndarray:
    alpha = dist.str.extract(r"power_law_([0-9.]+)")[0].astype(float)
    return alpha.fillna(0.0).to_numpy(dtype=np.float64)


def convert_moe(df: pd.DataFrame) -> pd.DataFrame:
    df = df[(df["moe_tp_size"] == 1) & df["moe_dtype"].isin(list(DTYPES))]
    df = df[~df["kernel_source"].astype(str).str.contains("nongated")]  # no SwiGLU: other work
    df = df[df["num_experts"] % df["moe_ep_size"] == 0]
    T, D, F = (df[c].to_numpy(dtype=np.int64) for c in ("num_tokens", "hidden_size", "inter_size"))
    E, K, ep = (df[c].to_numpy(dtype=np.int64) for c in ("num_experts", "topk", "moe_ep_size"))
    t = df["latency"].to_numpy(dtype=np.float64) * 1e-3
    dist = df["distribution"].astype(str)
    flops = 2.0 * 3.0 * T * K * D * F / ep
    out = pd.DataFrame(_base(df, "moe") | {"op": "moe", "T": T, "D": D, "F": F, "E": E, "K": K})
    out["world"] = ep
    out["split"] = dist.to_numpy()
    out["skew"] = _skew(dist)
    out["strategy"] = df["moe_dtype"].astype(str).to_numpy()
    out["dtype"] = df["moe_dtype"].map(DTYPES).to_numpy()
    out["median_s"] = t
    out["flops"] = flops
    out["achieved_TFLOPs"] = flops / t / 1e12
    return out


def convert_nccl(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df["nccl_dtype"].isin(list(NCCL_DTYPES))]
    elem = df["nccl_dtype"].map(lambda d: NCCL_DTYPES[d][1]).to_numpy(dtype=np.float64)
    size = df["message_size"].to_numpy(dtype=np.float64) * elem
    t = df["latency"].to_numpy(dtype=np.float64) * 1e-3
    out = pd.DataFrame(_base(df, "collective"))
    out["op"] = df["op_name"].astype(str).to_numpy()
    out["strategy"] = "nccl"
    out["world"] = df["num_gpus"].to_numpy(dtype=np.int64)
    out["dtype"] = df["nccl_dtype"].map(lambda d: NCCL_DTYPES[d][0]).to_numpy()
    out["msg_bytes"] = size
    out["median_s"] = t
    out["algbw_GBps"] = size / t / 1e9
    return out


def _attention_rows(
    df: pd.DataFrame, op: str, kv_heads: np.ndarray, d_qk: np.ndarray, d_v: np.ndarray,
    window: np.ndarray, fmha: pd.Series,
) -> pd.DataFrame:  # fmt: skip
    b, s, H = (df[c].to_numpy(dtype=np.int64) for c in ("batch_size", "isl", "num_heads"))
    t = df["latency"].to_numpy(dtype=np.float64) * 1e-3
    flops = work.attention_core_flops(b, s, H, d_qk, d_v)
    out = pd.DataFrame(_base(df, "attention") | {"op": op, "T": b * s, "F": s, "E": H})
    out["K"], out["D"] = kv_heads, d_qk
    out["split"] = np.where(window > 0, "causal_window" + window.astype(str), "causal")
    out["dtype"] = fmha.map(DTYPES).to_numpy()
    out["strategy"] = ("kv_" + df["kv_cache_dtype"].map(DTYPES).astype(str)).to_numpy()
    out["median_s"] = t
    out["flops"] = flops
    out["bytes"] = work.attention_core_bytes(b, s, H, kv_heads, d_qk, d_v)
    out["achieved_TFLOPs"] = flops / t / 1e12
    return out


def convert_attention(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df["attn_dtype"].isin(list(DTYPES)) & df["kv_cache_dtype"].isin(list(DTYPES))]
    hd = df["head_dim"].to_numpy(dtype=np.int64)
    kv = df["num_key_value_heads"].to_numpy(dtype=np.int64)
    window = df["window_size"].to_numpy(dtype=np.int64)
    return _attention_rows(df, "context", kv, hd, hd, window, df["attn_dtype"])


def convert_mla(df: pd.DataFrame) -> pd.DataFrame:
    df = df[df["mla_dtype"].isin(list(DTYPES)) & df["kv_cache_dtype"].isin(list(DTYPES))]
    n = len(df)
    H = df["num_heads"].to_numpy(dtype=np.int64)
    d_qk, d_v = np.full(n, work.MLA_CONTEXT_DIMS[0]), np.full(n, work.MLA_CONTEXT_DIMS[1])
    return _attention_rows(df, "context_mla", H, d_qk, d_v, np.zeros(n, np.int64), df["mla_dtype"])


def row_bytes(hidden: np.ndarray, fp8: bool) -> np.ndarray:
    h = hidden.astype(np.float64)
    return h + 4.0 * np.ceil(h / FP8_SCALE_BLOCK) if fp8 else 2.0 * h


def _deepep(
    df: pd.DataFrame, suite: str, times: dict[str, np.ndarray], strategy: dict[str, Any]
) -> pd.DataFrame:
    T, D = df["num_token"].to_numpy(dtype=np.int64), df["hidden_size"].to_numpy(dtype=np.int64)
    K, E = df["num_topk"].to_numpy(dtype=np.int64), df["num_experts"].to_numpy(dtype=np.int64)
    parts = []
    for op, t in times.items():
        out = pd.DataFrame(_base(df, suite) | {"op": op, "T": T, "D": D, "K": K, "E": E})
        out["world"] = df["node_num"].to_numpy(dtype=np.int64) * GPUS_PER_NODE
        out["strategy"] = strategy[op]
        out["dtype"] = "fp8" if op == "dispatch" else "bf16"
        out["msg_bytes"] = T * K * row_bytes(D, op == "dispatch")
        out["median_s"] = t
        out["algbw_GBps"] = out["msg_bytes"] / t / 1e9
        parts.append(out)
    return pd.concat(parts, ignore_index=True)


def convert_deepep_ll(df: pd.DataFrame) -> pd.DataFrame:
    times = {
        "dispatch": df["dispatch_avg_t_us"].to_numpy(dtype=np.float64) * 1e-6,
        "combine": df["combine_avg_t_us"].to_numpy(dtype=np.float64) * 1e-6,
    }
    return _deepep(df, "deepep_ll", times, {"dispatch": "ll", "combine": "ll"})


def convert_deepep_normal(df: pd.DataFrame) -> pd.DataFrame:
    us = 1e-6
    times = {
        "dispatch": (df["dispatch_transmit_us"] + df["dispatch_notify_us"]).to_numpy(
            dtype=np.float64
        )
        * us,
        "combine": (df["combine_transmit_us"] + df["combine_notify_us"]).to_numpy(dtype=np.float64)
        * us,
    }
    sms = {
        "dispatch": ("sms" + df["dispatch_sms"].astype(str)).to_numpy(),
        "combine": ("sms" + df["combine_sms"].astype(str)).to_numpy(),
    }
    return _deepep(df, "deepep_normal", times, sms)


_COMMON = ("framework", "version", "device", "kernel_source")
TABLES: dict[str, TableSpec] = {
    "gemm": TableSpec(
        "gemm", "gemm_perf", (*_COMMON, "gemm_dtype", "m", "n", "k", "latency"), convert_gemm
    ),
    "moe": TableSpec(
        "moe",
        "moe_perf",
        (
            *_COMMON,
            "moe_dtype",
            "num_tokens",
            "hidden_size",
            "inter_size",
            "topk",
            "num_experts",
            "moe_tp_size",
            "moe_ep_size",
            "distribution",
            "latency",
        ),
        convert_moe,
    ),
    "nccl": TableSpec(
        "comm",
        "nccl_perf",
        (*_COMMON, "op_name", "nccl_dtype", "num_gpus", "message_size", "latency"),
        convert_nccl,
    ),
    "deepep_ll": TableSpec(
        "comm",
        "wideep_deepep_ll_perf",
        (
            *_COMMON,
            "node_num",
            "hidden_size",
            "num_token",
            "num_topk",
            "num_experts",
            "dispatch_avg_t_us",
            "combine_avg_t_us",
        ),
        convert_deepep_ll,
    ),
    "deepep_normal": TableSpec(
        "comm",
        "wideep_deepep_normal_perf",
        (
            *_COMMON,
            "node_num",
            "hidden_size",
            "num_token",
            "num_topk",
            "num_experts",
            "dispatch_sms",
            "dispatch_transmit_us",
            "dispatch_notify_us",
            "combine_sms",
            "combine_transmit_us",
            "combine_notify_us",
        ),
        convert_deepep_normal,
    ),
    "attention": TableSpec(
        "attention",
        "context_attention_perf",
        (
            *_COMMON,
            "batch_size",
            "isl",
            "num_heads",
            "num_key_value_heads",
            "head_dim",
            "window_size",
            "attn_dtype",
            "kv_cache_dtype",
            "latency",
        ),
        convert_attention,
    ),
    "mla": TableSpec(
        "mla",
        "context_mla_perf",
        (*_COMMON, "batch_size", "isl", "num_heads", "mla_dtype", "kv_cache_dtype", "latency"),
        convert_mla,
    ),
}
#: where each table kind lives: framework dir (None: the --framework) under its family dir
TABLE_FRAMEWORK: dict[str, str | None] = {
    "gemm": None,
    "moe": None,
    "nccl": "nccl",
    "deepep_ll": "sglang",
    "deepep_normal": "sglang",
    "attention": None,
    "mla": None,
}


@dataclass
class Imported:
    """The converted rows, the tables they came from and the device the tables name."""

    rows: pd.DataFrame
    tables: dict[str, str]  # kind -> parquet path
    device_name: str
    framework: str
    skipped: list[str]


def locate(system: str, framework: str, root: Path) -> dict[str, Path]:
    found = {}
    for kind, spec in TABLES.items():
        fw = TABLE_FRAMEWORK[kind] or framework
        path = newest(root, system, spec.family, fw, spec.table)
        if path is not None:
            found[kind] = path
    return found


def import_system(
    system: str,
    framework: str | None = None,
    *,
    root: Path | None = None,
    kinds: tuple[str, ...] | None = None,
    subset: Callable[[str, pd.DataFrame], pd.DataFrame] | None = None,
) -> Imported:
    """Read and convert every table kind present for ``system`` (see the module docstring).

    ``subset(kind, raw_table)`` may filter a raw table before conversion (tests,
    smaller committed files). All tables are read and checked before anything
    is returned, so a bad table leaves nothing half-done.
    """
    from moesim.measure.results import frame_from_columns

    root = root or data_root()
    fw = check_choice(system, framework, root)
    paths = locate(system, fw, root)
    wanted = kinds or tuple(TABLES)
    frames, tables, skipped = [], {}, []
    version = package_version()
    for kind in wanted:
        if kind not in paths:
            skipped.append(f"{kind}: no {TABLES[kind].table} table for {system}")
            continue
        raw = read_table(paths[kind], TABLES[kind])
        if subset is not None:
            raw = subset(kind, raw)
        conv = TABLES[kind].convert(raw)
        conv["source"] = f"{PACKAGE} {version}"
        conv["collected"] = collection_date(paths[kind])
        conv["table"] = str(paths[kind].relative_to(root))
        frames.append(conv)
        tables[kind] = str(paths[kind].relative_to(root))
    if not frames or all(f.empty for f in frames):
        raise ImportError_(
            f"--system = {system!r}: none of the tables {', '.join(wanted)} has rows"
        )
    rows = pd.concat([f for f in frames if not f.empty], ignore_index=True)
    device_name = str(rows["device_name"].mode().iloc[0])
    rows = frame_from_columns(rows)
    return Imported(rows, tables, device_name, fw, skipped)


def device_dir(device_name: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``: the results folder, named as the table names it."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
