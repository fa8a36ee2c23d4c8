"""Families fitted to measured GPU tables (``moesim import``), with held-out errors by shape.

Each family selects its rows from the imported suites, fits the pieces of a
:class:`~moesim.config.hardware.Calibration`, and predicts through
:class:`moesim.costs.CostModel`, so the held-out error is the error of what the
simulator computes. Folds hold out whole shapes or configurations
(:attr:`GpuFamily.shape`), never random rows of one curve:

* ``gemm.<recipe>`` (bf16, fp8, fp8_block): a grid of measured seconds over
  ``(m, n, k)`` (:class:`~moesim.config.hardware.GemmTable`), log-trilinear;
  cells a fold lacks are filled from their neighbours along ``n`` and ``k``.
  Folds: whole ``(n, k)`` weight shapes, every ``m`` of them (the tile-boundary
  token counts ``m + 1`` included, though the grid holds powers of two only).
* ``experts.<dtype>``: the fused MoE op (expand, gate/up GEMM, SwiGLU, down
  GEMM, finalize) on balanced loads: ``latency + scan + sum_active_experts
  (per_expert + activation bytes x activation_ps + flops_e / tflops(tokens_e))
  + weights / weight_bw(tiles)``, the weight bandwidth a non-decreasing curve
  over the output tiles the call streams in parallel, at most the HBM figure
  (:func:`fit_experts_line`). Before fitting, configurations slower than the
  same shape at a smaller EP (a rank holding a superset of their work) are
  flagged, neither fitted nor scored, and named in a note
  (:func:`flag_ep_slower_than_subset`). Folds: whole model shapes
  ``(D, F, E, K)``, every token count and EP size. ``experts.fp8`` takes the
  faster of the per-tensor and block-scaled kernels per configuration;
  ``experts.fp8_block`` fits the 128-block-scaled rows alone (DeepSeek-V3's
  recipe, the only one the tables hold at D 7168; on Hopper it stops near
  0.6x the per-tensor rate, a curve shared with it cannot follow).
* ``collective.<kind>.<gpus>``: NCCL ``latency + bytes / bw(bytes)``. Folds:
  whole message sizes (both dtypes), stratified over the range.
* ``deepep.ll.<op>`` / ``deepep.normal.<op>.sms<N>``: ``latency + bytes /
  bw(bytes)``, bytes a rank sends to the other ranks. Folds: whole
  ``(D, K, E)`` configurations.
* ``attention.<dtype>`` / ``attention.mla.<dtype>``: the causal context attention
  forward (TensorRT-LLM's FMHA with its RoPE / KV-cache prologue; full causal mask,
  bf16 KV cache), ``latency + bytes_ps bytes + flops / rate(seq, head_dim, tiles)``
  (:func:`~moesim.calibrate.gpu_forms.fit_attention`). Folds: whole attention
  shapes ``(heads, kv_heads, head_dim)``, every batch and sequence length.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from moesim.calibrate.gpu_forms import (
    fit_attention,
    fit_deepep_ll,
    fit_deepep_normal,
    fit_regimes,
)
from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import (
    AttentionFit,
    Calibration,
    CalibrationSource,
    CommFit,
    CommRegime,
    Curve,
    DeepEPFit,
    FamilyError,
    GemmFit,
    GemmTable,
    HardwareProfile,
)
from moesim.costs import CostModel, work
from moesim.costs.model import deepep_bytes, deepep_row_bytes

F64 = NDArray[np.float64]
#: token counts the GEMM grid holds (those the system measured)
GEMM_M_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
#: GEMM recipes fitted (the table's names; fp8_block: DeepSeek-style 128-block scales)
GEMM_RECIPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block"}
FOLDS = 5
#: noise scale of the tables (one timing per row, no spread): 3 %
TABLE_NOISE = 0.03
SUITES = ("gemm", "moe", "collective", "deepep_ll", "deepep_normal", "attention")
#: the columns the families read (the rest, e.g. raw samples, only slows every row selection)
FIT_COLUMNS = (
    "suite", "op", "strategy", "dtype", "split", "T", "D", "F", "E", "K", "world", "msg_bytes",
    "median_s",
)  # fmt: skip


@dataclass
class GpuParts:
    """What the GPU families add to a Calibration."""

    gemm: dict[str, GemmFit] = field(default_factory=dict)
    gemm_table: dict[str, GemmTable] = field(default_factory=dict)
    collectives: dict[str, CommFit] = field(default_factory=dict)
    deepep: dict[str, CommFit] = field(default_factory=dict)
    attention: dict[str, AttentionFit] = field(default_factory=dict)
    ranges: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def update(self, other: GpuParts) -> None:
        for name in PART_NAMES:
            getattr(self, name).update(getattr(other, name))

    def as_dict(self) -> dict[str, object]:
        return {n: getattr(self, n) for n in PART_NAMES}


PART_NAMES = ("gemm", "gemm_table", "collectives", "deepep", "attention", "ranges")


@dataclass(frozen=True)
class GpuFamily:
    """One fitted family: its rows, a fit, a CostModel prediction and the fold key (shape)."""

    name: str
    rows: Callable[[pd.DataFrame], pd.DataFrame]
    fit: Callable[[pd.DataFrame], GpuParts]
    predict: Callable[[CostModel, pd.DataFrame], F64]
    shape: tuple[str, ...]  # columns whose distinct values are one held-out configuration
    # rows a stated physical rule flags before fitting (not fitted, not scored): mask, note
    flag: Callable[[pd.DataFrame], tuple[NDArray[np.bool_], str]] | None = None
    cost: float = 1.0  # relative fitting time: the costliest families are started first


def _g(v: float) -> float:
    return float(f"{v:.6g}")


def _rng(v: pd.Series | F64) -> list[float]:
    a = np.asarray(v, dtype=np.float64)
    return [float(a.min()), float(a.max())]


# -- GEMM grid -----------------------------------------------------------------------


def _gemm_rows(recipe: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def rows(df: pd.DataFrame) -> pd.DataFrame:
        r = df[(df["suite"] == "gemm") & (df["strategy"] == recipe)]
        key = ["T", "D", "F"]
        return r.loc[r.groupby(key)["median_s"].idxmin()].reset_index(drop=True) if len(r) else r

    return rows


def _fill_line(v: F64, x: F64) -> F64:
    """NaNs of ``v`` (log time along one axis at log positions ``x``) from the others."""
    ok = np.isfinite(v)
    if ok.sum() < 2:
        return np.full_like(v, np.nan)
    xs, ys = x[ok], v[ok]
    out = np.interp(x, xs, ys)
    lo, hi = x < xs[0], x > xs[-1]  # extrapolate linearly from the two nearest points
    if lo.any():
        out[lo] = ys[0] + (x[lo] - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0])
    if hi.any():
        out[hi] = ys[-1] + (x[hi] - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return out


def gemm_grid(rows: pd.DataFrame, m_grid: tuple[int, ...] = GEMM_M_GRID) -> GemmTable:
    """The ``(m, n, k)`` grid of measured seconds (log), gaps filled along ``n`` and ``k``."""
    ms = sorted(set(rows["T"].astype(int)) & set(m_grid)) or sorted(set(rows["T"].astype(int)))
    ns, ks = sorted(set(rows["F"].astype(int))), sorted(set(rows["D"].astype(int)))
    L = np.full((len(ms), len(ns), len(ks)), np.nan)
    on = rows[rows["T"].isin(ms)]
    im = np.searchsorted(ms, on["T"].to_numpy())
    i_n = np.searchsorted(ns, on["F"].to_numpy())
    ik = np.searchsorted(ks, on["D"].to_numpy())
    L[im, i_n, ik] = np.log(on["median_s"].to_numpy() * 1e6)
    lx_n, lx_k = np.log(np.asarray(ns, float)), np.log(np.asarray(ks, float))
    for a in range(len(ms)):
        sl = L[a]
        if not np.isnan(sl).any():
            continue
        by_n = np.stack([_fill_line(sl[:, j], lx_n) for j in range(len(ks))], axis=1)
        by_k = np.stack([_fill_line(sl[i, :], lx_k) for i in range(len(ns))], axis=0)
        both = np.stack([by_n, by_k])
        cnt = np.isfinite(both).sum(axis=0)
        est = np.where(cnt > 0, np.nansum(both, axis=0) / np.maximum(cnt, 1), np.nan)
        L[a] = np.where(np.isnan(sl), est, sl)
    if np.isnan(L).any():  # a whole m slice empty: copy the nearest m's ratio
        L = _fill_axis0(L, np.log(np.asarray(ms, float)))
    lat = [float(f"{v:.5g}") for v in np.exp(L).ravel()]
    return GemmTable(m=ms, n=ns, k=ks, latency_us=lat)


def _fill_axis0(L: F64, x: F64) -> F64:
    out = L.copy()
    for i in range(L.shape[1]):
        for j in range(L.shape[2]):
            out[:, i, j] = _fill_line(L[:, i, j], x)
    return np.nan_to_num(out, nan=float(np.nanmedian(L)))


def _gemm_family(recipe: str) -> GpuFamily:
    key = GEMM_RECIPES[recipe]

    def fit(rows: pd.DataFrame) -> GpuParts:
        ranges = {"m": _rng(rows["T"]), "n": _rng(rows["F"]), "k": _rng(rows["D"])}
        return GpuParts(gemm_table={key: gemm_grid(rows)}, ranges={f"gemm.{key}": ranges})

    def predict(cm: CostModel, rows: pd.DataFrame) -> F64:
        return cm.gemm_s(
            rows["T"].to_numpy(), rows["F"].to_numpy(), rows["D"].to_numpy(), "", recipe=key
        )

    return GpuFamily(f"gemm.{key}", _gemm_rows(recipe), fit, predict, ("F", "D"))


# -- grouped experts (fused MoE) ------------------------------------------------------


def active_tokens(T: F64, K: F64, E: F64, ep: F64) -> tuple[F64, F64]:
    """Balanced load of one EP rank: active local experts and rows per active expert.

    ``T*K/ep`` rows over ``E/ep`` local experts; with fewer rows than experts,
    one row per active expert.
    """
    rows = T * K / ep
    local = E / ep
    active = np.minimum(local, np.maximum(np.ceil(rows - 1e-9), 1.0))
    return active, rows / active


def tokens_lists(rows: pd.DataFrame) -> list[F64]:
    active, per = active_tokens(
        *(rows[c].to_numpy(dtype=np.float64) for c in ("T", "K", "E", "world"))
    )
    return [np.full(int(a), p) for a, p in zip(active, per, strict=True)]


#: fused-MoE recipes with a family of their own (the table's strategy -> fit key and
#: dtype): DeepSeek-style 128-block fp8 scales run their own kernel, on Hopper at
#: about 0.6x the per-tensor fp8 rate once compute-bound, on Blackwell at about 1x
EXPERT_RECIPES = {"fp8_block": ("fp8_block", "fp8")}


def expert_key(dtype: str, strategy: str) -> str:
    """The fit key of a fused-MoE row: its recipe's (:data:`EXPERT_RECIPES`), else its dtype."""
    return EXPERT_RECIPES[strategy][0] if strategy in EXPERT_RECIPES else dtype


