"""Routing over many training steps: per-step loads, balancing rules, step time per step.

Legend: L = MoE layers of a stage, M = micro-batches, X = EP groups, P = EP ranks,
E = experts, R = physical expert slots of a group, S = slots per rank,
B = L*M*X (one "batch row" per layer, micro-batch and group), Nd = nodes of a group.

Where per-step popularity comes from (:class:`DynamicsConfig`):

- :class:`ParametricProcess`: per layer, log-popularity ``z`` is AR(1) around the
  scenario's own popularity ``mu`` (``z[t+1] = mu + rho·(z[t] - mu) + drift·N(0,1)``,
  ``rho`` and ``drift`` scalars or per (layer, expert)) whose skew grows linearly,
  ``mu[t] = mean + max(0, 1 + sharpening·t)·(mu - mean)`` (0: a fixed level);
  the router picks by ``softmax(z + b)``; after each step a balancing rule
  reads the *simulated* loads: ``bias`` is DeepSeek-V3's
  ``b_i <- b_i + gamma·sign(mean load - load_i)``, ``aux_loss`` moves ``b_i``
  by ``-aux_rate·(load_i / mean - 1)``, ``none`` leaves it;
- :class:`TraceProcess`: a measured run's per-step shares (``moesim train-router``).

Per step, :class:`StepModel` draws every (layer, micro-batch, group)'s routed
counts ``Binomial(P·T, pi_e)`` (``pi`` = k-distinct inclusion probabilities),
takes the expected per-source drops at capacity (normal approximation of
``E[(X - c)+]`` with ``X ~ Binomial(T, pi)``), spreads kept rows over the
placement's slots, and prices them with the plan's own cost model and link
pricer, all layers at once (vectorised; no event loop). Each source is taken
to send ``1/P`` of its group's rows to each rank (per-source noise on the links
is left out). Step time is the static engine's step plus the change of the
non-overlapped critical path: ``step_t = step_0 + bubble·(crit_t - crit_0)``,
``crit`` = the slowest group's sum over layers and micro-batches of
``max_P(expert GEMMs + regroup) + dispatch + combine`` (forward, and backward
with 2x GEMMs) with each collective alone on its links (latency + bytes / capacity).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moesim.config.dynamics import DynamicsConfig
from moesim.config.hardware import HardwareProfile
from moesim.config.scenario import Scenario
from moesim.costs.model import CostModel
from moesim.errors import ConfigError
from moesim.simulate import capacity, routing
from moesim.simulate.loads import LoadModel, _block_prod
from moesim.simulate.placement import build_placement
from moesim.simulate.plan import (
    REGROUP,
    Coflows,
    CommPricer,
    StepPlan,
    row_bytes,
)
from moesim.simulate.topology import Topology
from moesim.simulate.traffic import flat_links, hierarchical_links

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


# -- balancing rules ------------------------------------------------------------------
def bias_update(bias_E: F64, load_E: F64, gamma: float) -> F64:
    """DeepSeek-V3 auxiliary-loss-free rule: ``b + gamma·sign(mean(load) - load)``.

    Works row-wise on any leading shape (``[L, E]``).
    """
    load = np.asarray(load_E, dtype=np.float64)
    return bias_E + gamma * np.sign(load.mean(-1, keepdims=True) - load)


def aux_update(b_E: F64, load_E: F64, rate: float) -> F64:
    """Aux-loss pull on the router: ``b - rate·(load / mean(load) - 1)`` (row-wise).

    Proportional to the overload where the bias rule takes only its sign; both
    accumulate (what the router learned stays learned).
    """
    load = np.asarray(load_E, dtype=np.float64)
    return b_E - rate * (load / np.maximum(load.mean(-1, keepdims=True), 1e-300) - 1.0)


#: balancing name -> update of the accumulated correction ``b`` from this step's loads
RULES = {
    "bias": lambda b, load, c: bias_update(b, load, c.gamma),
    "aux_loss": lambda b, load, c: aux_update(b, load, c.aux_rate),
}


def softmax(z_LE: F64) -> F64:
    w = np.exp(z_LE - z_LE.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


# -- where per-step popularity comes from ------------------------------------------------
class ParametricProcess:
    """AR(1) log-popularity around a sharpening level, and a balancing rule on the simulated loads.

    ``persistence``, ``drift`` (``[L, E]`` or scalar) and ``sharpening`` (``[L, 1]``
    or scalar) default to the config's scalars; a fit to a measured run gives
    them per (layer, expert) and per layer (:mod:`moesim.validation.dynamics`).
    """

    def __init__(
        self,
        cfg: DynamicsConfig,
        mu_LE: F64,
        z0_LE: F64,
        rng: np.random.Generator,
        b0_LE: F64 | None = None,
        *,
        persistence: F64 | float | None = None,
        drift: F64 | float | None = None,
        sharpening: F64 | float | None = None,
        lr_scale: F64 | None = None,
        innovations: F64 | None = None,
    ) -> None:
        self.cfg, self.mu, self.z, self.rng = cfg, mu_LE, z0_LE.copy(), rng
        self.b = (
            np.zeros_like(self.z) if b0_LE is None else np.broadcast_to(b0_LE, self.z.shape).copy()
        )
        self.rho = cfg.persistence if persistence is None else persistence
        self.sd = cfg.drift if drift is None else drift
        self.k = cfg.sharpening if sharpening is None else sharpening
        self.mu0, self.t = mu_LE, 0
        self.lr_scale = None if lr_scale is None else np.asarray(lr_scale, dtype=np.float64)
        self.clock = 0.0  # learning-rate time: sum of lr_scale over the steps taken
        self.innov = innovations

    def scale(self) -> float:
        """Learning rate of the coming step relative to the fitted one (1 without a schedule)."""
        if self.lr_scale is None or len(self.lr_scale) == 0:
            return 1.0
        return float(self.lr_scale[min(self.t, len(self.lr_scale) - 1)])

    def share(self) -> F64:
        """``[L, E]`` popularity of this step (sums to 1 per layer)."""
        return softmax(self.z + self.b)

    def observe(self, load_LE: F64) -> None:
        """Apply the balancing rule to this step's loads, then move the popularity one step.

        ``aux_loss`` acts through the optimiser, so its rate follows ``lr_scale``;
        ``bias`` is applied outside it (its ``gamma`` is not scheduled).
        """
        c = self.cfg
        rule = RULES.get(c.balancing)
        if c.balancing == "aux_loss":
            self.b = aux_update(self.b, load_LE, c.aux_rate * self.scale())
        elif rule is not None:
            self.b = rule(self.b, load_LE, c)
        self.step()

    def step(self) -> None:
        """Move the popularity one step (level sharpened, AR(1) drawn), no rule.

        With ``lr_scale`` the step covers ``s`` units of learning-rate time: the
        level sharpens by ``k·s`` and the AR(1) is an Ornstein-Uhlenbeck process in
        that time, ``rho**s`` and innovation sd ``drift·sqrt((1 - rho**2s) / (1 - rho**2))``
        (its stationary spread kept; ``s = 1`` is the plain AR(1)).
        """
        s = self.scale()
        self.t += 1
        self.clock += s
        self.mu = sharpen(self.mu0, np.maximum(1.0 + self.k * self.clock, 0.0))
        rho, sd = warp_ar1(self.rho, self.sd, s)
        noise = sd * self.draw()
        self.z = self.mu + rho * (self.z - self.mu) + noise

    def draw(self) -> F64:
        """Standard innovations of ``z``'s shape: ``N(0, 1)``, or resampled ``innovations``.

        ``innovations [N, L, E]`` (standardised per layer and expert): each step
        takes one of the ``N`` whole ``[L, E]`` rows per leading index, so the
        experts' joint shape (skew, tails, co-movement) is kept.
        """
        if self.innov is None:
            return self.rng.standard_normal(self.z.shape)
        idx = self.rng.integers(len(self.innov), size=self.z.shape[:-2])
        return np.broadcast_to(self.innov[idx], self.z.shape)


def warp_ar1(rho: F64 | float, sd: F64 | float, s: float) -> tuple[F64, F64]:
    """One step of ``s`` time units of the OU process whose unit step is AR(1) ``(rho, sd)``."""
    r = np.asarray(rho, dtype=np.float64)
    sd_ = np.asarray(sd, dtype=np.float64)
    if s == 1.0:
        return r, sd_
    rs = r**s
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(r < 1.0, (1.0 - rs * rs) / np.maximum(1.0 - r * r, 1e-300), s)
    return rs, sd_ * np.sqrt(np.maximum(ratio, 0.0))


def sharpen(mu_LE: F64, factor: F64 | float) -> F64:
    """``mean + factor·(mu - mean)`` per layer: the level's skew scaled (softmax shape only)."""
    if np.all(np.asarray(factor) == 1.0):
        return mu_LE
    m = mu_LE.mean(-1, keepdims=True)
    return m + factor * (mu_LE - m)


