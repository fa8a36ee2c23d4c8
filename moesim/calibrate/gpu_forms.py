"""Fitted forms of the measured GPU communication families (:mod:`moesim.calibrate.gpu`).

* :func:`fit_regimes`: an NCCL collective as size regimes (NCCL picks a
  protocol and algorithm by message size: LL, LL128, Simple; ring or tree),
  each its own ``latency + bytes / bandwidth`` line; the boundaries are where
  the fit puts them (segmented regression over the measured sizes).
* :func:`fit_deepep_ll`: DeepEP low-latency ``latency + per_expert E + bytes /
  bw + sm_ps T K D / min(E, SMs)`` (one SM per expert copies its tokens' rows).
* :func:`fit_deepep_normal`: DeepEP normal ``latency + per_hidden D + B / bw(B)``
  with ``B`` the bytes sent plus ``local_copies`` rows per token through the
  rank's own buffer.

Every fit minimises the relative error with a robust loss at the tables' noise
scale; the parameters land in :class:`~moesim.config.hardware.CommFit` /
:class:`~moesim.config.hardware.DeepEPFit`, which :class:`moesim.costs.CostModel`
prices.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import least_squares, nnls

from moesim.calibrate.fit import interp_matrix
from moesim.config.hardware import AttentionFit, CommFit, CommRegime, Curve, DeepEPFit

F64 = NDArray[np.float64]
#: most size regimes of one collective (NCCL's three protocols)
MAX_REGIMES = 3
#: fewest distinct sizes one regime is fitted on
MIN_SIZES = 3
#: a regime is added only if it lowers the summed |relative error| by this share
REGIME_GAIN = 0.15
#: bandwidth stored when a fit sees no bandwidth limit (s/byte term fitted as 0)
NO_LIMIT_GBps = 1e6


def _g(v: float) -> float:
    return float(f"{v:.6g}")


def robust_nnls(A: F64, t: F64, noise: float, iters: int = 4) -> F64:
    """Non-negative ``p`` minimising ``sum rho((A p) / t - 1)``, ``rho`` Huber at ``noise``.

    Columns are scaled to unit norm for conditioning; iteratively reweighted.
    """
    X = A / t[:, None]
    scale = np.linalg.norm(X, axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Xs = X / scale
    w = np.ones(t.size)
    p = np.zeros(A.shape[1])
    for _ in range(iters):
        sw = np.sqrt(w)
        p, _ = nnls(Xs * sw[:, None], sw, maxiter=50 * A.shape[1])
        r = np.abs(Xs @ p - 1.0)
        w = np.where(r <= noise, 1.0, noise / np.maximum(r, 1e-12))
    return np.asarray(p / scale, dtype=np.float64)


# -- NCCL collectives: size regimes ------------------------------------------------------


Line = tuple[float, float, float]


def _nonneg_lines(A11: F64, A12: F64, A22: F64, r1: F64, r2: F64) -> tuple[F64, F64]:
    """Exact non-negative least squares of many two-column problems from their normal
    equations (``A = X^T W X``, ``r = X^T W 1``): the unconstrained optimum where both
    parts are >= 0, else the better one-column fit (the KKT points of two variables)."""
    det = A11 * A22 - A12**2
    ok = det > 1e-12 * A11 * A22
    sdet = np.where(ok, det, 1.0)
    p1, p2 = (A22 * r1 - A12 * r2) / sdet, (A11 * r2 - A12 * r1) / sdet
    free = ok & (p1 >= 0) & (p2 >= 0)
    q1, q2 = np.maximum(r1, 0) / A11, np.maximum(r2, 0) / A22  # one column each
    only1 = q1 * r1 >= q2 * r2  # objective drop of a one-column fit: q r
    return (
        np.where(free, p1, np.where(only1, q1, 0.0)),
        np.where(free, p2, np.where(only1, 0.0, q2)),
    )


def _segments(b: F64, t: F64, sizes: F64, noise: float) -> dict[tuple[int, int], Line]:
    """Every run of at least :data:`MIN_SIZES` consecutive sizes as its own robust line,
    ``latency + s_per_byte b`` (Huber-reweighted non-negative least squares on the
    relative error, four rounds), all runs at once: ``(i, j) -> (lat, s/B, sum |rel err|)``."""
    n = sizes.size
    ij = np.array([(i, j) for i in range(n) for j in range(i + MIN_SIZES - 1, n)], dtype=int)
    if ij.size == 0:
        return {}
    M = ((b[None, :] >= sizes[ij[:, :1]]) & (b[None, :] <= sizes[ij[:, 1:]])).astype(float)
    x1, x2 = 1.0 / t, b / t
    w = M.copy()
    for _ in range(4):
        p1, p2 = _nonneg_lines(w @ (x1 * x1), w @ (x1 * x2), w @ (x2 * x2), w @ x1, w @ x2)
        r = np.abs(p1[:, None] * x1 + p2[:, None] * x2 - 1.0)
        w = M * np.where(r <= noise, 1.0, noise / np.maximum(r, 1e-12))
    err = (M * r).sum(axis=1)
    return {
        (int(i), int(j)): (float(a), float(c), float(e))
        for (i, j), a, c, e in zip(ij, p1, p2, err, strict=True)
    }


def _partition(seg: dict[tuple[int, int], Line], n: int, k: int) -> tuple[float, list[int]]:
    """Best split of sizes ``0..n-1`` into ``k`` runs (dynamic programming): cost, run ends."""
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}
    for j in range(n):
        if (0, j) in seg:
            best[(1, j)] = (seg[(0, j)][2], [j])
    for r in range(2, k + 1):
        for j in range(n):
            cands = [
                (best[(r - 1, i - 1)][0] + seg[(i, j)][2], best[(r - 1, i - 1)][1] + [j])
                for i in range(1, j + 1)
                if (r - 1, i - 1) in best and (i, j) in seg
            ]
            if cands:
                best[(r, j)] = min(cands, key=lambda c: c[0])
    return best.get((k, n - 1), (np.inf, []))


def _boundary(lo: float, hi: float, a: Line, c: Line) -> float:
    """Where regime ``a`` hands over to ``c`` between measured sizes ``lo`` and ``hi``.

    Between the sizes each regime was measured at, the faster line holds (NCCL's
    tuner picks the faster protocol): the crossing of the two lines if it lies
    in the gap, else the gap's end that leaves the whole gap to the faster one.
    """
    dg = a[1] - c[1]
    if dg > 0:
        x = (c[0] - a[0]) / dg
        if lo < x < hi:
            return float(x)
    mid = float(np.sqrt(lo * hi))
    a_faster = a[0] + a[1] * mid <= c[0] + c[1] * mid
    return float(hi * (1.0 - 1e-6) if a_faster else lo * (1.0 + 1e-6))


def fit_regimes(size: F64, t: F64, noise: float) -> CommFit:
    """Size regimes ``latency_r + bytes / GBps_r``: up to :data:`MAX_REGIMES`, at least
    :data:`MIN_SIZES` sizes each, a regime added only where it cuts the summed
    relative error by :data:`REGIME_GAIN`."""
    b, tt = np.asarray(size, dtype=np.float64), np.asarray(t, dtype=np.float64)
    sizes = np.unique(b)
    seg = _segments(b, tt, sizes, noise)
    cost, ends = _partition(seg, sizes.size, 1)
    for k in range(2, MAX_REGIMES + 1):
        c_k, e_k = _partition(seg, sizes.size, k)
        if c_k < cost * (1.0 - REGIME_GAIN):
            cost, ends = c_k, e_k
    starts = [0] + [e + 1 for e in ends[:-1]]
    lines = [seg[(s, e)] for s, e in zip(starts, ends, strict=True)]
    regimes = []
    for r, (line, end) in enumerate(zip(lines, ends, strict=True)):
        last = r == len(lines) - 1
        gap = float(sizes[end]), float(sizes[min(end + 1, sizes.size - 1)])
        upto = None if last else _boundary(*gap, line, lines[r + 1])
        gbps = 1.0 / (line[1] * 1e9) if line[1] > 0 else NO_LIMIT_GBps
        regimes.append(
            CommRegime(
                upto_bytes=None if upto is None else _g(upto),
                latency_us=_g(line[0] * 1e6),
                GBps=_g(min(gbps, NO_LIMIT_GBps)),
            )
        )
    return CommFit(
        latency_us=regimes[0].latency_us,
        bandwidth_GBps=render_regimes(regimes, sizes),
        regimes=regimes,
    )


def render_regimes(regimes: list[CommRegime], sizes: F64) -> Curve:
    """The regimes as a bandwidth curve over ``sizes`` (8 points a decade), read with
    the first regime's latency: ``bw(b) = b / (t(b) - latency_0)``."""
    from moesim.costs.tables import regimes_s

    lo, hi = float(np.min(sizes)), float(np.max(sizes))
    x = np.unique(np.geomspace(lo, hi, max(2, int(np.ceil(8 * np.log10(hi / lo))) + 1)))
    t = regimes_s(regimes, x) - regimes[0].latency_us * 1e-6
    y = x / np.maximum(t, x / (NO_LIMIT_GBps * 1e9)) / 1e9
    return Curve(x=[_g(v) for v in x], y=[_g(v) for v in y])


