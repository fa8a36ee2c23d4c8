"""Least-squares fit of the one cost line every calibrated family shares.

A call (one row) is a sum over items (one memory op, one message, or each
expert with tokens) of a size-dependent term plus fixed costs::

    t_row = latency + sum_items [per_item + size / rate(size)]

``rate`` is a :class:`~moesim.config.hardware.Curve`: knots log-spaced over the
measured sizes, linear in ``log size`` between them and flat outside, exactly
as :func:`moesim.costs.curves.eval_curve` evaluates it. The fit minimises the
relative error (``log`` of predicted over measured time) with a robust loss
whose scale is the measured timing noise, so the curve is what
:class:`moesim.costs.CostModel` prices, with no hand-picked rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import least_squares, nnls

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

#: significant digits kept in fitted numbers, so a profile read back from YAML
#: prices exactly what the fit predicted
DIGITS = 6
#: weight of the second-difference penalty on log(rate) between adjacent knots:
#: keeps a knot that few sizes inform close to its neighbours (a smoothness prior,
#: small next to a 1 % relative residual)
SMOOTHNESS = 1e-2
#: densest knot spacing of a rate curve (see :func:`knot_positions`)
KNOTS_PER_DECADE = 2


@dataclass(frozen=True)
class Items:
    """What each row (call) is made of: item ``i`` has size ``size_I[i]``, row ``row_I[i]``."""

    row_I: I64
    size_I: F64
    n_rows: int

    @classmethod
    def one_per_row(cls, size_R: ArrayLike) -> Items:
        size = np.asarray(size_R, dtype=np.float64)
        return cls(np.arange(size.size, dtype=np.int64), size, int(size.size))

    @classmethod
    def from_matrix(cls, size_RE: ArrayLike) -> Items:
        """Rows of a ``[R, E]`` matrix; entries <= 0 (experts without tokens) are no items."""
        m = np.asarray(size_RE, dtype=np.float64)
        rows, cols = np.nonzero(m > 0)
        return cls(rows.astype(np.int64), m[rows, cols], int(m.shape[0]))


@dataclass(frozen=True)
class LineFit:
    """``t = latency_s + extra / extra_rate + sum_items [per_item_s + size / rate(size)]``.

    ``extra`` is an optional per-row covariate (the router GEMM's FLOPs of a
    gating call) priced at a constant fitted rate; ``extra_rate`` is None when
    the fit has no such term.
    """

    latency_s: float
    per_item_s: float
    knots_x: tuple[float, ...]
    knots_y: tuple[float, ...]  # rate in ``unit`` per second (GB/s, TFLOP/s)
    unit: float  # 1e9 for bytes -> GB/s, 1e12 for FLOPs -> TFLOP/s
    extra_rate: float | None = None  # TFLOP/s of the extra term

    def rate(self, size: ArrayLike) -> F64:
        """The rate curve at ``size``, in units per second (linear in log size, clamped)."""
        xq = np.log(np.maximum(np.asarray(size, dtype=np.float64), 1e-30))
        ys = np.asarray(self.knots_y)
        return np.interp(xq, np.log(np.asarray(self.knots_x)), ys) * self.unit

    def predict(self, items: Items, extra_R: ArrayLike | None = None) -> F64:
        """Seconds per row."""
        term = self.per_item_s + items.size_I / self.rate(items.size_I)
        per_row: F64 = np.bincount(items.row_I, term, minlength=items.n_rows).astype(np.float64)
        if self.extra_rate is not None and extra_R is not None:
            per_row = per_row + np.asarray(extra_R, dtype=np.float64) / (self.extra_rate * 1e12)
        return np.asarray(self.latency_s + per_row, dtype=np.float64)


def knot_positions(size_I: ArrayLike, max_knots: int) -> F64:
    """Up to :data:`KNOTS_PER_DECADE` knots per decade of size, log-spaced over the sizes.

    A cache tier ends in less than a decade of size (a 2-core EPYC copies at
    ~50 GB/s with 16 MB moved, ~17 GB/s with 134 MB), which one knot per decade
    cannot place; ``max_knots`` caps the count (:func:`fit_line` tries every
    count up to it and keeps the one with the best small-sample criterion, so
    sparse or noisy data still get few knots).
    """
    s = np.asarray(size_I, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo * (1 + 1e-9):
        return np.array([lo])
    n = int(np.ceil(KNOTS_PER_DECADE * np.log10(hi / lo) - 1e-9)) + 1
    n = max(1, min(n, max_knots))
    if n == 1:
        return np.array([float(np.sqrt(lo * hi))])
    return np.geomspace(lo, hi, n)


def interp_matrix(size_I: F64, knots_x: F64) -> F64:
    """``W`` with ``W @ y == np.interp(log size, log knots_x, y)`` for any ``y``."""
    lx = np.log(np.asarray(knots_x, dtype=np.float64))
    ls = np.log(np.asarray(size_I, dtype=np.float64)).ravel()
    W = np.zeros((ls.size, lx.size))
    if lx.size == 1:
        W[:, 0] = 1.0
        return W
    # left knot of each size's interval; sizes outside the knots clamp to the end knot
    j = np.clip(np.searchsorted(lx, ls, side="right") - 1, 0, lx.size - 2)
    frac = np.clip((ls - lx[j]) / (lx[j + 1] - lx[j]), 0.0, 1.0)
    rows = np.arange(ls.size)
    W[rows, j] = 1.0 - frac
    W[rows, j + 1] += frac
    return W


def noise_scale(median_s: ArrayLike, p20_s: ArrayLike, p80_s: ArrayLike) -> float:
    """Typical relative timing spread: median over rows of (p80 - p20) / median / 2.

    Rows without a spread give 1 %; the result is at least 0.1 % (the loss scale
    must be positive).
    """
    med = np.asarray(median_s, dtype=np.float64)
    spread = (np.asarray(p80_s, dtype=np.float64) - np.asarray(p20_s, dtype=np.float64)) / med
    spread = spread[np.isfinite(spread) & (spread >= 0)]
    if spread.size == 0:
        return 0.01
    return float(max(np.median(spread) / 2.0, 1e-3))


#: |log rate| bound (rates within 1e-12..1e12 GB/s or TFLOP/s): only keeps the solver
#: finite when a size term is negligible next to the fixed costs
RATE_RANGE = float(np.log(1e12))
#: relative tolerances of the solver (scipy's default 1e-8 took 25 % longer here and
#: gave the same rounded lines and held-out errors)
LSQ_TOL = 1e-5
#: the fixed terms, in the order the data must be rich enough to free them
TERMS = ("latency", "extra", "per_item")


def fit_line(
    items: Items,
    t_R: ArrayLike,
    *,
    unit: float,
    per_item: bool,
    noise: float = 0.01,
    extra_R: ArrayLike | None = None,
    latency_prior_s: float = 0.0,
) -> LineFit:
    """Fit latency, optional extra and per-item terms and the rate curve to seconds ``t_R``.

    A term is fitted only when the rows have enough distinct shapes to tell it
    apart (latency: 2, then one more per term); otherwise latency is fixed at
    ``latency_prior_s`` and the others at 0, so one or two measured shapes still
    give a usable line. The number of curve knots (up to two per decade), and
    whether the latency is fitted or left at the prior, are chosen by the lowest
    small-sample Akaike criterion, so noisy timings get a simpler line. Needs at
    least one row, all times > 0. The result is rounded to :data:`DIGITS`
    significant digits.
    """
    t = np.asarray(t_R, dtype=np.float64)
    extra = np.zeros(items.n_rows) if extra_R is None else np.asarray(extra_R, dtype=np.float64)
    distinct = _distinct_rows(items, extra)
    free = _free_terms(distinct, per_item, extra_R is not None)
    cols = _term_columns(items, extra)
    cap = max(1, distinct - len(free))
    candidates = {len(k): k for k in (_knots(items.size_I, m) for m in range(1, cap + 1))}
    fits = []
    for terms in _term_sets(free):
        problem = _Problem(items, t, cols, terms, latency_prior_s, unit, noise)
        fits += [problem.solve(k) for k in candidates.values()]
    # fits[0] (every identifiable term, one knot) stands when too few rows to compare
    if not np.isfinite(fits[0][1]):
        return fits[0][0]
    return min(fits, key=lambda f: f[1])[0]


def _term_sets(free: list[str]) -> list[list[str]]:
    """The free terms, and without a free latency (then the prior): the criterion picks."""
    if "latency" not in free:
        return [free]
    return [free, [f for f in free if f != "latency"]]


def _knots(size_I: F64, most: int) -> F64:
    return np.unique([_round(v) for v in knot_positions(size_I, most)])


def aicc(rss: float, n: int, k: int) -> float:
    """Small-sample Akaike criterion of a least-squares fit (inf when ``n <= k + 1``)."""
    if n <= k + 1:
        return float("inf")
    return n * np.log(rss / n + 1e-12) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


@dataclass(frozen=True)
class _Problem:
    """One least-squares problem: the rows, the fixed-term columns and which terms are free."""

    items: Items
    t: F64
    cols: F64  # [R, 3] multipliers of TERMS
    free: list[str]
    latency_prior_s: float
    unit: float
    noise: float

    def solve(self, knots: F64) -> tuple[LineFit, float]:
        """The fit with these knots and its criterion (lower is better, inf: too few rows)."""
        items, t, n_lin = self.items, self.t, len(self.free)
        idx = [TERMS.index(f) for f in self.free]
        fixed = np.array([self.latency_prior_s * 1e6, 0.0, 0.0])
        fixed[idx] = 0.0
        base = self.cols @ fixed
        W = interp_matrix(items.size_I, knots)
        lin = self.cols[:, idx]
        rows_RI = np.zeros((items.n_rows, items.size_I.size))
        rows_RI[items.row_I, np.arange(items.size_I.size)] = 1.0
        rough = np.diff(np.eye(knots.size), 2, axis=0) * np.sqrt(SMOOTHNESS)

        def predict(p: F64) -> tuple[F64, F64]:
            rate = (W @ np.exp(p[n_lin:])) * self.unit
            return base + lin @ p[:n_lin] + rows_RI @ (items.size_I / rate), rate

        def residual(p: F64) -> F64:
            pred, _ = predict(p)
            return np.r_[np.log(np.maximum(pred, 1e-30) / t), rough @ p[n_lin:]]

        def jacobian(p: F64) -> F64:
            pred, rate = predict(p)
            # d(size / rate) / d(theta_k) = -size / rate^2 * W_ik * exp(theta_k) * unit
            d_items = -(items.size_I / rate**2)[:, None] * W * np.exp(p[n_lin:]) * self.unit
            d_pred = np.hstack([lin, rows_RI @ d_items]) / np.maximum(pred, 1e-30)[:, None]
            return np.vstack([d_pred, np.hstack([np.zeros((rough.shape[0], n_lin)), rough])])

        lower = np.r_[np.zeros(n_lin), np.full(knots.size, -RATE_RANGE)]
        upper = np.r_[np.full(n_lin, np.inf), np.full(knots.size, RATE_RANGE)]
        if "latency" in self.free:  # a call cannot take less than its fixed latency
            upper[0] = max(float(np.min(t - base)) * 1e6, 1e-9)
        x0 = _initial(items, t - base, self.cols[:, idx], self.unit, knots.size)
        x0 = np.clip(x0, lower, upper * (1 - 1e-9))
        sol = least_squares(
            residual,
            x0,
            jac=jacobian,
            bounds=(lower, upper),
            loss="soft_l1",
            f_scale=self.noise,
            x_scale="jac",
            ftol=LSQ_TOL,
            xtol=LSQ_TOL,
        )
        coef = fixed.copy()
        coef[idx] = sol.x[:n_lin]
        line = LineFit(
            latency_s=_round_us(coef[0]) * 1e-6,
            per_item_s=_round_us(coef[2]) * 1e-6,
            knots_x=tuple(float(v) for v in knots),
            knots_y=tuple(_round(v) for v in np.exp(sol.x[n_lin:])),
            unit=self.unit,
            extra_rate=_round(1.0 / coef[1]) if coef[1] > 0 else None,
        )
        rss = float(np.sum(sol.fun[: items.n_rows] ** 2))
        return line, aicc(rss, items.n_rows, n_lin + knots.size)


def _term_columns(items: Items, extra: F64) -> F64:
    """``[R, 3]`` multipliers of (latency us, seconds per 1e12 extra, per-item us)."""
    count = np.bincount(items.row_I, minlength=items.n_rows).astype(np.float64)
    return np.stack([np.full(items.n_rows, 1e-6), extra / 1e12, count * 1e-6], axis=1)


def _distinct_rows(items: Items, extra: F64) -> int:
    """How many rows differ in what the line can see (total size, items, extra)."""
    total = np.bincount(items.row_I, items.size_I, minlength=items.n_rows)
    count = np.bincount(items.row_I, minlength=items.n_rows)
    sig = np.stack([np.round(np.log(total.clip(1e-30)), 6), count, np.round(extra, 0)], axis=1)
    return int(np.unique(sig, axis=0).shape[0])


def _free_terms(distinct: int, per_item: bool, has_extra: bool) -> list[str]:
    """Terms the data can identify: each needs one more distinct row than the last."""
    wanted = [
        t
        for t in TERMS
        if t == "latency" or (t == "extra" and has_extra) or (t == "per_item" and per_item)
    ]
    return [t for i, t in enumerate(wanted) if distinct >= i + 2]


def _initial(items: Items, t: F64, lin: F64, unit: float, n_knots: int) -> F64:
    """A constant-rate line by non-negative least squares (relative weights) as the start."""
    size = np.bincount(items.row_I, items.size_I, minlength=items.n_rows).astype(np.float64)
    A = np.column_stack([lin, size]) / np.abs(t).clip(1e-30)[:, None]
    coef, _ = nnls(A, np.sign(t))
    inv_rate = coef[-1] if coef[-1] > 0 else float(np.median(t.clip(1e-30) / size.clip(1e-30)))
    rate = 1.0 / max(inv_rate, 1e-30) / unit
    return np.r_[coef[:-1], np.full(n_knots, np.log(rate))]


def _round_us(v: float) -> float:
    """A fixed cost in us, rounded; below a picosecond it is the solver's zero."""
    return 0.0 if v < 1e-6 else _round(v)


def _round(v: float) -> float:
    """``v`` to :data:`DIGITS` significant digits (exactly representable in YAML)."""
    return float(f"{float(v):.{DIGITS}g}")