class TraceProcess:
    """Per-step shares of a recorded run, layers mapped cyclically onto the stage's layers."""

    def __init__(self, share_TLE: F64, layers: int) -> None:
        self.share_TLE = share_TLE[:, np.arange(layers) % share_TLE.shape[1]]
        self.t = 0

    def share(self) -> F64:
        return self.share_TLE[self.t]

    def observe(self, load_LE: F64) -> None:
        self.t += 1


def read_dynamics_trace(path: str | Path, run: str | None, E: int) -> tuple[F64, dict[str, Any]]:
    """``[steps, layers, E]`` shares of one run of a ``moesim train-router`` parquet."""
    import json

    import pyarrow.parquet as pq

    p = Path(path)
    field = "workload.routing.dynamics.trace"
    if not p.is_file():
        raise ConfigError("dynamics trace not found", field=field, value=str(path))
    try:
        table = pq.read_table(p)
    except Exception as err:  # pyarrow raises many types for bad files
        raise ConfigError(f"cannot read parquet: {err}", file=str(p)) from None
    need = {"run", "step", "layer", "load"}
    if not need <= set(table.column_names):
        raise ConfigError(f"needs columns {sorted(need)} (moesim train-router)", file=str(p))
    meta = json.loads((table.schema.metadata or {}).get(b"moesim", b"{}"))
    df = table.select(["run", "step", "layer", "load"]).to_pandas()
    runs = list(dict.fromkeys(df["run"]))
    name = run or runs[0]
    if name not in runs:
        raise ConfigError(
            f"no such run; runs: {', '.join(runs)}", field=field.replace("trace", "run"), value=run
        )
    return shares_of(df[df["run"] == name], E, str(p)), meta


