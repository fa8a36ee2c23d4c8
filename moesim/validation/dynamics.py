"""Fit the parametric load dynamics to the start of a measured run; predict the rest.

Legend: T = steps, L = layers, E = experts, Q = Monte-Carlo paths.

For each token-choice run of a ``moesim train-router`` trace: the first
``fit_fraction`` of the steps is all the fit sees. Per layer and expert the
observed log-share ``y = log(load / sum load)`` is taken as ``mu + x + e``:
``x`` an AR(1) process (the :class:`~moesim.simulate.dynamics.ParametricProcess`
with ``persistence`` rho and innovation sd ``drift``, each expert its own), ``e``
the sampling noise of ``n`` assignments (variance ``(1 - p)/(n p)``, known).
``mu`` (the level the AR(1) reverts to) is the mean of ``y`` over the last
:data:`PULL_STEPS` fitted steps, each step's level sharpened as below; each
expert's rho and variance of ``x`` come from its lag-0 and lag-1 autocovariances
about that level over the last :data:`LEVEL_STEPS` steps, its noise variance
taken off lag 0 (a few experts carry most of the variance: pooled over experts,
the hot experts' spread was given to every expert); a longer level window than
the AR(1)'s lets an excursion of the last steps revert instead of becoming
the level. Per layer, the *sharpening* moves the level on: the spread of ``y``
over experts (``std_E``) fitted as a straight line against the clock over all
fitted steps, its slope relative to the spread of the last :data:`LEVEL_STEPS`
steps (Adam moves the router's weights at a roughly constant rate per unit of
learning rate, so its logits' scale grows about linearly in that time); runs
without balancing grow more skewed as they train, which a fixed level cannot
foresee. Runs balanced by ``bias`` or ``aux_loss`` are fitted with that rule on:
``y - rate·C`` with ``C`` the rule's cumulative signal from the observed loads,
``rate`` by grid search (:data:`RATES`) as the value that leaves ``y - rate·C``
with the least variance (no trend left); the process is then fitted to
``y - rate·C``. The other
schemes' effects are part of what the process absorbs.

*Clock*: where the trace records each step's learning rate (``lr``, the
schedule the run was trained with: an input of training, known in advance, not
a measured outcome), time is counted in learning-rate units relative to the
rate of the last :data:`LEVEL_STEPS` fitted steps: the sharpening line is fitted
against that clock, the ``aux_loss`` signal (a loss, acting through the
optimiser) is weighted by it, and in the prediction the AR(1) is an
Ornstein-Uhlenbeck process in that time (a step at half the rate moves half as
far; :func:`moesim.simulate.dynamics.warp_ar1`). ``bias`` acts outside the
optimiser at a fixed ``gamma``. Without an ``lr`` column the clock is the step.

The rest of the run is then predicted from the fitted process alone (started
at the last fitted step's shrunk state, never fed later steps): ``Q`` paths,
each step's counts drawn ``Multinomial(n, softmax(z + b))``, the rule updating
``b`` from those simulated counts. The AR(1)'s innovations are the fitted
window's own residuals, standardised per expert and resampled a whole ``[L, E]``
row per step (:data:`INNOVATIONS`): an expert whose log-share swings far
*down* (a share near zero) has a large log-variance that Gaussian innovations
would also throw *up*, to twice the mean. Per step, the drop
fraction at capacity factor ``cf`` (capacity ``ceil(cf·n/E)`` per expert, the
whole step one capacity domain, as :func:`moesim.kernels.gating.expert_capacity`)
and max/mean load, averaged over paths and layers, are compared with the same
quantities of the measured steps. The paths also say how often the target can be
met at all (:func:`chance_within_tolerance`): the share of them that the
prediction would pass were that path the measured run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moesim.config.dynamics import DynamicsConfig
from moesim.errors import ConfigError
from moesim.simulate.dynamics import ParametricProcess, shares_of, sharpen

F64 = NDArray[np.float64]
DEFAULT_TRACE = Path("results/dynamics/router-dynamics.parquet")
#: last fitted steps the AR(1) (persistence, innovations) is fitted to
LEVEL_STEPS = 50
#: last fitted steps whose mean log-share is the level mu the AR(1) reverts to
PULL_STEPS = 100
#: Monte-Carlo paths of the prediction
PATHS = 200
#: innovations of the predicted AR(1): "bootstrap" (the fitted window's own standardised
#: residuals, resampled whole per step) or "gaussian"
INNOVATIONS = "bootstrap"
#: pass thresholds of the issue: drop fraction (absolute) and max/mean (relative)
DROP_TOL_PP = 0.5
IMBALANCE_TOL = 0.10


@dataclass(frozen=True)
class Fit:
    mu_LE: F64  # level at the last fitted step
    z0_LE: F64
    b0_LE: F64
    persistence_LE: F64
    drift_LE: F64
    sharpening_L1: F64  # per-step linear growth of the level's spread, relative to now
    balancing: str
    rate: float
    innovations_NLE: F64 | None = None  # standardised AR(1) residuals of the level window


#: floor of a fitted AR(1) variance (log-share units squared)
VAR_FLOOR = 1e-6
#: balancing rules a run's scheme is fitted with (the others: AR(1) alone)
SCHEME_RULE = {"bias": "bias", "aux_loss": "aux_loss"}
#: candidate rule rates (log-share units per step) of the grid search
RATES = np.r_[0.0, np.geomspace(1e-4, 0.3, 60)]


def rule_steps(share_TLE: F64, balancing: str, scale_T: F64 | None = None) -> F64:
    """``[T, L, E]`` cumulative rule signal before each step (rate 1), from observed loads.

    ``scale_T``: each step's learning rate relative to the fitted one; it weights
    the ``aux_loss`` signal (a loss acts through the optimiser), not ``bias``.
    """
    mean = share_TLE.mean(-1, keepdims=True)
    sig = np.sign(mean - share_TLE) if balancing == "bias" else -(share_TLE / mean - 1.0)
    if balancing == "aux_loss" and scale_T is not None:
        sig = sig * scale_T[:, None, None]
    return np.concatenate([np.zeros_like(sig[:1]), np.cumsum(sig, 0)[:-1]])


def lr_scale_of(lr_T: F64 | None, T: int, window: int) -> F64:
    """``[T]`` learning rate relative to its mean over the last ``window`` of ``T`` steps."""
    if lr_T is None:
        return np.ones(T)
    lr = np.asarray(lr_T, dtype=np.float64)
    return lr / max(float(lr[T - min(window, T) : T].mean()), 1e-300)


def fit_process(share_TLE: F64, n: int, scheme: str = "none", lr_T: F64 | None = None) -> Fit:
    """Rule rate by grid search, sharpening per layer, AR(1) per expert with sampling noise off.

    ``lr_T``: the run's learning rate at each fitted step (the schedule, an input
    of training; None: constant). Time is then counted in learning-rate units,
    relative to the rate over the last :data:`LEVEL_STEPS` steps.
    """
    y = np.log(np.maximum(share_TLE, 0.5 / n))
    T = len(y)
    W = min(LEVEL_STEPS, T)
    scale = lr_scale_of(lr_T, T, W)
    clock = np.r_[0.0, np.cumsum(scale)[:-1]]  # learning-rate time before each step
    balancing = SCHEME_RULE.get(scheme, "none")
    rate, C = 0.0, np.zeros_like(y)
    if balancing != "none":
        C = rule_steps(share_TLE, balancing, scale)
        rate = min(RATES, key=lambda r: _detrended_var(y - r * C))
    u = y - rate * C
    k = fit_sharpening(u, W, clock)
    P = max(W, min(PULL_STEPS, T))  # the level: mean of the last P steps, sharpened per step
    mu = u[-P:].mean(0)
    cbar = clock[-P:].mean()
    level_W = np.stack([sharpen(mu, np.maximum(1.0 + k * (c - cbar), 0.0)) for c in clock[-W:]])
    d = u[-W:] - level_W
    noise = ((1.0 - share_TLE[-W:]) / np.maximum(n * share_TLE[-W:], 0.5)).mean(0)
    var_x = np.maximum((d * d).mean(0) - noise, VAR_FLOOR)
    rho = np.clip((d[1:] * d[:-1]).mean(0) / var_x, 0.0, 0.999) if W > 1 else np.zeros_like(mu)
    lag = clock[-1] - cbar  # the window's mean sits mid-window: move it to the end
    level = sharpen(mu, np.maximum(1.0 + k * lag, 0.0))
    z0 = level + (var_x / (var_x + noise)) * d[-1]
    last = scale[-1] if balancing == "aux_loss" else 1.0
    b0 = rate * (C[-1] + last * _rule_signal(share_TLE[-1], balancing))
    sd = np.sqrt(var_x * (1.0 - rho * rho))
    k_end = k / np.maximum(1.0 + k * lag, 1e-6)  # the same line, relative to the last step
    innov = standard_residuals(d, rho) if INNOVATIONS == "bootstrap" else None
    return Fit(level, z0, b0, rho, sd, k_end, balancing, rate, innov)


def standard_residuals(d_TLE: F64, rho_LE: F64) -> F64 | None:
    """``[T-1, L, E]`` AR(1) residuals ``d[t] - rho·d[t-1]``, each (layer, expert) standardised.

    None with fewer than 3 steps; a residual series with no spread gives zeros.
    """
    if len(d_TLE) < 3:
        return None
    e = d_TLE[1:] - rho_LE * d_TLE[:-1]
    e = e - e.mean(0)
    sd = e.std(0)
    return np.where(sd > 0, e / np.where(sd > 0, sd, 1.0), 0.0)


def fit_sharpening(u_TLE: F64, window: int, clock_T: F64 | None = None) -> F64:
    """``[L, 1]`` slope of ``std_E(u)`` against the clock, over the mean spread of the last steps.

    ``clock_T``: learning-rate time of each step (default the step). Least
    squares over all steps; zero with fewer than 3 steps.
    """
    T = u_TLE.shape[0]
    if T < 3:
        return np.zeros((u_TLE.shape[1], 1))
    s_TL = u_TLE.std(-1)
    c = np.arange(T, dtype=np.float64) if clock_T is None else np.asarray(clock_T, np.float64)
    t = c - c.mean()
    slope_L = (t[:, None] * (s_TL - s_TL.mean(0))).sum(0) / (t * t).sum()
    return (slope_L / np.maximum(s_TL[-window:].mean(0), 1e-12))[:, None]


def _rule_signal(share_LE: F64, balancing: str) -> F64:
    mean = share_LE.mean(-1, keepdims=True)
    if balancing == "none":
        return np.zeros_like(share_LE)
    return np.sign(mean - share_LE) if balancing == "bias" else -(share_LE / mean - 1.0)


def _detrended_var(u_TLE: F64) -> float:
    """Variance of ``u`` around its per-(layer, expert) mean: a trend left in ``u`` adds to it."""
    return float(((u_TLE - u_TLE.mean(0)) ** 2).mean())


def predict(fit: Fit, n: int, steps: int, seed: int, lr_scale: F64 | None = None) -> F64:
    """``[Q, steps, L, E]`` predicted counts after the fitted steps; the rule reads them.

    ``lr_scale``: the learning rate of the last fitted step and of each predicted
    step but the last (the updates that lead into each predicted step), relative
    to the fitted one.
    """
    cfg = DynamicsConfig(balancing=fit.balancing, gamma=fit.rate, aux_rate=fit.rate)
    rng = np.random.default_rng(seed)
    z0 = np.repeat(fit.z0_LE[None], PATHS, 0)
    proc = ParametricProcess(
        cfg,
        fit.mu_LE[None],
        z0,
        rng,
        fit.b0_LE[None],
        persistence=fit.persistence_LE,
        drift=fit.drift_LE,
        sharpening=fit.sharpening_L1,
        lr_scale=lr_scale,
        innovations=fit.innovations_NLE,
    )
    proc.step()  # b0 already holds the last fitted step's rule update
    out = []
    for _ in range(steps):
        counts = rng.multinomial(n, proc.share()).astype(np.float64)
        out.append(counts)
        proc.observe(counts)
    return np.stack(out, axis=1)


def step_metrics(counts_TLE: F64, n: int, cf: float) -> tuple[F64, F64]:
    """Per step (leading axes kept, layers averaged): drop fraction at ``cf``, max/mean load."""
    E = counts_TLE.shape[-1]
    cap = math.ceil(cf * n / E)
    drop = np.maximum(counts_TLE - cap, 0).sum(-1) / n
    imb = counts_TLE.max(-1) / np.maximum(counts_TLE.mean(-1), 1e-12)
    return drop.mean(-1), imb.mean(-1)


def chance_within_tolerance(q_drop_QT: F64, q_imb_QT: F64) -> float:
    """Share of the ``Q`` predicted paths the prediction (their mean) would pass if measured.

    ``q_drop_QT`` (fractions) and ``q_imb_QT``: per path and predicted step. If
    the run were one more path of the fitted process, this is the chance that it
    meets the target: the target's reach given the process's own spread of a
    run's mean, before any measured step is seen.
    """
    drop_Q, imb_Q = q_drop_QT.mean(1), q_imb_QT.mean(1)
    drop_ok = 100 * np.abs(q_drop_QT.mean() - drop_Q) <= DROP_TOL_PP
    imb_ok = np.abs(q_imb_QT.mean() / imb_Q - 1.0) <= IMBALANCE_TOL
    return float((drop_ok & imb_ok).mean())


def validate_run(
    share_TLE: F64,
    n: int,
    cf: float,
    fit_fraction: float,
    seed: int,
    scheme: str = "none",
    lr_T: F64 | None = None,
) -> dict[str, Any]:
    T = share_TLE.shape[0]
    cut = max(2, int(T * fit_fraction))
    fit = fit_process(share_TLE[:cut], n, scheme, None if lr_T is None else lr_T[:cut])
    scale = None
    if lr_T is not None:
        scale = lr_scale_of(lr_T, cut, LEVEL_STEPS)[cut - 1 : T - 1]
    pred = predict(fit, n, T - cut, seed, scale)
    q_drop, q_imb = step_metrics(pred, n, cf)  # [Q, T-cut]
    m_drop, m_imb = step_metrics(share_TLE[cut:] * n, n, cf)
    e_drop, _ = step_metrics(share_TLE[max(0, cut - LEVEL_STEPS) : cut] * n, n, cf)
    p_drop, p_imb = q_drop.mean(0), q_imb.mean(0)
    band = 100 * np.percentile(q_drop.mean(1), [2.5, 97.5])  # the mean over the rest, per path
    ibnd = np.percentile(q_imb.mean(1), [2.5, 97.5])
    drop_err = 100 * (p_drop.mean() - m_drop.mean())
    imb_err = p_imb.mean() / m_imb.mean() - 1.0
    return {
        "fit_steps": cut,
        "predicted_steps": T - cut,
        "persistence": float(np.median(fit.persistence_LE)),
        "drift": float(np.median(fit.drift_LE)),
        "sharpening": float(fit.sharpening_L1.mean()),
        "balancing": fit.balancing,
        "rate": fit.rate,
        "measured_drop_pct": 100 * float(m_drop.mean()),
        "measured_drop_pct_fit_end": 100 * float(e_drop.mean()),
        "predicted_drop_pct": 100 * float(p_drop.mean()),
        "drop_error_pp": float(drop_err),
        "drop_step_mae_pp": float(100 * np.abs(p_drop - m_drop).mean()),
        "predicted_drop_pct_band95": [float(band[0]), float(band[1])],
        "drop_in_band": bool(band[0] <= 100 * m_drop.mean() <= band[1]),
        "predicted_max_mean_band95": [float(ibnd[0]), float(ibnd[1])],
        "max_mean_in_band": bool(ibnd[0] <= m_imb.mean() <= ibnd[1]),
        "measured_max_mean": float(m_imb.mean()),
        "predicted_max_mean": float(p_imb.mean()),
        "max_mean_error": float(imb_err),
        "max_mean_step_mape": float(np.abs(p_imb / m_imb - 1.0).mean()),
        "ok": bool(abs(drop_err) <= DROP_TOL_PP and abs(imb_err) <= IMBALANCE_TOL),
        "expected_ok": chance_within_tolerance(q_drop, q_imb),
    }


def validate_dynamics(
    path: str | Path = DEFAULT_TRACE,
    *,
    capacity_factors: tuple[float, ...] = (1.25,),
    fit_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Every token-choice run of the trace: fit on the start, predict the rest (see module)."""
    import json

    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            "dynamics trace not found (write one with `moesim train-router`)",
            field="--dynamics",
            value=str(path),
        )
    if not capacity_factors or min(capacity_factors) <= 0:
        raise ConfigError(
            "needs capacity factors > 0", field="--capacity-factor", value=capacity_factors
        )
    if not 0.05 <= fit_fraction <= 0.95:
        raise ConfigError("must be in 0.05..0.95", field="--fit-fraction", value=fit_fraction)
    table = pq.read_table(p)
    meta = json.loads((table.schema.metadata or {}).get(b"moesim", b"{}"))
    df = table.to_pandas()
    runs = []
    for run, rows in df.groupby("run", sort=False):
        if rows["scheme"].iloc[0] == "expert_choice":
            continue  # every expert takes its capacity: nothing to predict
        n = int(rows["tokens"].iloc[0] * rows["top_k"].iloc[0])
        E = len(rows["load"].iloc[0])
        scheme = str(rows["scheme"].iloc[0])
        share = shares_of(rows, E, str(p))
        lr = None
        if "lr" in rows.columns:  # the schedule the run was trained with, per step
            lr = rows.groupby("step", sort=True)["lr"].first().to_numpy(np.float64)
        for cf in capacity_factors:
            res = validate_run(share, n, cf, fit_fraction, seed, scheme, lr)
            runs.append({"run": run, "scheme": scheme, "capacity_factor": cf, **res})
    return {
        "trace": str(p),
        "capacity_factors": list(capacity_factors),
        "fit_fraction": fit_fraction,
        "tolerance": {"drop_pp": DROP_TOL_PP, "max_mean": IMBALANCE_TOL},
        "level_steps": LEVEL_STEPS,
        "innovations": INNOVATIONS,
        "schedule": _schedule(meta),
        "runs": runs,
        "all_ok": all(r["ok"] for r in runs),
        "trace_provenance": meta.get("provenance"),
    }


def _schedule(meta: dict[str, Any]) -> str:
    """The trace's learning-rate schedule in words (from its runs' settings)."""
    cfgs = [r.get("config", {}) for r in meta.get("runs", [])]
    if not cfgs:
        return "unknown"
    c = cfgs[0]
    kind = c.get("lr_schedule", "constant")
    words = f"Adam lr {c.get('lr', 0):g}, {kind}"
    if c.get("warmup"):
        words += f", {c['warmup']} warm-up steps"
    if kind == "cosine":
        words += f", down to {c.get('min_lr', 0):g}x at step {c.get('steps', 0) - 1}"
    return words
