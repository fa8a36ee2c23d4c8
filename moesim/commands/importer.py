"""``moesim import aiconfigurator --system h200_sxm [--framework trtllm]``: measured GPU tables.

Reads NVIDIA's measured kernel tables shipped in ``aiconfigurator-core``
(GEMM, MoE, NCCL, DeepEP, context attention and MLA) and writes them as one moesim results file,
``results/<device>/aiconfigurator-<system>-<framework>.parquet`` (``device``
as the tables name it, e.g. ``nvidia-h200``), which ``moesim calibrate``
reads like any bench results. ``--full`` keeps every GEMM row (about 100k;
the default keeps the token counts the GEMM table is fitted on, see
:data:`moesim.calibrate.gpu.GEMM_M_GRID`, plus tile-boundary neighbours) and every
attention row (the default keeps the bf16 ones, :func:`committed_subset`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from moesim.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

SOURCES = ("aiconfigurator",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=SOURCES, help="where the measurements come from")
    parser.add_argument(
        "--system", required=True, help="system as the package names it, e.g. h200_sxm"
    )
    parser.add_argument(
        "--framework", default=None, help="framework of the GEMM/MoE tables (default trtllm)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="results root (default results)"
    )
    parser.add_argument(
        "--full", action="store_true", help="keep every GEMM and attention row (large file)"
    )
    parser.add_argument("--json", action="store_true", help="print {path, rows, tables} as JSON")


def run(args: argparse.Namespace) -> int:
    from moesim.gpudata import aiconfigurator as aic
    from moesim.measure.results import write_results

    subset = None if args.full else committed_subset
    imp = aic.import_system(args.system, args.framework, subset=subset)
    path = (
        args.out
        / aic.device_dir(imp.device_name)
        / f"aiconfigurator-{args.system}-{imp.framework}.parquet"
    )
    meta = {
        "source": f"{aic.PACKAGE} {aic.package_version()}",
        "system": args.system,
        "framework": imp.framework,
        "tables": imp.tables,
        "device_name": imp.device_name,
        "full": bool(args.full),
        "provenance": _provenance(),
        "complete": True,
    }
    try:
        write_results(imp.rows, path, meta)
    except OSError as err:
        raise UserError(
            f"--out = {str(args.out)!r}: cannot write ({err.strerror or err})"
        ) from None
    counts = imp.rows.groupby("suite").size().to_dict()
    if args.json:
        print(
            json.dumps(
                {
                    "path": str(path),
                    "rows": {str(k): int(v) for k, v in counts.items()},
                    "tables": imp.tables,
                }
            )
        )
        return 0
    print(
        f"imported {len(imp.rows)} rows measured on {imp.device_name} ({imp.framework}) -> {path}"
    )
    for kind, table in imp.tables.items():
        print(f"  {kind:14s} {table}")
    for line in imp.skipped:
        print(f"  skipped: {line}")
    print(f"next: moesim calibrate {path}")
    return 0


def committed_subset(kind: str, raw: pd.DataFrame) -> pd.DataFrame:
    """GEMM rows at the fitted token counts and their +1 neighbours; attention rows with
    a bf16 FMHA and KV cache (what the simulator prices: training keeps no fp8
    attention); other tables whole."""
    if kind == "attention":
        return raw[(raw["attn_dtype"] == "bfloat16") & (raw["kv_cache_dtype"] == "bfloat16")]
    if kind == "mla":
        return raw[(raw["mla_dtype"] == "bfloat16") & (raw["kv_cache_dtype"] == "bfloat16")]
    if kind != "gemm":
        return raw
    from moesim.calibrate.gpu import GEMM_M_GRID

    keep = set(GEMM_M_GRID) | {m + 1 for m in GEMM_M_GRID if 16 <= m <= 256}
    return raw[raw["m"].isin(sorted(keep))]


def _provenance() -> dict[str, object]:
    from moesim.io import provenance

    return provenance()