def shares_of(df: Any, E: int, file: str) -> F64:
    """``[steps, layers, E]`` normalised loads from tidy rows of one run."""
    df = df.sort_values(["step", "layer"])
    loads = np.asarray(df["load"].tolist(), dtype=np.float64)
    if loads.shape[1] != E:
        raise ConfigError(
            f"trace has {loads.shape[1]} experts, model.num_experts is {E}", file=file
        )
    steps, layers = df["step"].nunique(), df["layer"].nunique()
    out = loads.reshape(steps, layers, E)
    return out / np.maximum(out.sum(-1, keepdims=True), 1e-300)


# -- pricing one step ------------------------------------------------------------------
@dataclass(frozen=True)
class Priced:
    """One step, every (layer, micro-batch, group) row B = (L, M, X) flattened."""

    crit_s: float  # slowest group's non-overlapped MoE critical path
    routed: float
    kept: float
    expert_imbalance: float
    gpu_imbalance: float
    dispatch_rows_per_gpu: float
    load_LE: F64  # routed assignments per expert, summed over micro-batches and groups


class StepModel:
    """Prices per-step loads with the static plan's cost model, links and placement."""

    def __init__(self, scn: Scenario, hw: HardwareProfile, topo: Topology, plan: StepPlan):
        self.scn, self.plan = scn, plan
        m = scn.model
        self.L, self.M, self.X, self.P = plan.layers, plan.micro_batches, topo.num_groups, topo.ep
        self.E, self.K, self.T = m.num_experts, m.top_k, scn.workload.tokens_per_gpu
        self.cost = CostModel(hw)
        self.pricer = CommPricer(hw, self.cost, topo)
        B = self.L * self.M * self.X
        self.topo_B = dataclasses.replace(topo, num_groups=B, num_gpus=B * topo.ep)
        r = scn.router
        seq = r.sequence_length if r.capacity_per == "sequence" else None
        self.sizes_S = capacity.domain_sizes(self.T, seq)
        self.cap_S = capacity.capacities(self.sizes_S, self.E, self.K, r.capacity_factor)
        self.pad = r.pad_to_capacity and self.cap_S is not None
        self.exchange_X = plan.split_exchange_X
        self.slots_LR = np.broadcast_to(np.arange(self.E), (self.L, self.E)).astype(np.int64)
        self.crit_base = 0.0
        self._links = _link_matrices(topo)

    def calibrate(self, pi_LE: F64, seed: int, *, fixed: bool = False) -> None:
        """Reference: this model's critical path on the static step's own loads.

        Step times are the engine's static step plus the change of this model's
        critical path against this reference, so model and engine agree on the
        scenario's own (static) loads.
        """
        if fixed:  # balanced by construction: no noise, no drops
            self.crit_base = self.price(pi_LE, None, drops=False).crit_s
            return
        rng = np.random.default_rng([seed, 7])
        self.crit_base = float(np.mean([self.price(pi_LE, rng).crit_s for _ in range(REF_DRAWS)]))

    # -- placement -----------------------------------------------------------------
    def place(self, weight_LE: F64 | None) -> None:
        """Use the scenario's placement built from ``weight_LE`` (None: contiguous)."""
        cfg = self.scn.placement
        if weight_LE is None or cfg.kind == "contiguous":
            self.slots_LR = np.broadcast_to(np.arange(self.E), (self.L, self.E)).astype(np.int64)
            return
        Nd = self.topo_B.nodes_per_group
        pl = build_placement(cfg, weight_LE, self.P, Nd, self.scn.router.n_group)
        self.slots_LR = pl.slot_expert_LR

    # -- one step ------------------------------------------------------------------
    def price(self, pi_LE: F64, rng: np.random.Generator | None, *, drops: bool = True) -> Priced:
        """Draw (``rng``) or take the mean (None) of this step's counts and price them.

        ``drops=False``: loads already within capacity (expert choice, soft MoE).
        """
        L, M, X, P, E = self.L, self.M, self.X, self.P, self.E
        n = P * self.T
        mean = np.broadcast_to((n * pi_LE)[:, None, None, :], (L, M, X, E))
        routed = mean.copy() if rng is None else self._draw(rng, n, pi_LE)
        excess = self._excess(pi_LE) if drops else np.zeros_like(pi_LE)
        kept = np.maximum(routed - P * excess[:, None, None, :], 0.0)
        sent = kept if not self.pad else np.full_like(kept, P * float(self.cap_S.sum()))  # type: ignore[union-attr]
        B = L * M * X
        kept_BR, sent_BR = (
            self._to_slots(a.reshape(L, M * X, E)).reshape(B, -1) for a in (kept, sent)
        )
        crit = self._crit(sent_BR)
        per_gpu = kept_BR.reshape(B, P, -1).sum(-1)
        r = routed.reshape(B, E)
        return Priced(
            crit_s=crit,
            routed=float(r.sum()),
            kept=float(kept.sum()),
            expert_imbalance=float(np.mean(r.max(-1) / np.maximum(r.mean(-1), 1e-12))),
            gpu_imbalance=float(np.mean(per_gpu.max(-1) / np.maximum(per_gpu.mean(-1), 1e-12))),
            dispatch_rows_per_gpu=float(sent_BR.sum() / (B * P)),
            load_LE=routed.sum((1, 2)),
        )

    def _draw(self, rng: np.random.Generator, n: int, pi_LE: F64) -> F64:
        """``[L, M, X, E]`` routed counts, ``Binomial(n, pi)`` (:func:`routing.draw_counts`)."""
        shape = (self.L, self.M, self.X)
        out = routing.draw_counts(rng, np.array([n]), pi_LE[:, None, None, :], shape)
        return out[..., 0, :].astype(np.float64)

    def _excess(self, pi_LE: F64) -> F64:
        """Expected dropped assignments per source and expert, ``[L, E]`` (0: dropless)."""
        if self.cap_S is None:
            return np.zeros_like(pi_LE)
        out = np.zeros_like(pi_LE)
        for size, cap in zip(self.sizes_S, self.cap_S, strict=True):
            out += expected_excess(float(size), pi_LE, float(cap))
        return out

    def _to_slots(self, x_LBE: F64) -> F64:
        """Rows per physical slot ``[L, B', R]``: each copy takes an equal share."""
        copies = np.zeros((self.L, self.E))
        np.add.at(copies, (np.arange(self.L)[:, None], self.slots_LR), 1.0)
        per_copy = x_LBE / copies[:, None, :]
        idx = np.broadcast_to(self.slots_LR[:, None, :], (*x_LBE.shape[:2], self.slots_LR.shape[1]))
        return np.take_along_axis(per_copy, idx, axis=2)

    def _crit(self, sent_BR: F64) -> float:
        """Slowest group's MoE critical path for physical per-slot rows ``[B, R]``."""
        scn, P, B = self.scn, self.P, sent_BR.shape[0]
        m = scn.model
        recv_GS = sent_BR.reshape(B * P, -1)
        exp_BP = self.cost.experts_s(
            recv_GS, m.hidden_size, m.moe_intermediate_size, m.dtype, recipe=m.expert_recipe
        ).reshape(B, P)
        reg_BP = np.zeros((B, P))
        if scn.dispatcher in REGROUP and P > 1 and recv_GS.shape[1] > 1:
            reg_BP = self.cost.regroup_s(recv_GS.sum(-1), m.hidden_size, m.dtype).reshape(B, P)
        rows_BL = self._rows(sent_BR)
        D = m.hidden_size
        disp = self.pricer.price(rows_BL, row_bytes(D, scn.dispatch_dtype))
        comb = self.pricer.price(rows_BL[:, self.topo_B.swap_L], row_bytes(D, scn.combine_dtype))
        grad = self.pricer.price(rows_BL, row_bytes(D, scn.combine_dtype))
        return self._sum_crit(exp_BP, reg_BP, disp, comb, grad)

    def _rows(self, sent_BR: F64) -> F64:
        """Rows per link ``[B, L]``: every source sends ``1/P`` of each rank's rows.

        The link functions are linear in their inputs and every source of a group
        sends alike, so links are ``per-rank vector @ matrix`` (:func:`_link_matrix`).
        """
        P, B, T = self.P, sent_BR.shape[0], float(self.T)
        d = self.scn.dispatcher
        if d == "allgather":
            return np.full((B, P), T) @ self._links["flat"]
        if d != "hierarchical":
            return (sent_BR.reshape(B, P, -1).sum(-1) / P) @ self._links["flat"]
        miss_BR = 1.0 - np.minimum(sent_BR / (P * T), 1.0)
        miss_BQ = _block_prod(miss_BR, P)
        miss_BNd = _block_prod(miss_BQ, self.topo_B.nodes_per_group)
        return T * ((1 - miss_BQ) @ self._links["rank"] + (1 - miss_BNd) @ self._links["node"])

    def _sum_crit(
        self, exp_BP: F64, reg_BP: F64, disp: Coflows, comb: Coflows, grad: Coflows
    ) -> float:
        def t(c: Coflows) -> F64:
            return c.latency_X + c.solo_X if self.P > 1 else np.zeros(len(c.solo_X))

        ex = np.tile(self.exchange_X, self.L * self.M) if self.P > 1 else 0.0
        fwd = (exp_BP + reg_BP).max(-1) + t(disp) + ex + t(comb)
        total = fwd
        if self.plan.training:
            total = fwd + (2 * exp_BP + reg_BP).max(-1) + t(grad) + t(comb)
        return float(total.reshape(self.L * self.M, self.X).sum(0).max())


