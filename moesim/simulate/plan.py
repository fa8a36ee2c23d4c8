"""What the engine needs, priced up front: per-op seconds and per-link demands.

Legend: G = GPUs, X = EP groups, P = EP ranks, L = links of one group,
E = experts, El = experts per rank, T = tokens per GPU per micro-batch.

:func:`build_plan` draws every (layer, micro-batch) load once, vectorised
over all GPUs, and keeps only what the event loop reads: expert-GEMM seconds
per GPU, dispatch link rows per group, and the routing statistics. Dense
work (attention, shared experts, leading dense layers) is the same on every
GPU and priced once. Backward compute is ``2x`` the forward GEMMs (data and
weight gradients) and ``1x`` the memory-bound ops (gate, permute, unpermute).
Tensor parallelism divides the dense work by ``tp`` (its all-reduces are not
modelled); pipeline parallelism gives each stage ``ceil(layers / pp)`` MoE
layers and the step a 1F1B bubble ``(m + pp - 1) / m``.

Split-size exchange: a receiver of an uneven dispatch must know how many rows
arrive, so dispatchers with variable splits first send every peer their
per-expert counts (``E / P`` int64 to each rank): Megatron-Core's all-to-all
dispatcher, the real EP layer of :mod:`moesim.measure.ep_layer` and DeepEP's
``notify_dispatch``. :func:`split_exchange_s` prices it as a small flat
all-to-all on the same links (latency-bound) and the forward dispatch waits for
it (:meth:`Coflows.delayed`). The combine and the backward all-to-alls reuse
the known splits, and low-latency (fixed-size buffers) and all-gather
(fixed ``T`` rows) dispatchers need none.

Regroup: an all-to-all delivers a rank's rows grouped by source, then by local
expert; with more than one local expert they are sorted expert-major before the
grouped GEMM and back after (Megatron-Core's ``sort_chunks_by_idxs``, the real EP
layer's :func:`~moesim.kernels.dispatch.sort_chunks`), priced per GPU from the
rows it receives (:meth:`CostModel.regroup_s`) and part of its experts phase,
forward and backward. The other dispatchers are priced without it: DeepEP's
low-latency mode delivers rows expert-major, and the hierarchical and all-gather
paths sort received rows once by local expert, which the permute phase stands for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import CommFit, HardwareProfile
from moesim.config.scenario import Scenario
from moesim.costs import work
from moesim.costs.curves import eval_curve
from moesim.costs.model import CostModel
from moesim.errors import lookup
from moesim.simulate.loads import Load, LoadModel
from moesim.simulate.topology import Topology, spec_bandwidths
from moesim.simulate.traffic import flat_links, hierarchical_links

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class LayerWork:
    """One MoE layer, one micro-batch: what differs between GPUs."""

    experts_s_G: F64  # forward expert GEMM seconds on each GPU
    regroup_s_G: F64  # forward seconds of sorting received rows by local expert and back
    dispatch: Coflows  # forward dispatch (dispatch dtype)
    combine: Coflows  # forward combine and backward dispatch (combine dtype, reversed)
    grad_dispatch: Coflows  # backward combine: gradients in the dispatch direction


@dataclass
class LoadStats:
    """Routing statistics summed over (layer, micro-batch, group)."""

    routed: float = 0.0
    kept: float = 0.0
    expert_imbalance: list[float] = field(default_factory=list)
    gpu_imbalance: list[float] = field(default_factory=list)
    sent_rows_per_gpu: list[float] = field(default_factory=list)
    layer_expert_imbalance: list[float] = field(default_factory=list)  # [layer * mbs + mb]

    def layer_expert_imbalance_mean(self, layer: int, mbs: int) -> float:
        return float(np.mean(self.layer_expert_imbalance[layer * mbs : (layer + 1) * mbs]))


@dataclass
class StepPlan:
    """Everything the engine reads, for one training step or one inference forward."""

    scn: Scenario
    topo: Topology
    layers: int  # MoE layers of one pipeline stage
    micro_batches: int
    training: bool
    compute_s: dict[str, float]  # forward seconds of the per-layer ops equal on all GPUs
    work: list[list[LayerWork]]  # [layer][micro-batch]
    stats: LoadStats
    dispatch_row_bytes: float
    slowdown_G: F64
    grad_allreduce_s: float
    bubble: float
    capacity: int | None  # rows per expert per capacity domain, None = dropless
    split_exchange_X: F64  # seconds of each group's split-size exchange (0: none)


@dataclass(frozen=True)
class Coflows:
    """One collective in every group: bytes per link, latency and time alone on the links."""

    demand_XL: F64  # bytes per link
    latency_X: F64  # seconds before the bytes flow
    solo_X: F64  # seconds the bytes take with no other coflow: max_l demand / capacity

    def delayed(self, seconds_X: F64) -> Coflows:
        """The same coflows started ``seconds_X`` later (a step that must finish first)."""
        return Coflows(self.demand_XL, self.latency_X + seconds_X, self.solo_X)


class CommPricer:
    """Bytes per link and latency of coflows, from spec or calibrated comm figures.

    Link capacities are the spec figures; a calibrated ``alltoall`` fit for a
    tier scales that tier's demand by ``spec bandwidth / fitted bandwidth(bytes
    per rank)`` so a coflow alone takes what the fit predicts.
    """

    def __init__(
        self, hw: HardwareProfile, cost: CostModel, topo: Topology, dispatcher: str | None = None
    ):
        self.cost, self.topo = cost, topo
        self.spec = dict(zip(("scaleup", "scaleout"), spec_bandwidths(hw), strict=True))
        self.fits = hw.calibration.alltoall if hw.calibration is not None else {}
        # measured DeepEP kernels (issue 11) price the NVLink tier of their dispatcher
        self.op_fits = deepep_tier_fits(cost, dispatcher)

    def price(self, rows_XL: F64, row_bytes: float, op: str | None = None) -> Coflows:
        """The coflows of ``rows_XL`` rows of ``row_bytes`` each, one per group.

        ``op`` (``dispatch``/``combine``) selects a measured DeepEP fit where the
        profile has one for the dispatcher; otherwise the tier's all-to-all fit.
        """
        demand = rows_XL * row_bytes
        P = self.topo.ep
        latency = np.zeros(len(demand))
        fits = {**self.fits, **self.op_fits.get(op or "", {})}
        for tier, sl in self.topo.tier_slices().items():
            per_rank = demand[:, sl][:, :P].sum(-1) / P  # egress ports of the tier
            fit = fits.get(tier)
            lat = fit.latency_us * 1e-6 if fit is not None else self.cost.link(tier).latency_s  # type: ignore[arg-type]
            latency = np.where(per_rank > 0, np.maximum(latency, lat), latency)
            if fit is not None:
                bw = eval_curve(fit.bandwidth_GBps, np.maximum(per_rank, 1.0)) * 1e9
                demand[:, sl] *= (self.spec[tier] / bw)[:, None]
        solo = (demand / self.topo.cap_L).max(-1)
        return Coflows(demand, latency, solo)


#: dispatcher -> DeepEP mode whose measured kernels price its NVLink tier
DEEPEP_MODES = {"low_latency": "ll", "hierarchical": "normal"}


def deepep_tier_fits(cost: CostModel, dispatcher: str | None) -> dict[str, dict[str, CommFit]]:
    """``{op: {"scaleup": fit}}`` from a measured profile's DeepEP fits (empty if none)."""
    mode = DEEPEP_MODES.get(dispatcher or "")
    out: dict[str, dict[str, CommFit]] = {}
    for op in ("dispatch", "combine"):
        fit = cost.deepep_fit(mode, op) if mode else None
        if fit is not None:
            out[op] = {"scaleup": fit}
    return out