# -- DeepEP --------------------------------------------------------------------------------


def fit_deepep_ll(
    T: F64, D: F64, K: F64, E: F64, nbytes: F64, t: F64, sms: int, noise: float
) -> DeepEPFit:
    """``t = latency + per_expert E + bytes / bw + sm_ps T K D / min(E, sms)``, all >= 0."""
    work = T * K * D / np.minimum(E, sms)
    A = np.stack([np.ones_like(T), E, nbytes, work], axis=1)
    lat, per_e, s_per_b, s_per_elem = robust_nnls(A, t, noise)
    gbps = min(1.0 / (s_per_b * 1e9), NO_LIMIT_GBps) if s_per_b > 0 else NO_LIMIT_GBps
    return DeepEPFit(
        latency_us=_g(lat * 1e6),
        per_expert_us=_g(per_e * 1e6),
        bandwidth_GBps=Curve(x=[_g(float(np.min(nbytes)))], y=[_g(gbps)]),
        sm_ps=_g(s_per_elem * 1e12),
        sms=sms,
    )


def fit_deepep_normal(
    D: F64, T: F64, row: F64, nbytes: F64, t: F64, noise: float, smooth: float = 0.3
) -> DeepEPFit:
    """``t = latency + per_hidden D + B / bw(B)``, ``B = nbytes + local_copies T row``.

    ``bw`` a curve with knots two per decade over the bytes (linear in log
    bytes, a second-difference penalty ``smooth`` on log bandwidth); robust
    least squares on ``log t``.
    """
    lo, hi = float(np.min(nbytes)), float(np.max(nbytes)) * 3.0
    knots = np.geomspace(lo, hi, max(2, int(np.ceil(2 * np.log10(hi / lo))) + 1))
    rough = np.diff(np.eye(knots.size), 2, axis=0) * smooth
    lk, Trow = np.log(knots), T * row

    def terms(p: F64) -> tuple[F64, F64, F64, F64]:
        """Predicted seconds, bytes ``B``, ``bw(B)`` (B/s) and ``W`` (``bw = W @ y``)."""
        B = nbytes + p[2] * Trow
        W = interp_matrix(B, knots)  # clamps outside the knots
        bw = W @ np.exp(p[3:]) * 1e9
        return p[0] * 1e-6 + p[1] * 1e-9 * D + B / bw, B, bw, W

    def resid(p: F64) -> F64:
        return np.r_[np.log(np.maximum(terms(p)[0], 1e-30) / t), rough @ p[3:]]

    def jac(p: F64) -> F64:
        pr, B, bw, W = terms(p)
        y = np.exp(p[3:])
        lb = np.log(B)
        j = np.clip(np.searchsorted(lk, lb, side="right") - 1, 0, lk.size - 2)
        inside = (lb > lk[0]) & (lb < lk[-1])
        slope = np.where(inside, (y[j + 1] - y[j]) / (lk[j + 1] - lk[j]), 0.0) * 1e9  # dbw/dlnB
        d_copies = Trow / bw * (1.0 - slope / bw)
        d_knots = -(B / bw**2)[:, None] * W * (y * 1e9)[None, :]
        top = np.column_stack([np.full_like(pr, 1e-6), 1e-9 * D, d_copies, d_knots]) / pr[:, None]
        bottom = np.column_stack([np.zeros((rough.shape[0], 3)), rough])
        return np.vstack([top, bottom])

    tmin = float(np.min(t)) * 1e6
    x0 = np.r_[0.5 * tmin, 0.0, 0.5, np.full(knots.size, np.log(100.0))]
    lo_b = np.r_[0.0, 0.0, 0.0, np.full(knots.size, -5.0)]
    hi_b = np.r_[tmin, 1e3, 8.0, np.full(knots.size, 12.0)]
    sol = least_squares(resid, x0, jac=jac, bounds=(lo_b, hi_b), loss="soft_l1", f_scale=noise)
    p = sol.x
    return DeepEPFit(
        latency_us=_g(p[0]),
        per_hidden_ns=_g(p[1]),
        local_copies=_g(p[2]),
        bandwidth_GBps=Curve(x=[_g(v) for v in knots], y=[_g(v) for v in np.exp(p[3:])]),
    )