def _link_matrices(topo: Topology) -> dict[str, F64]:
    """Link rows per unit sent to each rank (or node) by *every* source of a group.

    ``flat [P, L]``: :func:`flat_links` of ``rows[s, d] = 1`` for one ``d``;
    ``rank [P, L]`` / ``node [Nd, L]``: :func:`hierarchical_links` of one rank's or
    one node's distinct tokens (the other input zero).
    """
    P, Nd = topo.ep, topo.nodes_per_group
    unit_PPP = np.zeros((P, P, P))
    unit_PPP[np.arange(P), :, np.arange(P)] = 1.0
    unit_NdPNd = np.zeros((Nd, P, Nd))
    unit_NdPNd[np.arange(Nd), :, np.arange(Nd)] = 1.0
    return {
        "flat": flat_links(unit_PPP, topo),
        "rank": hierarchical_links(unit_PPP, np.zeros((P, P, Nd)), topo),
        "node": hierarchical_links(np.zeros((Nd, P, P)), unit_NdPNd, topo),
    }


def expected_excess(n: float, pi: F64, cap: float) -> F64:
    """``E[(X - cap)+]`` for ``X ~ Binomial(n, pi)`` (normal approximation, elementwise)."""
    from scipy.special import ndtr

    mu = n * pi
    sd = np.sqrt(np.maximum(n * pi * (1.0 - pi), 1e-12))
    z = (mu - cap) / sd
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return np.maximum((mu - cap) * ndtr(z) + sd * pdf, 0.0)