def build_plan(scn: Scenario, hw: HardwareProfile, topo: Topology, seed: int) -> StepPlan:
    """Price every op of one step of ``scn`` on ``hw`` (see module docstring)."""
    cost = CostModel(hw)
    pp = scn.parallel.pp
    layers = math.ceil(scn.model.num_moe_layers / pp)
    mbs = scn.workload.micro_batches
    loads = LoadModel(scn, topo, seed, layers)
    stats = LoadStats()
    training = scn.workload.mode == "training"
    pricer = CommPricer(hw, cost, topo, scn.dispatcher)
    exchange = split_exchange_s(scn, topo, pricer)
    works = [
        [
            _layer_work(scn, topo, cost, pricer, loads.load(i, m), stats, training, exchange)
            for m in range(mbs)
        ]
        for i in range(layers)
    ]
    return StepPlan(
        scn=scn,
        topo=topo,
        layers=layers,
        micro_batches=mbs,
        training=training,
        compute_s=_dense_costs(scn, cost),
        work=works,
        stats=stats,
        dispatch_row_bytes=row_bytes(scn.model.hidden_size, scn.dispatch_dtype),
        slowdown_G=_slowdowns(scn),
        grad_allreduce_s=grad_allreduce_s(scn, hw, layers) if training else 0.0,
        bubble=(mbs + pp - 1) / mbs,
        capacity=loads.capacity_per_domain,
        split_exchange_X=exchange,
    )


