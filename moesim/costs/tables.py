"""Lookups over measured GPU tables: GEMM grids, collective and DeepEP curves, ranges.

Legend: Q = query points (any leading shape, flattened internally).
Everything is vectorised numpy; nothing here fits or reads files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moesim.config.hardware import AttentionFit, CommFit, CommRegime, GemmShapeSpec, GemmTable
from moesim.costs import work
from moesim.costs.curves import eval_curve

F64 = NDArray[np.float64]

#: collective -> (bus factor of the bytes, latency steps) of a ring on n GPUs, as
#: functions of n: nccl-tests' busbw factors (all_reduce 2(n-1)/n, others (n-1)/n)
RING: dict[str, tuple[Any, Any]] = {
    "all_reduce": (lambda n: 2.0 * (n - 1) / n, lambda n: 2 * (n - 1)),
    "all_gather": (lambda n: (n - 1) / n, lambda n: n - 1),
    "reduce_scatter": (lambda n: (n - 1) / n, lambda n: n - 1),
    "alltoall": (lambda n: (n - 1) / n, lambda n: 1),
}


def _axis(points: Sequence[float], q_Q: F64) -> tuple[NDArray[np.int64], NDArray[np.int64], F64]:
    """Lower/upper grid index and weight of the upper one, linear in log, clamped."""
    lx = np.log(np.asarray(points, dtype=np.float64))
    lq = np.log(np.clip(q_Q, points[0], points[-1]).astype(np.float64))
    if lx.size == 1:
        z = np.zeros(lq.shape, dtype=np.int64)
        return z, z, np.zeros(lq.shape)
    hi = np.clip(np.searchsorted(lx, lq, side="right"), 1, lx.size - 1)
    lo = hi - 1
    w = (lq - lx[lo]) / (lx[hi] - lx[lo])
    return lo, hi, np.clip(w, 0.0, 1.0)


def table_s(tab: GemmTable, m: ArrayLike, n: ArrayLike, k: ArrayLike) -> F64:
    """Seconds of GEMMs ``m x n x k`` from ``tab`` (broadcast shapes), log-trilinear.

    Inside the grid: interpolated. Below an axis's smallest point: that point's time
    (a smaller GEMM is no faster once launch and tile bound). Above its largest:
    the largest point's time times ``q / largest`` on each such axis, as the GEMM
    would run in pieces of the largest measured size (the grid's top is saturated;
    clamping there priced a 152k-column LM head at 1.6x H100's FP8 peak).
    """
    mq, nq, kq = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (m, n, k)))
    shape = mq.shape
    mq, nq, kq = mq.ravel(), nq.ravel(), kq.ravel()
    beyond = np.ones(mq.shape)
    for pts, q in ((tab.m, mq), (tab.n, nq), (tab.k, kq)):
        beyond *= np.maximum(q / float(pts[-1]), 1.0)
    L = np.log(np.asarray(tab.latency_us, dtype=np.float64)).reshape(
        len(tab.m), len(tab.n), len(tab.k)
    )
    (m0, m1, wm), (n0, n1, wn), (k0, k1, wk) = (
        _axis(tab.m, mq),
        _axis(tab.n, nq),
        _axis(tab.k, kq),
    )
    out = np.zeros(mq.shape)
    for im, fm in ((m0, 1 - wm), (m1, wm)):
        for i_n, fn in ((n0, 1 - wn), (n1, wn)):
            for ik, fk in ((k0, 1 - wk), (k1, wk)):
                out += fm * fn * fk * L[im, i_n, ik]
    return (np.exp(out) * 1e-6 * beyond).reshape(shape)


def attention_rate(fit: AttentionFit, seq: ArrayLike, head_dim: ArrayLike, tiles: ArrayLike) -> F64:
    """TFLOP/s of :class:`AttentionFit` at each query point (broadcast shapes).

    ``log tflops`` bilinear in ``(log seq, log head_dim)`` over the grid, times the
    occupancy read linearly in log tiles; every axis clamps at its edges.
    """
    sq, hq, tq = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (seq, head_dim, tiles))
    )
    shape = sq.shape
    s_lo, s_hi, ws = _axis(fit.seq, sq.ravel())
    h_lo, h_hi, wh = _axis(fit.head_dim, hq.ravel())
    L = np.log(np.asarray(fit.tflops, dtype=np.float64)).reshape(len(fit.seq), len(fit.head_dim))
    low = L[s_lo, h_lo] * (1 - wh) + L[s_lo, h_hi] * wh
    high = L[s_hi, h_lo] * (1 - wh) + L[s_hi, h_hi] * wh
    t_lo, t_hi, wt = _axis(fit.tiles, tq.ravel())
    occ = np.log(np.asarray(fit.occupancy, dtype=np.float64))
    log_rate = low * (1 - ws) + high * ws + occ[t_lo] * (1 - wt) + occ[t_hi] * wt
    return np.asarray(np.exp(log_rate).reshape(shape), dtype=np.float64)


def attention_s(
    fit: AttentionFit,
    batch: ArrayLike,
    seq: ArrayLike,
    heads: ArrayLike,
    kv_heads: ArrayLike,
    d_qk: ArrayLike,
    d_v: ArrayLike,
) -> F64:
    """Seconds of the causal attention forward of ``batch`` sequences of ``seq`` tokens
    (``heads`` query heads, ``kv_heads`` KV heads; broadcast shapes): the fit's
    ``latency + bytes_ps bytes + flops / rate``."""
    flops = work.attention_core_flops(batch, seq, heads, d_qk, d_v)
    nbytes = work.attention_core_bytes(batch, seq, heads, kv_heads, d_qk, d_v)
    rate = attention_rate(fit, seq, d_qk, work.attention_tiles(batch, seq, heads, fit.tile))
    return np.asarray(
        fit.latency_us * 1e-6 + nbytes * fit.bytes_ps * 1e-12 + flops / (rate * 1e12),
        dtype=np.float64,
    )


def shape_efficiency(spec: GemmShapeSpec, m: ArrayLike, n: ArrayLike) -> F64:
    """Fraction of the large-GEMM rate a ``m x n`` output keeps (tile padding, last wave)."""
    mq = np.maximum(np.asarray(m, dtype=np.float64), 1.0)
    nq = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    tm, tn = np.ceil(mq / spec.tile_m), np.ceil(nq / spec.tile_n)
    pad = mq * nq / (tm * tn * spec.tile_m * spec.tile_n)
    waves = tm * tn / spec.compute_units
    return np.asarray(pad * waves / np.ceil(waves), dtype=np.float64)


def curve_s(fit: CommFit, nbytes: ArrayLike) -> F64:
    """``latency + bytes / bandwidth(bytes)`` of a fitted line (zero bytes: zero).

    A fit with ``regimes`` takes the line of the regime whose range holds ``bytes``.
    """
    b = np.asarray(nbytes, dtype=np.float64)
    if fit.regimes:
        return np.where(b > 0, regimes_s(fit.regimes, b), 0.0)
    bw = eval_curve(fit.bandwidth_GBps, np.maximum(b, 1.0)) * 1e9
    return np.where(b > 0, fit.latency_us * 1e-6 + b / bw, 0.0)


def regime_index(regimes: list[CommRegime], nbytes: ArrayLike) -> NDArray[np.intp]:
    """Index of the regime whose range holds each size (the last one has no end)."""
    ends = np.array([r.upto_bytes or np.inf for r in regimes[:-1]])
    return np.searchsorted(ends, np.asarray(nbytes, dtype=np.float64), side="left")


def regimes_s(regimes: list[CommRegime], nbytes: ArrayLike) -> F64:
    """``latency_r + bytes / GBps_r`` for the regime ``r`` whose range holds each size."""
    b = np.asarray(nbytes, dtype=np.float64)
    i = regime_index(regimes, b)
    lat = np.array([r.latency_us for r in regimes]) * 1e-6
    bw = np.array([r.GBps for r in regimes]) * 1e9
    return np.asarray(lat[i] + b / bw[i], dtype=np.float64)


def curve_latency_s(fit: CommFit, nbytes: float) -> float:
    """The fixed part of :func:`curve_s` at ``nbytes``: the latency of its regime."""
    if not fit.regimes:
        return fit.latency_us * 1e-6
    return fit.regimes[int(regime_index(fit.regimes, nbytes))].latency_us * 1e-6


def nearest_key(keys: list[str], prefix: str, gpus: int) -> tuple[str | None, int | None]:
    """The ``<prefix>.<n>`` key whose GPU count is nearest ``gpus`` (in log), and that count."""
    counts = [int(k.rsplit(".", 1)[1]) for k in keys if k.rsplit(".", 1)[0] == prefix]
    if not counts:
        return None, None
    best = min(counts, key=lambda c: (abs(math.log(c / max(gpus, 1))), -c))
    return f"{prefix}.{best}", best


def outside(ranges: dict[str, list[float]], values: dict[str, ArrayLike]) -> list[dict[str, Any]]:
    """Axes where ``values`` leave the measured ``[lo, hi]``, with the factor beyond the edge."""
    out = []
    for axis, v in values.items():
        if axis not in ranges:
            continue
        lo, hi = ranges[axis]
        arr = np.asarray(v, dtype=np.float64)
        if arr.size == 0:
            continue
        vmin, vmax = float(arr.min()), float(arr.max())
        if vmax > hi * (1 + 1e-9):
            out.append({"axis": axis, "value": vmax, "lo": lo, "hi": hi, "factor": vmax / hi})
        elif vmin < lo * (1 - 1e-9) and vmin > 0:
            out.append({"axis": axis, "value": vmin, "lo": lo, "hi": hi, "factor": lo / vmin})
    return out