# -- the run ----------------------------------------------------------------------------
def make_process(scn: Scenario, layers: int, seed: int) -> ParametricProcess | TraceProcess:
    cfg = scn.workload.routing.dynamics
    E = scn.model.num_experts
    if cfg.source == "trace":
        assert cfg.trace is not None
        share, _ = read_dynamics_trace(cfg.trace, cfg.run, E)
        if share.shape[0] < cfg.steps:
            raise ConfigError(
                f"trace has {share.shape[0]} steps, fewer than asked",
                field="workload.routing.dynamics.steps",
                value=cfg.steps,
            )
        return TraceProcess(share, layers)
    rcfg = scn.workload.routing
    if rcfg.distribution in ("trace", "router"):
        pop = np.full((layers, E), 1.0 / E)
    else:
        pop = routing.layer_popularities(rcfg, E, layers, np.random.default_rng([seed, 0]))
    mu = np.log(np.maximum(pop, 1e-12))
    mu -= mu.mean(-1, keepdims=True)
    return ParametricProcess(cfg, mu, cfg.initial_scale * mu, np.random.default_rng([seed, 5]))


def run_dynamics(
    scn: Scenario,
    hw: HardwareProfile,
    topo: Topology,
    plan: StepPlan,
    base_step_s: float,
    seed: int,
) -> dict[str, Any]:
    """Simulate ``dynamics.steps`` steps: per-step series and a summary (JSON-ready)."""
    cfg = scn.workload.routing.dynamics
    model = StepModel(scn, hw, topo, plan)
    static = LoadModel(scn, topo, seed, plan.layers).expected_loads(plan.layers)
    model.place(static)
    fixed = _fixed_inclusion(scn, plan.layers)  # expert choice / soft: loads never move
    if fixed is None:
        model.calibrate(np.minimum(static, 1.0), seed)
    else:
        model.calibrate(fixed, seed, fixed=True)
    proc = make_process(scn, plan.layers, seed)
    rng = np.random.default_rng([seed, 6])
    K = scn.model.top_k
    pl = scn.placement
    series: dict[str, list[float]] = {k: [] for k in SERIES}
    window: list[F64] = []
    for step in range(cfg.steps):
        share = proc.share()
        if step == 0 or (pl.rebalance_every and step % pl.rebalance_every == 0):
            model.place(np.mean(window, 0) if window else share * K)
            window = []
        if fixed is None:
            pr = model.price(routing.inclusion_probs(share, K), rng)
        else:
            pr = model.price(fixed, None, drops=False)
        proc.observe(pr.load_LE)
        window.append(pr.load_LE / max(pr.routed, 1.0) * K * plan.layers)
        _append(series, pr, base_step_s + _step_scale(plan) * (pr.crit_s - model.crit_base), plan)
    balanced = _balanced_step(model, plan, base_step_s)
    return {"summary": summarize(series, cfg, balanced), "series": _thin(series, cfg.series_every)}