# -- attention core (FMHA forward) ------------------------------------------------------

#: knots per decade of the attention rate's sequence and tile axes, and their smoothing
ATTN_KNOTS_PER_DECADE = 3
ATTN_SMOOTH = 0.3


def _log_knots(x: F64, per_decade: int) -> F64:
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi <= lo * (1 + 1e-9):
        return np.array([lo])
    n = int(np.ceil(per_decade * np.log10(hi / lo) - 1e-9)) + 1
    return np.unique([_g(v) for v in np.geomspace(lo, hi, max(n, 2))])


def _second_diff(n: int) -> F64:
    return np.diff(np.eye(n), 2, axis=0) if n > 2 else np.zeros((0, n))


def fit_attention(
    batch: F64,
    seq: F64,
    heads: F64,
    kv_heads: F64,
    d_qk: F64,
    d_v: F64,
    t: F64,
    noise: float,
    tile: int | None = None,
) -> AttentionFit:
    """:class:`~moesim.config.hardware.AttentionFit` of measured causal FMHA calls.

    ``t = latency + bytes_ps bytes + flops / rate``, ``log rate`` a bilinear surface over
    (log sequence, log q/k head dim) plus a curve over log query tiles (0 at the
    last knot: the surface is the rate of a full GPU); the knots three per decade
    (every measured head dim), a second-difference penalty :data:`ATTN_SMOOTH` along
    the sequence and tile axes. Robust least squares on ``log t`` at the tables'
    noise scale, started from the linear fit of ``log(flops / t)`` on the larger calls.
    """
    from scipy import sparse
    from scipy.optimize import least_squares

    from moesim.costs import work

    tile = tile or work.ATTN_TILE
    flops = work.attention_core_flops(batch, seq, heads, d_qk, d_v)
    nbytes = work.attention_core_bytes(batch, seq, heads, kv_heads, d_qk, d_v)
    tiles = work.attention_tiles(batch, seq, heads, tile)
    ks, kh = _log_knots(seq, ATTN_KNOTS_PER_DECADE), np.unique(d_qk.astype(np.float64))
    kt = _log_knots(tiles, ATTN_KNOTS_PER_DECADE)
    ns, nh, nt = ks.size, kh.size, kt.size
    Ws, Wh, Wt = interp_matrix(seq, ks), interp_matrix(d_qk, kh), interp_matrix(tiles, kt)
    surface = (Ws[:, :, None] * Wh[:, None, :]).reshape(t.size, ns * nh)
    A = sparse.csr_matrix(np.hstack([surface, Wt[:, :-1]]))  # at most 6 non-zeros a row
    R_s, R_t = np.kron(_second_diff(ns), np.eye(nh)), _second_diff(nt)[:, :-1]
    R = np.zeros((R_s.shape[0] + R_t.shape[0], 2 + A.shape[1]))
    R[: R_s.shape[0], 2 : 2 + ns * nh] = R_s * ATTN_SMOOTH
    R[R_s.shape[0] :, 2 + ns * nh :] = R_t * ATTN_SMOOTH
    R_sp = sparse.csr_matrix(R)

    def pred(p: F64) -> tuple[F64, F64]:
        rate = np.exp(A @ p[2:]) * 1e12
        return p[0] * 1e-6 + nbytes * p[1] * 1e-12 + flops / rate, rate

    def resid(p: F64) -> F64:
        return np.r_[np.log(np.maximum(pred(p)[0], 1e-30) / t), R @ p]

    def jac(p: F64) -> sparse.csr_matrix:
        """Sparse (the rate's design has a few non-zeros a row), so each solver step
        costs a pass over those, not over rows x parameters."""
        pr, rate = pred(p)
        fixed = np.column_stack([np.full(t.size, 1e-6), nbytes * 1e-12]) / pr[:, None]
        d_rate = sparse.diags(-(flops / rate) / pr) @ A
        return sparse.vstack([sparse.hstack([fixed, d_rate]), R_sp]).tocsr()

    big = flops >= np.median(flops)
    lhs = np.vstack([A[big].toarray(), R[:, 2:]])
    rhs = np.r_[np.log(flops[big] / t[big] / 1e12), np.zeros(R.shape[0])]
    start = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    x0 = np.r_[0.5 * float(np.min(t)) * 1e6, 0.3, start]
    lo = np.r_[0.0, 0.0, np.full(A.shape[1], -20.0)]
    hi = np.r_[float(np.min(t)) * 1e6, 1e3, np.full(A.shape[1], 20.0)]
    sol = least_squares(
        resid, np.clip(x0, lo, hi * 0.999), jac=jac, bounds=(lo, hi), loss="soft_l1",
        f_scale=noise, tr_solver="lsmr", x_scale="jac",
    )  # fmt: skip
    p = sol.x
    grid = np.exp(p[2 : 2 + ns * nh])
    occ = np.exp(np.r_[p[2 + ns * nh :], 0.0])
    return AttentionFit(
        latency_us=_g(p[0]),
        bytes_ps=_g(p[1]),
        tile=tile,
        seq=[_g(v) for v in ks],
        head_dim=[_g(v) for v in kh],
        tflops=[_g(v) for v in grid],
        tiles=[_g(v) for v in kt],
        occupancy=[_g(v) for v in occ],
    )