#: dispatchers whose splits vary per step, so that counts are exchanged before the rows
SPLIT_EXCHANGE = frozenset({"alltoall", "hierarchical"})
#: dispatchers that deliver rows source-major, sorted by local expert on arrival
REGROUP = frozenset({"alltoall"})
#: bytes of one exchanged count (int64)
COUNT_BYTES = 8.0


def split_exchange_s(scn: Scenario, topo: Topology, pricer: CommPricer) -> F64:
    """Seconds ``[X]`` of the per-expert count exchange before every forward dispatch.

    Every rank sends ``E / P`` int64 counts to each other rank of its group (NVLink
    inside a node, NIC across nodes): latency plus bytes, alone on the links.
    Zero for dispatchers that need no exchange (see :data:`SPLIT_EXCHANGE`).
    """
    X, P = topo.num_groups, topo.ep
    if scn.dispatcher not in SPLIT_EXCHANGE or P == 1:
        return np.zeros(X)
    counts = np.full((X, P, P), float(scn.model.num_experts // P))
    cf = pricer.price(flat_links(counts, topo), COUNT_BYTES)
    return cf.latency_X + cf.solo_X


def _slowdowns(scn: Scenario) -> F64:
    slow = np.ones(scn.cluster.num_gpus)
    for s in scn.workload.stragglers:
        slow[s.gpu] = max(slow[s.gpu], s.compute_slowdown)
    return slow


def _layer_work(
    scn: Scenario,
    topo: Topology,
    cost: CostModel,
    pricer: CommPricer,
    load: Load,
    st: LoadStats,
    training: bool,
    exchange_X: F64,
) -> LayerWork:
    X, P = topo.num_groups, topo.ep
    E, D = scn.model.num_experts, scn.model.hidden_size
    recv_XE = load.sent_GE.reshape(X, P, E).sum(1, dtype=np.float64)  # rows each expert runs
    recv_GL = recv_XE.reshape(X * P, E // P)  # by GPU and local expert
    experts_s = cost.experts_s(recv_GL, D, scn.model.moe_intermediate_size, scn.model.dtype)
    rows_XL = dispatch_rows(scn, topo, load)
    _add_stats(st, load, X, P, E, rows_XL)
    comb_bytes = row_bytes(D, scn.combine_dtype)
    dispatch = pricer.price(rows_XL, row_bytes(D, scn.dispatch_dtype), op="dispatch")
    combine = pricer.price(rows_XL[:, topo.swap_L], comb_bytes, op="combine")
    grad = pricer.price(rows_XL, comb_bytes) if training else dispatch
    dispatch = dispatch.delayed(exchange_X)  # only the forward dispatch learns new splits
    regroup_s = np.zeros(X * P)
    if scn.dispatcher in REGROUP and P > 1 and E // P > 1:
        regroup_s = cost.regroup_s(recv_GL.sum(-1), D, scn.model.dtype)
    return LayerWork(
        np.asarray(experts_s, dtype=np.float64),
        np.asarray(regroup_s, dtype=np.float64),
        dispatch,
        combine,
        grad,
    )


#: fp8 rows travel with one fp32 scale per 128 elements (DeepEP, Transformer Engine blocks)
FP8_SCALE_BLOCK = 128


def row_bytes(hidden: int, dtype: str) -> float:
    """Bytes of one token's hidden vector on the wire in ``dtype`` (fp8 with its scales)."""
    nbytes = hidden * DTYPE_BYTES[dtype]
    if dtype == "fp8":
        nbytes += 4.0 * math.ceil(hidden / FP8_SCALE_BLOCK)
    return nbytes


def _per_rank_XPP(scn: Scenario, topo: Topology, load: Load) -> F64:
    """Rows each source sends to each rank: one copy per (token, expert)."""
    X, P, E = topo.num_groups, topo.ep, scn.model.num_experts
    return load.sent_GE.reshape(X, P, P, E // P).sum(-1).astype(np.float64)


def _alltoall_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    return flat_links(_per_rank_XPP(scn, topo, load), topo)


def _allgather_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    rows = np.full((topo.num_groups, topo.ep, topo.ep), float(scn.workload.tokens_per_gpu))
    return flat_links(rows, topo)


def _hierarchical_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    X, P = topo.num_groups, topo.ep
    return hierarchical_links(load.tok_GP.reshape(X, P, P), load.tok_GN.reshape(X, P, -1), topo)


def _low_latency_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    """DeepEP low-latency: one message per (token, expert) copy; same-node peers over NVLink."""
    return flat_links(_per_rank_XPP(scn, topo, load), topo)


#: dispatcher name -> rows per link ``[X, L]`` of one dispatch (see :mod:`.traffic`)
DISPATCH_ROWS: dict[str, Callable[[Scenario, Topology, Load], F64]] = {
    "alltoall": _alltoall_rows,
    "allgather": _allgather_rows,
    "hierarchical": _hierarchical_rows,
    "low_latency": _low_latency_rows,
}


def dispatch_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    """Rows per link ``[X, L]`` of one dispatch, for the scenario's dispatcher."""
    rows = lookup(DISPATCH_ROWS, scn.dispatcher, field="dispatcher", what="dispatcher")
    return rows(scn, topo, load)


def _add_stats(st: LoadStats, load: Load, X: int, P: int, E: int, rows_XL: F64) -> None:
    per_expert = load.routed_GE.reshape(X, P, E).sum(1, dtype=np.float64)
    kept_XE = load.kept_GE.reshape(X, P, E).sum(1, dtype=np.float64)
    st.routed += float(per_expert.sum())
    st.kept += float(kept_XE.sum())
    imb = per_expert.max(-1) / np.maximum(per_expert.mean(-1), 1e-12)
    st.expert_imbalance.extend(imb.tolist())
    st.layer_expert_imbalance.append(float(imb.mean()))
    per_gpu = kept_XE.reshape(X, P, E // P).sum(-1)
    st.gpu_imbalance.extend((per_gpu.max(-1) / np.maximum(per_gpu.mean(-1), 1e-12)).tolist())
    egress = rows_XL[:, :P].sum(-1) + rows_XL[:, 2 * P : 3 * P].sum(-1)
    st.sent_rows_per_gpu.extend((egress / P).tolist())


def _dense_costs(scn: Scenario, cost: CostModel) -> dict[str, float]:
    """Forward seconds of the ops that are equal on every GPU of a micro-batch."""
    m = scn.model
    T, D, K, E = scn.workload.tokens_per_gpu, m.hidden_size, m.top_k, m.num_experts
    dt, tp = m.dtype, scn.parallel.tp
    attn = _attention_s(scn, cost) / tp
    shared = 0.0
    if m.num_shared_experts:
        F_sh = m.shared_expert_intermediate_size or m.moe_intermediate_size
        flops = work.expert_flops(T, D, F_sh) * m.num_shared_experts
        nbytes = work.expert_bytes(T, D, F_sh, DTYPE_BYTES[dt]) * m.num_shared_experts
        shared = float(cost.dense_s(flops / tp, nbytes / tp, dt))
    dense_layers = 0.0
    if m.dense is not None and m.dense.num_dense_layers:
        F_d = m.dense.dense_intermediate_size or m.moe_intermediate_size
        ffn = float(
            cost.dense_s(
                work.expert_flops(T, D, F_d) / tp,
                work.expert_bytes(T, D, F_d, DTYPE_BYTES[dt]) / tp,
                dt,
            )
        )
        dense_layers = m.dense.num_dense_layers * (attn + ffn) / scn.parallel.pp
    return {
        "dense": attn,
        "gate": float(cost.gate_s(T, D, E, K, dt, kind=scn.router.kind)),
        "permute": float(cost.permute_s(T, D, K, dt)),
        "unpermute": float(cost.unpermute_s(T, D, K, dt)),
        "shared_experts": shared,
        "dense_layers": dense_layers,
    }


def _attention_s(scn: Scenario, cost: CostModel) -> float:
    """Attention of one layer on one GPU's micro-batch (projections + scores/values).

    FP8 recipes (Transformer Engine) run the projections in fp8 but the
    ``softmax(QK^T) V`` core in bf16 (flash attention), so the core is priced in bf16.
    """
    d = scn.model.dense
    if d is None:
        return 0.0
    T, D, dt = scn.workload.tokens_per_gpu, scn.model.hidden_size, scn.model.dtype
    b = DTYPE_BYTES[dt]
    causal = scn.workload.mode != "decode"
    shape = (D, d.num_attention_heads, d.num_key_value_heads, d.head_dim)
    flops = float(work.attention_flops(T, *shape, d.seq_length, causal=causal))
    nbytes = work.attention_bytes(T, *shape, b)
    if not causal:  # decode: every token reads its sequence's KV cache
        nbytes = nbytes + T * d.seq_length * 2 * d.num_key_value_heads * d.head_dim * b
    if dt != "fp8":
        return float(cost.dense_s(flops, nbytes, dt))
    proj = float(work.attention_flops(T, *shape, 0, causal=causal))
    return float(cost.dense_s(proj, nbytes, dt) + cost.dense_s(flops - proj, 0.0, "bf16"))


def grad_allreduce_s(scn: Scenario, hw: HardwareProfile, layers: int) -> float:
    """Ring all-reduce of the step's gradients: experts over DP, the rest over EP x DP.

    ``2 (n-1)/n · bytes / bw + 2 (n-1) · latency`` per all-reduce, on NVLink
    when the ranks share a node and on the NICs otherwise.
    """
    m, par = scn.model, scn.parallel
    b = DTYPE_BYTES[m.dtype]
    D, E, ep, dp = m.hidden_size, m.num_experts, par.ep, par.dp
    expert_B = layers * (E // ep) * 3 * D * m.moe_intermediate_size * b / par.tp
    other_B = (layers * _non_expert_params(scn) + _dense_layer_params(scn) / par.pp) * b / par.tp
    gpn = scn.cluster.gpus_per_node
    cost = CostModel(hw)
    t = _ring_s(cost, dp, expert_B, spans_nodes=ep * dp > gpn and dp > 1)
    return t + _ring_s(cost, ep * dp, other_B, spans_nodes=ep * dp > gpn)


def _ring_s(cost: CostModel, n: int, nbytes: float, spans_nodes: bool) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    moved = 2.0 * (n - 1) / n * nbytes
    link = cost.link("scaleout" if spans_nodes else "scaleup", moved)
    return moved / link.bandwidth_Bps + 2 * (n - 1) * link.latency_s


def _dense_layer_params(scn: Scenario) -> float:
    """Parameters of the leading dense layers (attention + dense FFN), all stages together."""
    m, d = scn.model, scn.model.dense
    if d is None or not d.num_dense_layers:
        return 0.0
    attn = m.hidden_size * d.head_dim * (2 * d.num_attention_heads + 2 * d.num_key_value_heads)
    F = d.dense_intermediate_size or m.moe_intermediate_size
    return float(d.num_dense_layers * (attn + 3 * m.hidden_size * F))


def _non_expert_params(scn: Scenario) -> float:
    """Parameters per MoE layer outside the routed experts (attention, router, shared)."""
    m = scn.model
    D = m.hidden_size
    params = float(D * m.num_experts)
    if m.dense is not None:
        d = m.dense
        params += D * d.head_dim * (2 * d.num_attention_heads + 2 * d.num_key_value_heads)
    F_sh = m.shared_expert_intermediate_size or m.moe_intermediate_size
    params += m.num_shared_experts * 3 * D * F_sh
    return params