def _step_scale(plan: StepPlan) -> float:
    """How a change of one micro-batch's critical path scales into the step.

    A pipeline of ``p`` ranks runs ``m`` micro-batches in about ``m + p - 1`` slots
    (1F1B), so a slot that grows by ``d`` grows the step by ``(m + p - 1) / m``
    of the ``m·d`` the critical path carries; with ``p = 1`` the factor is 1.
    """
    m = plan.micro_batches
    return (m + plan.pp - 1) / m


def _fixed_inclusion(scn: Scenario, layers: int) -> F64 | None:
    """Per-token inclusion of router kinds whose loads are balanced by construction.

    Expert choice: every expert takes its capacity, ``capacity / T`` per token;
    soft MoE: every token reaches every expert. None for token-choice kinds.
    """
    E, T = scn.model.num_experts, scn.workload.tokens_per_gpu
    if scn.router.kind == "soft":
        return np.ones((layers, E))
    if scn.router.kind == "expert_choice":
        cf = scn.router.capacity_factor or 1.0
        per = capacity.expert_capacity(T, E, scn.model.top_k, cf)
        return np.full((layers, E), min(per / T, 1.0))
    return None


SERIES = (
    "step_time_s",
    "drop_fraction",
    "expert_imbalance",
    "gpu_imbalance",
    "dispatch_bytes_per_gpu",
)


