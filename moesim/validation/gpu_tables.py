"""Predicted vs measured on GPU tables, for configurations held out of the fit.

For each GPU (imported tables under ``results/<device>/``), model shape and
token count at EP 8, every phase is measured by one table row and predicted
by a profile fitted with that whole configuration held out:

* ``gate``: the router logits GEMM ``[T, D] x [D, E]`` in bf16 (GEMM table;
  the ``(E, D)`` weight shape held out);
* ``dispatch`` / ``combine``: DeepEP low-latency (decode) or normal mode with
  the most SMs (prefill), ``T`` tokens per rank (the ``(D, K, E)`` config
  held out);
* ``experts``: the fused MoE op on a balanced load, ``8 T`` tokens over the EP
  group, in the shape's recipe (DeepSeek-V3: fp8 with 128-block scales, the
  ``experts.fp8_block`` fit; the model shape ``(D, F, E, K)`` held out).

Predictions go through :class:`moesim.costs.CostModel`, the lookups the
simulator calls. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.calibrate import gpu
from moesim.calibrate.results import load
from moesim.config.hardware import CalibrationSource
from moesim.config.loader import load_hardware
from moesim.costs import CostModel
from moesim.errors import UserError

EP = 8


@dataclass(frozen=True)
class ModelShape:
    name: str
    D: int
    F: int
    E: int
    K: int
    dtype: str
    recipe: str  # the table's strategy: bfloat16, fp8 (per-tensor scales) or fp8_block


SHAPES = (
    ModelShape("deepseek-v3-like", 7168, 2048, 256, 8, "fp8", "fp8_block"),
    ModelShape("qwen3-30b-a3b-like", 2048, 768, 128, 8, "bf16", "bfloat16"),
    ModelShape("mixtral-8x7b-like", 4096, 14336, 8, 2, "bf16", "bfloat16"),
)
#: tokens per rank: decode (DeepEP low-latency) and prefill (DeepEP normal)
TOKENS = {"decode": (16, 64), "prefill": (1024, 2048)}
#: system -> (results folder, spec profile)
SYSTEMS = {
    "h100_sxm": ("results/nvidia-h100-80gb-hbm3", "h100-sxm-spec"),
    "h200_sxm": ("results/nvidia-h200", "h200-sxm-spec"),
}


def _excluder(shape: ModelShape) -> Callable[[str, pd.DataFrame], pd.DataFrame]:
    def exclude(family: str, rows: pd.DataFrame) -> pd.DataFrame:
        if family.startswith("gemm."):
            return rows[~((rows["F"] == shape.E) & (rows["D"] == shape.D))]
        if family.startswith("experts."):
            same = (rows["D"] == shape.D) & (rows["F"] == shape.F) & (rows["E"] == shape.E)
            return rows[~(same & (rows["K"] == shape.K))]
        if family.startswith("deepep."):
            same = (rows["D"] == shape.D) & (rows["K"] == shape.K) & (rows["E"] == shape.E)
            return rows[~same]
        return rows

    return exclude


def _measured(df: pd.DataFrame, suite: str, **eq: Any) -> float | None:
    rows = df[df["suite"] == suite]
    for col, val in eq.items():
        rows = rows[rows[col] == val]
    return float(rows["median_s"].min()) if len(rows) else None


def _cases(df: pd.DataFrame, cm: CostModel, system: str, shape: ModelShape) -> list[dict[str, Any]]:
    out = []
    for regime, counts in TOKENS.items():
        mode = "ll" if regime == "decode" else "normal"
        suite = f"deepep_{mode}"
        sms = df[(df["suite"] == suite)]["strategy"].astype(str)
        top = max((s for s in sms if s.startswith("sms")), key=lambda s: int(s[3:]), default=None)
        for t in counts:
            base = {"system": system, "model": shape.name, "regime": regime, "tokens_per_rank": t}
            phases: dict[str, tuple[float | None, float]] = {}
            meas = _measured(df, "gemm", T=t, F=shape.E, D=shape.D, strategy="bfloat16")
            phases["gate"] = (meas, float(cm.gemm_s(t, shape.E, shape.D, "bf16")))
            for op in ("dispatch", "combine"):
                eq: dict[str, Any] = {
                    "op": op,
                    "T": t,
                    "D": shape.D,
                    "K": shape.K,
                    "E": shape.E,
                    "world": EP,
                }
                if mode == "normal" and top is not None:
                    eq["strategy"] = top
                sms_n = int(top[3:]) if top and mode == "normal" else None
                pred = cm.deepep_s(mode, op, t, shape.D, shape.K, EP, sms=sms_n, experts=shape.E)
                phases[op] = (
                    _measured(df, suite, **eq),
                    float(pred) if pred is not None else float("nan"),
                )
            T = EP * t
            meas = _measured(
                df,
                "moe",
                T=T,
                D=shape.D,
                F=shape.F,
                E=shape.E,
                K=shape.K,
                world=EP,
                split="balanced",
                dtype=shape.dtype,
                strategy=shape.recipe,
            )
            active, per = gpu.active_tokens(
                *(np.array([float(v)]) for v in (T, shape.K, shape.E, EP))
            )
            toks = np.full(int(active[0]), per[0])
            recipe = gpu.expert_key(shape.dtype, shape.recipe)
            pred_e = float(
                cm.experts_s(
                    toks, shape.D, shape.F, shape.dtype, scanned_rows=T * shape.K, recipe=recipe
                )
            )
            phases["experts"] = (meas, pred_e)
            for phase, (m, p) in phases.items():
                if m is None or not np.isfinite(p):
                    out.append(
                        base | {"phase": phase, "measured_s": None, "predicted_s": p, "error": None}
                    )
                    continue
                out.append(
                    base | {"phase": phase, "measured_s": m, "predicted_s": p, "error": (p - m) / m}
                )
    return out


def validate_gpu_tables(
    root: str | Path = ".", systems: tuple[str, ...] = tuple(SYSTEMS)
) -> dict[str, Any]:
    """Every (system, shape, regime, tokens, phase) case; median |error| over measured ones."""
    cases: list[dict[str, Any]] = []
    for system in systems:
        folder, spec = SYSTEMS[system]
        path = Path(root) / folder
        files = sorted(path.glob(f"aiconfigurator-{system}-*.parquet")) if path.is_dir() else []
        if not files:
            raise UserError(
                f"{path}: no imported tables; run `moesim import aiconfigurator --system {system}`"
            )
        df, _, _ = load([files[0]])
        base = load_hardware(spec)
        src = CalibrationSource(
            results=[str(files[0])], device=str(df["device_name"].iloc[0]), created="validation"
        )
        for shape in SHAPES:
            fit = gpu.fit_all(df, base, src, exclude=_excluder(shape), crossval=False)
            cm = gpu.cost_model(base, fit.parts, src)
            cases += _cases(df, cm, system, shape)
    errs = sorted(abs(c["error"]) for c in cases if c["error"] is not None)
    return {
        "cases": cases,
        "median_abs_error": float(np.median(errs)) if errs else None,
        "max_abs_error": errs[-1] if errs else None,
        "n_measured": len(errs),
    }
