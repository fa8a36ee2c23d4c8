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
  (per_expert + weights / weight_bw + activation bytes x activation_ps +
  flops_e / tflops(tokens_e))`` (:func:`fit_experts_line`). Folds: whole model
  shapes ``(D, F, E, K)``, every token count and EP size.
* ``collective.<kind>.<gpus>``: NCCL ``latency + bytes / bw(bytes)``. Folds:
  whole message sizes (both dtypes), stratified over the range.
* ``deepep.ll.<op>`` / ``deepep.normal.<op>.sms<N>``: ``latency + bytes /
  bw(bytes)``, bytes a rank sends to the other ranks. Folds: whole
  ``(D, K, E)`` configurations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from moesim.calibrate.gpu_forms import fit_deepep_ll, fit_deepep_normal, fit_regimes
from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import (
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
SUITES = ("gemm", "moe", "collective", "deepep_ll", "deepep_normal")
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
    ranges: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def update(self, other: GpuParts) -> None:
        for name in ("gemm", "gemm_table", "collectives", "deepep", "ranges"):
            getattr(self, name).update(getattr(other, name))

    def as_dict(self) -> dict[str, object]:
        return {
            n: getattr(self, n) for n in ("gemm", "gemm_table", "collectives", "deepep", "ranges")
        }


@dataclass(frozen=True)
class GpuFamily:
    """One fitted family: its rows, a fit, a CostModel prediction and the fold key (shape)."""

    name: str
    rows: Callable[[pd.DataFrame], pd.DataFrame]
    fit: Callable[[pd.DataFrame], GpuParts]
    predict: Callable[[CostModel, pd.DataFrame], F64]
    shape: tuple[str, ...]  # columns whose distinct values are one held-out configuration


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


def _moe_rows(dtype: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def rows(df: pd.DataFrame) -> pd.DataFrame:
        r = df[(df["suite"] == "moe") & (df["dtype"] == dtype) & (df["split"] == "balanced")]
        key = ["T", "D", "F", "E", "K", "world"]
        return r.loc[r.groupby(key)["median_s"].idxmin()].reset_index(drop=True) if len(r) else r

    return rows


@dataclass(frozen=True)
class ExpertRows:
    """The fused-MoE rows as the fit sees them (one item per row, counted ``active`` times).

    ``active``: active experts of the rank; ``tokens_e``: rows per active expert;
    ``flops_e``, ``wbytes_e``, ``act_e``: FLOPs, weight bytes and activation bytes
    of one active expert; ``scan``: routed rows x hidden the kernel scans.
    """

    active: F64
    tokens_e: F64
    flops_e: F64
    wbytes_e: F64
    scan: F64
    act_e: F64


def fit_experts_line(
    x: ExpertRows,
    t: F64,
    noise: float = TABLE_NOISE,
    peak_tflops: float | None = None,
    hbm_GBps: float | None = None,
) -> GemmFit:
    """``t = lat + scan_ps scan + active (per + wbytes_e / weight_bw + act_e act_ps
    + flops_e / tflops(tokens_e))``.

    Robust least squares on ``log t``. Every active expert of a balanced row has
    the same load, so a row is one item counted ``active`` times. The rate
    curve is read at the tokens per expert (tile and wave utilisation), the
    weight term prices the weight-bound decode regime, the activation term the
    bytes each row moves (it grows with ``D + F`` where the FLOPs grow with
    ``D F``, so small shapes pay more of it). Knots: two per decade. The
    silicon bounds the fit: ``peak_tflops`` (the dtype's dense peak) caps the
    rate curve and ``hbm_GBps`` the weight bandwidth (without them the other
    terms can trade time with these and push them past the hardware).
    """
    from scipy.optimize import least_squares

    from moesim.calibrate.fit import interp_matrix, knot_positions

    knots = np.unique([float(f"{v:.6g}") for v in knot_positions(x.tokens_e, 24)])
    W = interp_matrix(np.maximum(x.tokens_e, knots[0]), knots)
    rough = np.diff(np.eye(knots.size), 2, axis=0) * 0.1
    n = 5  # lat_us, per_us, weight ps/B, scan ps, activation ps/B; then log rate knots

    def pred(p: F64) -> F64:
        rate = (W @ np.exp(p[n:])) * 1e12
        per = p[1] * 1e-6 + (x.wbytes_e * p[2] + x.act_e * p[4]) * 1e-12 + x.flops_e / rate
        return p[0] * 1e-6 + x.scan * p[3] * 1e-12 + x.active * per

    def resid(p: F64) -> F64:
        return np.r_[np.log(np.maximum(pred(p), 1e-30) / t), rough @ p[n:]]

    tmin = float(np.min(t)) * 1e6
    x0 = np.r_[tmin * 0.3, 0.5, 1e12 / 3e12, 0.1, 0.0, np.full(knots.size, np.log(300.0))]
    w_lo = 1e3 / hbm_GBps if hbm_GBps else 1e12 / 2e13
    lo = np.r_[0.0, 0.0, w_lo, 0.0, 0.0, np.full(knots.size, -12.0)]
    top = np.log(peak_tflops) if peak_tflops else 12.0
    hi = np.r_[tmin, 1e3, 1e12 / 1e10, 1e3, 1e3, np.full(knots.size, top)]
    sol = least_squares(
        resid, np.clip(x0, lo, hi * 0.999), bounds=(lo, hi), loss="soft_l1", f_scale=noise
    )
    p = sol.x
    return GemmFit(
        scan_ps=_g(p[3]),
        latency_us=_g(p[0]),
        per_expert_us=_g(p[1]),
        tflops=Curve(x=list(knots), y=[_g(v) for v in np.exp(p[n:])]),
        weight_GBps=_g(1e3 / p[2]),
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
    )


def _experts_family(dtype: str, peak: float | None = None, hbm: float | None = None) -> GpuFamily:
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
        return GpuParts(gemm={dtype: g}, ranges={f"experts.{dtype}": ranges})

    def predict(cm: CostModel, rows: pd.DataFrame) -> F64:
        m = tokens_lists(rows)
        scanned = (rows["T"] * rows["K"]).to_numpy(
            dtype=np.float64
        )  # the collector's kernel sees all
        return np.array(
            [
                float(cm.experts_s(v, int(d), int(f), dtype, scanned_rows=s))
                for v, d, f, s in zip(m, rows["D"], rows["F"], scanned, strict=True)
            ]
        )

    return GpuFamily(f"experts.{dtype}", _moe_rows(dtype), fit, predict, ("D", "F", "E", "K"))


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
    fam: GpuFamily, rows: pd.DataFrame, base: HardwareProfile, source: CalibrationSource
) -> F64:
    """Seconds predicted for each row by a fit on the other folds (whole shapes held out)."""
    ids = shape_folds(rows, fam.shape)
    pred = np.full(len(rows), np.nan)
    for f in np.unique(ids):
        test = ids == f
        train = rows[~test].reset_index(drop=True)
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


def fit_all(
    df: pd.DataFrame,
    base: HardwareProfile,
    source: CalibrationSource,
    progress: Callable[[str], None] | None = None,
    exclude: Callable[[str, pd.DataFrame], pd.DataFrame] | None = None,
    *,
    crossval: bool = True,
) -> GpuFit:
    """Fit and cross-validate every GPU family ``df`` supports.

    ``exclude(family, rows)`` may drop rows before fitting (the validation holds
    configurations out of the whole fit this way).
    """
    out = GpuFit()
    df = df[[c for c in FIT_COLUMNS if c in df.columns]]
    for fam in families(df, base.gpu.sms, dict(base.gpu.peak_tflops), base.gpu.hbm_GBps):
        if progress is not None:
            progress(fam.name)
        rows = fam.rows(df)
        if exclude is not None:
            rows = exclude(fam.name, rows).reset_index(drop=True)
        if len(rows) < 2:
            continue
        out.parts.update(fam.fit(rows))
        if crossval:
            pred = heldout(fam, rows, base, source)
            out.errors[fam.name] = error(pred, rows["median_s"].to_numpy(dtype=np.float64))
        out.rows[fam.name] = len(rows)
    return out


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