def _moe_rows(dtype: str, recipe: str | None = None) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Balanced rows of ``dtype`` (of the strategy ``recipe`` only, if given); the fastest
    row per configuration (what a tuned system runs: fp8 takes the faster of the
    per-tensor and block-scaled kernels where both were measured)."""

    def rows(df: pd.DataFrame) -> pd.DataFrame:
        r = df[(df["suite"] == "moe") & (df["dtype"] == dtype) & (df["split"] == "balanced")]
        if recipe is not None:
            r = r[r["strategy"].astype(str) == recipe]
        key = ["T", "D", "F", "E", "K", "world"]
        return r.loc[r.groupby(key)["median_s"].idxmin()].reset_index(drop=True) if len(r) else r

    return rows


@dataclass(frozen=True)
class ExpertRows:
    """The fused-MoE rows as the fit sees them (one item per row, counted ``active`` times).

    ``active``: active experts of the rank; ``tokens_e``: rows per active expert;
    ``flops_e``, ``wbytes_e``, ``act_e``: FLOPs, weight bytes and activation bytes
    of one active expert; ``scan``: routed rows x hidden the kernel scans;
    ``tiles_e``: output tiles of one active expert (``work.expert_weight_tiles``;
    None: the weights stream at one bandwidth).
    """

    active: F64
    tokens_e: F64
    flops_e: F64
    wbytes_e: F64
    scan: F64
    act_e: F64
    tiles_e: F64 | None = None


#: weight-bandwidth knots per decade of the call's weight tiles, and their smoothing
TILE_KNOTS_PER_DECADE = 2
TILE_SMOOTH = 0.3


def fit_experts_line(
    x: ExpertRows,
    t: F64,
    noise: float = TABLE_NOISE,
    peak_tflops: float | None = None,
    hbm_GBps: float | None = None,
) -> GemmFit:
    """``t = lat + scan_ps scan + active (per + act_e act_ps + flops_e / tflops(tokens_e))
    + active wbytes_e / weight_bw(tiles)``.

    Robust least squares on ``log t``. Every active expert of a balanced row has
    the same load, so a row is one item counted ``active`` times. The rate
    curve is read at the tokens per expert (tile and wave utilisation), the
    weight term prices the weight-bound decode regime, the activation term the
    bytes each row moves (it grows with ``D + F`` where the FLOPs grow with
    ``D F``, so small shapes pay more of it). The weight bandwidth is a curve
    over the call's output tiles ``tiles = active tiles_e`` (the CTAs streaming
    weights at once; a call of few tiles leaves HBM idle), two knots per decade,
    or one figure where ``x.tiles_e`` is None. Rate knots: two per decade. The
    silicon bounds the fit: ``peak_tflops`` (the dtype's dense peak) caps the
    rate curve and ``hbm_GBps`` the weight bandwidth (without them the other
    terms can trade time with these and push them past the hardware).
    """
    from scipy.optimize import least_squares

    from moesim.calibrate.fit import interp_matrix, knot_positions

    knots = np.unique([float(f"{v:.6g}") for v in knot_positions(x.tokens_e, 24)])
    W = interp_matrix(np.maximum(x.tokens_e, knots[0]), knots)
    rough = np.diff(np.eye(knots.size), 2, axis=0) * 0.1
    # lat_us, per_us, weight ps/B (one bandwidth; idle with the tile curve), scan ps,
    # activation ps/B; then log rate knots; then the bandwidth's drops below HBM per tile knot
    n = 5
    nk = knots.size
    wbytes = x.active * x.wbytes_e
    if x.tiles_e is not None:
        tiles = np.maximum(x.active * x.tiles_e, 1.0)
        lo_t, hi_t = float(tiles.min()), float(tiles.max())
        count = int(np.ceil(TILE_KNOTS_PER_DECADE * np.log10(hi_t / lo_t) - 1e-9)) + 1
        tknots = np.unique([float(f"{v:.6g}") for v in np.geomspace(lo_t, hi_t, max(count, 2))])
        Wt = interp_matrix(tiles, tknots)
    else:
        tknots, Wt = np.zeros(0), np.zeros((t.size, 0))
    nt = tknots.size
    rough_t = np.diff(np.eye(nt), 2, axis=0) * TILE_SMOOTH if nt > 2 else np.zeros((0, nt))

    bw_top = hbm_GBps if hbm_GBps else 2e4

    def log_bw(p: F64) -> F64:
        """Log GB/s at the tile knots: the top, less the drops above each knot (>= 0),
        so the bandwidth never falls with more tiles and never passes the HBM figure."""
        return np.log(bw_top) - np.cumsum(p[n + nk :][::-1])[::-1]

    def pred(p: F64) -> F64:
        rate = (W @ np.exp(p[n : n + nk])) * 1e12
        per = p[1] * 1e-6 + x.act_e * p[4] * 1e-12 + x.flops_e / rate
        w_s = wbytes / ((Wt @ np.exp(log_bw(p))) * 1e9) if nt else wbytes * p[2] * 1e-12
        return p[0] * 1e-6 + x.scan * p[3] * 1e-12 + x.active * per + w_s

    def resid(p: F64) -> F64:
        r = np.log(np.maximum(pred(p), 1e-30) / t)
        return np.r_[r, rough @ p[n : n + nk], rough_t @ log_bw(p)]

    upper = np.triu(np.ones((nt, nt)))  # d log_bw[k] / d drop[j] = -1 for k <= j

    def jac(p: F64) -> F64:
        """Analytic Jacobian of :func:`resid` (finite differences cost a residual per
        parameter per step)."""
        pr = np.maximum(pred(p), 1e-30)
        ey = np.exp(p[n : n + nk])
        rate = (W @ ey) * 1e12
        d_rate = -(x.active * x.flops_e / rate**2)[:, None] * W * (ey * 1e12)[None, :]
        top = [np.full(t.size, 1e-6), x.active * 1e-6, np.zeros(t.size), x.scan * 1e-12]
        top += [x.active * x.act_e * 1e-12]
        if nt:
            eb = np.exp(log_bw(p))
            bw = (Wt @ eb) * 1e9
            d_bw = (wbytes / bw**2 * 1e9)[:, None] * ((Wt * eb[None, :]) @ upper)
        else:
            top[2] = wbytes * 1e-12
            d_bw = np.zeros((t.size, 0))
        J = np.column_stack([*top, d_rate, d_bw]) / pr[:, None]
        J_rate = np.column_stack(
            [np.zeros((rough.shape[0], n)), rough, np.zeros((rough.shape[0], nt))]
        )
        J_bw = np.column_stack([np.zeros((rough_t.shape[0], n + nk)), -rough_t @ upper])
        return np.vstack([J, J_rate, J_bw])

    tmin = float(np.min(t)) * 1e6
    x0 = np.r_[
        tmin * 0.3, 0.5, 1e12 / 3e12, 0.1, 0.0, np.full(nk, np.log(300.0)),
        np.full(nt, 0.1),
    ]  # fmt: skip
    w_lo = 1e3 / bw_top
    lo = np.r_[0.0, 0.0, w_lo, 0.0, 0.0, np.full(nk, -12.0), np.zeros(nt)]  # drops >= 0
    top = np.log(peak_tflops) if peak_tflops else 12.0
    hi = np.r_[
        tmin, 1e3, 1e12 / 1e10, 1e3, 1e3, np.full(nk, top), np.full(nt, 10.0)
    ]  # fmt: skip
    sol = least_squares(
        resid,
        np.clip(x0, lo, hi * 0.999),
        jac=jac,
        bounds=(lo, hi),
        loss="soft_l1",
        f_scale=noise,
    )
    p = sol.x
    bw_y = [_g(v) for v in np.exp(log_bw(p))] if nt else []
    return GemmFit(
        scan_ps=_g(p[3]),
        latency_us=_g(p[0]),
        per_expert_us=_g(p[1]),
        tflops=Curve(x=list(knots), y=[_g(v) for v in np.exp(p[n : n + nk])]),
        weight_GBps=bw_y[-1] if nt else _g(1e3 / p[2]),
        weight_GBps_by_tiles=Curve(x=list(tknots), y=bw_y) if nt else None,
        tflops_by="tokens",
        activation_ps=_g(p[4]),
    )


def expert_rows(rows: pd.DataFrame, dtype: str) -> ExpertRows:
    """:class:`ExpertRows` of balanced fused-MoE table rows (``T, K, E, world, D, F``)."""
    T, K, E, ep, D, F = (
        rows[c].to_numpy(dtype=np.float64) for c in ("T", "K", "E", "world", "D", "F")
    )
    active, per = active_tokens(T, K, E, ep)
    return ExpertRows(
        active=active,
        tokens_e=per,
        flops_e=work.expert_flops(per, 1, 1) * D * F,
        wbytes_e=3.0 * D * F * DTYPE_BYTES[dtype],
        scan=T * K * D,
        act_e=work.expert_activation_bytes(per, D, F),
        tiles_e=work.expert_weight_tiles(per, D, F),
    )


#: a fused-MoE configuration is flagged when it is slower than the same shape at a
#: smaller EP by more than this factor: 1 + three times the tables' noise scale
EP_SUBSET_TOLERANCE = 1.0 + 3.0 * TABLE_NOISE
MOE_SHAPE = ("D", "F", "E", "K")


def ep_subset_ratios(rows: pd.DataFrame) -> pd.Series:
    """Per (D, F, E, K, EP): median over token counts of ``t / min t`` at smaller EPs.

    A rank at EP ``q`` of a balanced load holds a subset of the experts and
    receives a subset of the rows of a rank at any EP ``p < q`` for the same
    tokens, so its fused-MoE call cannot take longer (the fixed costs are the
    same). The smallest EP of each shape has no ratio.
    """
    out: dict[tuple[int, ...], float] = {}
    for key, g in rows.groupby(list(MOE_SHAPE)):
        piv = g.pivot_table(index="T", columns="world", values="median_s", aggfunc="min")
        eps = sorted(piv.columns)
        for i, ep in enumerate(eps[1:], 1):
            r = (piv[ep] / piv[eps[:i]].min(axis=1)).dropna()
            if len(r):
                out[(*(int(v) for v in key), int(ep))] = float(np.median(r))
    idx = pd.MultiIndex.from_tuples(list(out), names=[*MOE_SHAPE, "world"]) if out else None
    return pd.Series(list(out.values()), index=idx, dtype=np.float64)


def flag_ep_slower_than_subset(
    rows: pd.DataFrame, family: str = "experts", tolerance: float = EP_SUBSET_TOLERANCE
) -> tuple[NDArray[np.bool_], str]:
    """Rows of the configurations :func:`ep_subset_ratios` puts above ``tolerance``.

    Such a time is not the cost of the rank's work (a rank with more of the same
    work ran faster) but the kernel's tactic at that one configuration in the
    collection run (the same shapes scale smoothly with EP in the other
    frameworks' tables, and each GPU has different ones). Returns the mask
    and a note naming every flagged configuration with its ratio.
    """
    ratios = ep_subset_ratios(rows)
    bad = ratios[ratios > tolerance]
    if bad.empty:
        return np.zeros(len(rows), dtype=bool), ""
    keys = set(bad.index)
    cols = [*MOE_SHAPE, "world"]
    mask = np.array([tuple(int(v) for v in r) in keys for r in rows[cols].to_numpy()])
    configs = rows[cols].drop_duplicates()
    named = ", ".join(f"D{d} F{f} E{e} K{k} EP{w} ({r:.2f}x)" for (d, f, e, k, w), r in bad.items())
    note = (
        f"{family}: {len(bad)} of {len(configs)} (shape, EP) configurations "
        f"({int(mask.sum())} of {len(rows)} rows) flagged and not fitted: slower than the "
        f"same shape at a smaller EP, whose rank holds a superset of the work (median over "
        f"tokens of t / least t at a smaller EP > {tolerance:.2f}): {named}"
    )
    return mask, note


def _experts_family(
    dtype: str, peak: float | None = None, hbm: float | None = None, recipe: str | None = None
) -> GpuFamily:
    """``experts.<key>``: the fused MoE of ``dtype``, or of its ``recipe`` (the fit key
    :func:`expert_key`; the silicon bounds and weight bytes are the dtype's)."""
    key = expert_key(dtype, recipe) if recipe else dtype

    def fit(rows: pd.DataFrame) -> GpuParts:
        x = expert_rows(rows, dtype)
        t = rows["median_s"].to_numpy(dtype=np.float64)
        g = fit_experts_line(x, t, peak_tflops=peak, hbm_GBps=hbm)
        ranges = {
            "tokens_per_expert": _rng(x.tokens_e),
            "hidden": _rng(rows["D"]),
            "intermediate": _rng(rows["F"]),
            "local_experts": _rng(rows["E"] / rows["world"]),
        }
        return GpuParts(gemm={key: g}, ranges={f"experts.{key}": ranges})

    def predict(cm: CostModel, rows: pd.DataFrame) -> F64:
        m = tokens_lists(rows)
        scanned = (rows["T"] * rows["K"]).to_numpy(
            dtype=np.float64
        )  # the collector's kernel sees all
        return np.array(
            [
                float(cm.experts_s(v, int(d), int(f), dtype, scanned_rows=s, recipe=key))
                for v, d, f, s in zip(m, rows["D"], rows["F"], scanned, strict=True)
            ]
        )

    def flag(rows: pd.DataFrame) -> tuple[NDArray[np.bool_], str]:
        return flag_ep_slower_than_subset(rows, f"experts.{key}")

    return GpuFamily(f"experts.{key}", _moe_rows(dtype, recipe), fit, predict, MOE_SHAPE, flag)


# -- collectives ------------------------------------------------------------------------


def _collective_family(kind: str, gpus: int) -> GpuFamily:
    name = f"{kind}.{gpus}"

    def rows(df: pd.DataFrame) -> pd.DataFrame:
        r = df[(df["suite"] == "collective") & (df["op"] == kind) & (df["world"] == gpus)]
        return r.reset_index(drop=True)

    def fit(r: pd.DataFrame) -> GpuParts:
        size = r["msg_bytes"].to_numpy(dtype=np.float64)
        t = r["median_s"].to_numpy(dtype=np.float64)
        return GpuParts(
            collectives={name: fit_regimes(size, t, TABLE_NOISE)},
            ranges={
                f"collective.{kind}": {"bytes": _rng(size), "gpus": [float(gpus), float(gpus)]}
            },
        )

    def predict(cm: CostModel, r: pd.DataFrame) -> F64:
        return cm.collective_s(kind, gpus, r["msg_bytes"].to_numpy(dtype=np.float64))

    return GpuFamily(f"collective.{name}", rows, fit, predict, ("msg_bytes",))


# -- DeepEP -------------------------------------------------------------------------------


def _deepep_form(mode: str, op: str, r: pd.DataFrame, size: F64, sms: int | None) -> DeepEPFit:
    T, D, K, E = (r[c].to_numpy(dtype=np.float64) for c in ("T", "D", "K", "E"))
    t = r["median_s"].to_numpy(dtype=np.float64)
    if mode == "ll":
        cap = int(sms or np.max(E))  # SMs of the GPU (spec profile), else no cap
        return fit_deepep_ll(T, D, K, E, size, t, cap, TABLE_NOISE)
    row = np.array([deepep_row_bytes(op, int(d)) for d in D])
    return fit_deepep_normal(D, T, row, size, t, TABLE_NOISE)


def _deepep_family(mode: str, op: str, sms: str | None, gpu_sms: int | None) -> GpuFamily:
    key = f"{mode}.{op}" + (f".{sms}" if sms else "")
    suite = f"deepep_{mode}"

    def rows(df: pd.DataFrame) -> pd.DataFrame:
        r = df[(df["suite"] == suite) & (df["op"] == op) & (df["world"] == 8)]
        if sms:
            r = r[r["strategy"] == sms]
        return r.reset_index(drop=True)

    def sizes(r: pd.DataFrame) -> F64:
        return np.array(
            [
                float(deepep_bytes(op, t, int(d), int(k), int(w), int(e), mode))
                for t, d, k, w, e in zip(r["T"], r["D"], r["K"], r["world"], r["E"], strict=True)
            ]
        )

    def fit(r: pd.DataFrame) -> GpuParts:
        size = sizes(r)
        ranges = {
            "tokens": _rng(r["T"]),
            "bytes": _rng(size),
            "hidden": _rng(r["D"]),
            "gpus": [8.0, 8.0],
        }
        return GpuParts(
            deepep={key: _deepep_form(mode, op, r, size, gpu_sms)},
            ranges={f"deepep.{mode}.{op}": ranges},
        )

    def predict(cm: CostModel, r: pd.DataFrame) -> F64:
        out = [
            cm.deepep_s(
                mode,
                op,
                t,
                int(d),
                int(k),
                int(w),
                sms=int(sms[3:]) if sms else None,
                experts=int(e),
            )
            for t, d, k, w, e in zip(r["T"], r["D"], r["K"], r["world"], r["E"], strict=True)
        ]
        return np.array([float(v) if v is not None else np.nan for v in out])

    return GpuFamily(f"deepep.{key}", rows, fit, predict, ("D", "K", "E"))


# -- attention core ----------------------------------------------------------------------

#: the attention kernels fitted: results op -> calibration key prefix ("" or "mla.")
ATTENTION_OPS = {"context": "", "context_mla": "mla."}
ATTENTION_SHAPE = ("E", "K", "D")


def attention_dims(rows: pd.DataFrame) -> tuple[F64, F64, F64, F64, F64, F64]:
    """``(batch, seq, heads, kv_heads, d_qk, d_v)`` of imported attention rows."""
    seq = rows["F"].to_numpy(dtype=np.float64)
    d_qk = rows["D"].to_numpy(dtype=np.float64)
    d_v = np.where(rows["op"].to_numpy() == "context_mla", float(work.MLA_CONTEXT_DIMS[1]), d_qk)
    heads, kv = (rows[c].to_numpy(dtype=np.float64) for c in ("E", "K"))
    return rows["T"].to_numpy(dtype=np.float64) / seq, seq, heads, kv, d_qk, d_v


def _attention_family(op: str, dtype: str) -> GpuFamily:
    key = f"{ATTENTION_OPS[op]}{dtype}"

    def rows(df: pd.DataFrame) -> pd.DataFrame:
        r = df[
            (df["suite"] == "attention") & (df["op"] == op) & (df["dtype"] == dtype)
            & (df["split"] == "causal") & (df["strategy"] == f"kv_{dtype}")
        ]  # fmt: skip
        return r.reset_index(drop=True)

    def fit(r: pd.DataFrame) -> GpuParts:
        b, s, h, kv, dqk, dv = attention_dims(r)
        t = r["median_s"].to_numpy(dtype=np.float64)
        ranges = {
            "tokens": _rng(b * s), "seq": _rng(s), "heads": _rng(h), "head_dim": _rng(dqk),
        }  # fmt: skip
        return GpuParts(
            attention={key: fit_attention(b, s, h, kv, dqk, dv, t, TABLE_NOISE)},
            ranges={f"attention.{key}": ranges},
        )

    def predict(cm: CostModel, r: pd.DataFrame) -> F64:
        b, s, h, kv, dqk, dv = attention_dims(r)
        out = cm.attention_s(b, s, h, kv, dqk, dv, dtype, mla=bool(ATTENTION_OPS[op]))
        return np.full(len(r), np.nan) if out is None else out

    # its 18k-row fits take several times any other family's
    return GpuFamily(f"attention.{key}", rows, fit, predict, ATTENTION_SHAPE, cost=10.0)


def families(
    df: pd.DataFrame,
    sms: int | None = None,
    peak_tflops: dict[str, float] | None = None,
    hbm_GBps: float | None = None,
) -> list[GpuFamily]:
    """The families the imported rows support, in report order (``sms``: the GPU's SMs,
    ``peak_tflops`` / ``hbm_GBps``: the silicon's bounds on the fused-MoE fit)."""
    out: list[GpuFamily] = []
    gem = df[df["suite"] == "gemm"]
    out += [_gemm_family(r) for r in GEMM_RECIPES if (gem["strategy"] == r).any()]
    moe = df[(df["suite"] == "moe") & (df["split"] == "balanced")]
    peaks = peak_tflops or {}
    dtypes = sorted(set(moe["dtype"].astype(str)))
    out += [_experts_family(d, peaks.get(d), hbm_GBps) for d in dtypes]
    recipes = set(moe["strategy"].astype(str)) if "strategy" in moe.columns else set()
    for recipe in sorted(recipes & set(EXPERT_RECIPES)):
        d = EXPERT_RECIPES[recipe][1]
        out.append(_experts_family(d, peaks.get(d), hbm_GBps, recipe))
    col = df[df["suite"] == "collective"]
    for (kind, gpus), _ in col.groupby(["op", "world"]):
        out.append(_collective_family(str(kind), int(gpus)))
    for mode in ("ll", "normal"):
        sub = df[(df["suite"] == f"deepep_{mode}") & (df["world"] == 8)]
        for op in ("dispatch", "combine"):
            s = sub[sub["op"] == op]
            if s.empty:
                continue
            if mode == "ll":
                out.append(_deepep_family(mode, op, None, sms))
            else:
                counts = sorted(set(s["strategy"].astype(str)), key=lambda x: int(x[3:]))
                out += [_deepep_family(mode, op, x, sms) for x in counts]
    att = df[(df["suite"] == "attention") & (df["split"] == "causal")]
    for op in ATTENTION_OPS:
        dts = set(att.loc[att["op"] == op, "dtype"].astype(str))
        out += [_attention_family(op, d) for d in sorted(dts) if d == "bf16"]
    return out


# -- cross-validation ----------------------------------------------------------------------


def shape_folds(
    rows: pd.DataFrame, shape: tuple[str, ...], folds: int = FOLDS
) -> NDArray[np.int64]:
    """Fold of each row: whole configurations (distinct ``shape`` values) dealt round-robin.

    Configurations are ordered by their median measured time, so each fold
    spans the range (and the ends are predicted by extrapolation, honestly).
    """
    cols = list(shape)
    code = rows.groupby(cols, sort=False).ngroup().to_numpy()  # groups by first appearance
    names = rows[cols].drop_duplicates().astype(str).agg("|".join, axis=1).to_numpy()
    med = rows["median_s"].groupby(code).median().to_numpy()
    # ties in the median keep the order of the "D|F|..." names (the folds are fixed by this)
    order = pd.Series(med, index=names).sort_index().sort_values()
    k = max(2, min(folds, len(order)))
    fold_of = {key: i % k for i, key in enumerate(order.index)}
    return np.array([fold_of[n] for n in names], dtype=np.int64)[code]


def cost_model(base: HardwareProfile, parts: GpuParts, source: CalibrationSource) -> CostModel:
    cal = Calibration(source=source, **parts.as_dict())
    return CostModel(base.model_copy(update={"calibration": cal}))


def heldout(
    fam: GpuFamily,
    rows: pd.DataFrame,
    base: HardwareProfile,
    source: CalibrationSource,
    keep: NDArray[np.bool_] | None = None,
) -> F64:
    """Seconds predicted for each row by a fit on the other folds (whole shapes held out).

    ``keep``: the rows a fit may use (flagged rows are predicted, never fitted).
    """
    ids = shape_folds(rows, fam.shape)
    use = np.ones(len(rows), dtype=bool) if keep is None else keep
    pred = np.full(len(rows), np.nan)
    for f in np.unique(ids):
        test = ids == f
        train = rows[~test & use].reset_index(drop=True)
        if len(train) < 2:
            continue
        cm = cost_model(base, fam.fit(train), source)
        pred[test] = fam.predict(cm, rows[test].reset_index(drop=True))
    return pred


def error(pred: F64, meas: F64) -> FamilyError:
    ok = np.isfinite(pred)
    ape = np.abs(pred[ok] - meas[ok]) / meas[ok]
    if ape.size == 0:
        return FamilyError(mape=0.0, max_ape=0.0, n=0)
    return FamilyError(
        mape=float(f"{ape.mean():.4g}"), max_ape=float(f"{ape.max():.4g}"), n=int(ape.size)
    )


@dataclass
class GpuFit:
    parts: GpuParts = field(default_factory=GpuParts)
    errors: dict[str, FamilyError] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # rows a family's rule flagged, and why


def fit_all(
    df: pd.DataFrame,
    base: HardwareProfile,
    source: CalibrationSource,
    progress: Callable[[str], None] | None = None,
    exclude: Callable[[str, pd.DataFrame], pd.DataFrame] | None = None,
    *,
    crossval: bool = True,
    flag_rows: bool = True,
    workers: int | None = None,
) -> GpuFit:
    """Fit and cross-validate every GPU family ``df`` supports.

    ``exclude(family, rows)`` may drop rows before fitting (the validation holds
    configurations out of the whole fit this way). A family's physical rule
    (:attr:`GpuFamily.flag`, unless ``flag_rows`` is False) flags rows before
    fitting: they are neither fitted nor in the family's error, and a note names
    them with the held-out error of the flagged rows and of all rows.
    ``workers``: processes the families are fitted in (default: one per core, at
    most :data:`MAX_WORKERS`; 1 fits in this process). Each family's fit is the
    same wherever it runs; the results are merged in the families' order.
    """
    global _JOB
    df = df[[c for c in FIT_COLUMNS if c in df.columns]]
    fams = families(df, base.gpu.sms, dict(base.gpu.peak_tflops), base.gpu.hbm_GBps)
    n = len(fams) if workers is None else workers
    n = max(1, min(n, os.cpu_count() or 1, MAX_WORKERS, len(fams)))
    if n > 1 and not _can_fork():
        n = 1
    _JOB = _Job(df, base, source, fams, exclude, crossval, flag_rows)
    out = GpuFit()
    try:
        # the slowest families start first, so the workers finish together
        order = sorted(range(len(fams)), key=lambda i: -fams[i].cost)
        if n == 1:
            _merge(out, fams, order, map(_fit_family, order), progress)
        else:  # fork: the workers inherit the job (the families hold closures)
            with ProcessPoolExecutor(n, mp_context=mp.get_context("fork")) as pool:
                _merge(out, fams, order, pool.map(_fit_family, order), progress)
    finally:
        _JOB = None
    return out


def _can_fork() -> bool:
    """Fork is available and safe here (not after CUDA was initialised in this process)."""
    if "fork" not in mp.get_all_start_methods():
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def _merge(
    out: GpuFit,
    fams: list[GpuFamily],
    order: list[int],
    done: Iterator[_Done],
    progress: Callable[[str], None] | None,
) -> None:
    """Each family's result (arriving in ``order``) into ``out``, in the families' order."""
    results: dict[int, _Done] = {}
    for i, res in zip(order, done, strict=True):
        if progress is not None:
            progress(fams[i].name)
        results[i] = res
    for i, fam in enumerate(fams):
        parts, err, note, kept = results[i]
        if parts is None:
            continue
        out.parts.update(parts)
        if err is not None:
            out.errors[fam.name] = err
        if note:
            out.notes.append(note)
        out.rows[fam.name] = kept


#: processes :func:`fit_all` fits families in, at most
MAX_WORKERS = 4


@dataclass(frozen=True)
class _Job:
    df: pd.DataFrame
    base: HardwareProfile
    source: CalibrationSource
    fams: list[GpuFamily]
    exclude: Callable[[str, pd.DataFrame], pd.DataFrame] | None
    crossval: bool
    flag_rows: bool


_JOB: _Job | None = None

_Done = tuple[GpuParts | None, FamilyError | None, str, int]


def _fit_family(i: int) -> _Done:
    """Family ``i`` of the current job: its parts, held-out error, note and rows fitted.

    BLAS runs one thread: the solver's small matrices gain nothing from more, and
    a forked worker's threads would only contend with the other workers (one
    thread: 7.8 s for the H200 tables here, two: 8.3 s; two workers: 3.8 s).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_family_now(i)


def _fit_family_now(i: int) -> _Done:
    job = _JOB
    assert job is not None
    fam = job.fams[i]
    rows = fam.rows(job.df)
    if job.exclude is not None:
        rows = job.exclude(fam.name, rows).reset_index(drop=True)
    keep = np.ones(len(rows), dtype=bool)
    note = ""
    if job.flag_rows and fam.flag is not None and len(rows):
        flagged, note = fam.flag(rows)
        keep = ~flagged
    if keep.sum() < 2:
        return None, None, "", 0
    parts = fam.fit(rows[keep].reset_index(drop=True))
    err = None
    if job.crossval:
        pred = heldout(fam, rows, job.base, job.source, keep)
        meas = rows["median_s"].to_numpy(dtype=np.float64)
        err = error(pred[keep], meas[keep])
        if note:
            flagged_err, all_err = error(pred[~keep], meas[~keep]), error(pred, meas)
            note += (
                f"; held-out MAPE of the flagged rows {flagged_err.mape:.1%}, "
                f"of all rows {all_err.mape:.1%}"
            )
            err = err.model_copy(update={"flagged": int((~keep).sum()), "mape_all": all_err.mape})
    return parts, err, note, int(keep.sum())


def alltoall_tiers(parts: GpuParts) -> dict[str, CommFit]:
    """The measured NCCL all-to-all on one node as the ``scaleup`` tier's link fit.

    nccl-tests' all-to-all size ``S`` is a rank's whole send buffer; the tier fit
    prices the bytes a rank sends to the other ranks, ``E = S (n-1)/n``, so the
    curve is rescaled exactly: ``bw_E(E) = bw_S(E n/(n-1)) (n-1)/n``.
    """
    counts = [int(k.rsplit(".", 1)[1]) for k in parts.collectives if k.startswith("alltoall.")]
    if not counts:
        return {}
    n = max(counts)
    fit = parts.collectives[f"alltoall.{n}"]
    share = (n - 1) / n
    c = fit.bandwidth_GBps
    curve = Curve(
        x=[float(f"{x * share:.6g}") for x in c.x], y=[float(f"{y * share:.6g}") for y in c.y]
    )
    regimes = [
        CommRegime(
            upto_bytes=None if r.upto_bytes is None else float(f"{r.upto_bytes * share:.6g}"),
            latency_us=r.latency_us,
            GBps=float(f"{r.GBps * share:.6g}"),
        )
        for r in fit.regimes
    ]
    return {"scaleup": CommFit(latency_us=fit.latency_us, bandwidth_GBps=curve, regimes=regimes)}