def _append(series: dict[str, list[float]], pr: Priced, step_s: float, plan: StepPlan) -> None:
    series["step_time_s"].append(step_s)
    series["drop_fraction"].append(1.0 - pr.kept / pr.routed if pr.routed else 0.0)
    series["expert_imbalance"].append(pr.expert_imbalance)
    series["gpu_imbalance"].append(pr.gpu_imbalance)
    series["dispatch_bytes_per_gpu"].append(pr.dispatch_rows_per_gpu * plan.dispatch_row_bytes)


def _balanced_step(model: StepModel, plan: StepPlan, base_step_s: float) -> float:
    """Step time with every expert exactly equally loaded, no noise, contiguous placement."""
    model.place(None)
    pi = np.full((model.L, model.E), model.K / model.E)
    return base_step_s + _step_scale(plan) * (model.price(pi, None).crit_s - model.crit_base)


#: draws of the static loads averaged for the reference critical path
REF_DRAWS = 3
#: steps a running mean of the imbalance covers for "time to reach"
REACH_WINDOW = 10


def summarize(
    series: dict[str, list[float]], cfg: DynamicsConfig, balanced_s: float
) -> dict[str, Any]:
    """Means over the run, time to reach ``imbalance_target``, cost vs perfectly balanced."""
    step = np.asarray(series["step_time_s"])
    imb = np.asarray(series["expert_imbalance"])
    reach = first_below(imb, cfg.imbalance_target, REACH_WINDOW)
    return {
        "steps": len(step),
        "mean_step_time_s": float(step.mean()),
        "total_time_s": float(step.sum()),
        "balanced_step_time_s": balanced_s,
        "extra_time_vs_balanced_s": float(step.sum() - balanced_s * len(step)),
        "extra_fraction_vs_balanced": float(step.sum() / (balanced_s * len(step)) - 1.0),
        "mean_drop_fraction": float(np.mean(series["drop_fraction"])),
        "mean_expert_imbalance": float(imb.mean()),
        "final_expert_imbalance": float(imb[-REACH_WINDOW:].mean()),
        "mean_gpu_imbalance": float(np.mean(series["gpu_imbalance"])),
        "imbalance_target": cfg.imbalance_target,
        "steps_to_target": reach,
        "time_to_target_s": None if reach is None else float(step[:reach].sum()),
    }


def first_below(x: F64, target: float, window: int) -> int | None:
    """First step whose running mean over ``window`` steps (ending there) is <= ``target``."""
    if len(x) == 0:
        return None
    c = np.cumsum(np.r_[0.0, x])
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - window, 0)
    mean = (c[idx] - c[lo]) / (idx - lo)
    hit = np.flatnonzero(mean <= target)
    return int(hit[0]) if len(hit) else None


def _thin(series: dict[str, list[float]], every: int) -> dict[str, list[float]]:
    out = {k: v[::every] for k, v in series.items()}
    out["step"] = [float(i) for i in range(0, len(series["step_time_s"]), every)]
    return out
