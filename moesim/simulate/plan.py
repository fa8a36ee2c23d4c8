"""What the engine needs, priced up front: per-op seconds and per-link demands.

Legend: G = GPUs, X = EP groups, P = EP ranks, L = links of one group,
E = experts, El = experts per rank, T = tokens per GPU per micro-batch.

:func:`build_plan` draws every (layer, micro-batch) load once, vectorised
over all GPUs, and keeps only what the event loop reads: expert-GEMM seconds
per GPU, dispatch link rows per group, and the routing statistics. Dense
work (attention, shared experts, leading dense layers) is the same on every
GPU and priced once. Backward compute is ``2x`` the forward GEMMs (data and
weight gradients) and ``1x`` the memory-bound ops (gate, permute, unpermute).
Every GPU holds and routes ``tokens_per_gpu`` tokens (its sequence-parallel
shard, see :func:`moesim.simulate.core.tokens_per_step`), so TP does not
change a GPU's FLOPs, only adds its collectives (ops of the program,
:mod:`moesim.simulate.program`). Loads are drawn for the most MoE layers one pipeline rank
holds (:func:`~moesim.simulate.schedules.moe_layers_per_rank`); each EP group
reads its own GPUs' rows, so every rank's layers have their own loads.
:meth:`StepPlan.pp_send` prices a pipeline send between two ranks' groups.

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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import CommFit, HardwareProfile
from moesim.config.scenario import Scenario
from moesim.costs import tables
from moesim.costs.curves import eval_curve
from moesim.costs.model import CostModel
from moesim.errors import lookup
from moesim.model import collectives, params
from moesim.simulate import dense
from moesim.simulate.loads import AheadLoads, Load, LoadModel, group_sum, row_sum
from moesim.simulate.placement import Placer
from moesim.simulate.schedules import layout_for, moe_layers_per_rank
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
    etp: Coflows | None  # expert-TP all-gather + reduce-scatter of the received rows (etp > 1)
    recompute_s_G: F64  # selective recompute of the routed experts' modules (moe, moe_act)
    recv_rows_G: F64  # rows each GPU's experts run (received, with padding): memory
    sent_rows_G: F64  # rows each GPU puts in its dispatch send buffer: memory


@dataclass
class LoadStats:
    """Routing statistics summed over (layer, micro-batch, group)."""

    routed: float = 0.0
    kept: float = 0.0
    expert_imbalance: list[float] = field(default_factory=list)
    gpu_imbalance: list[float] = field(default_factory=list)
    sent_rows_per_gpu: list[float] = field(default_factory=list)
    layer_expert_imbalance: dict[int, list[float]] = field(default_factory=dict)  # by layer

    def layer_expert_imbalance_mean(self, layer: int, mbs: int = 0) -> float:
        vals = self.layer_expert_imbalance.get(layer)
        return float(np.mean(vals)) if vals else 0.0


class WorkTable:
    """``work[layer][mb]``: a layer's :class:`LayerWork`, priced the first time it is read.

    Schedules that never run a (layer, micro-batch) pair on a rank (DualPipe runs half
    the micro-batches through each of a rank's two chunks) never pay for its loads.
    """

    def __init__(self, make: Callable[[int, int], LayerWork], layers: int, mbs: int) -> None:
        self._make, self.layers, self.mbs = make, layers, mbs
        self._done: dict[tuple[int, int], LayerWork] = {}

    def get(self, layer: int, mb: int) -> LayerWork:
        hit = self._done.get((layer, mb))
        if hit is None:
            hit = self._done[layer, mb] = self._make(layer, mb)
        return hit

    def __getitem__(self, layer: int) -> _WorkRow:
        return _WorkRow(self, layer)

    def computed(self) -> list[LayerWork]:
        return list(self._done.values())

    def priced_keys(self) -> Any:
        """The (layer, micro-batch) pairs priced so far, as a live view."""
        return self._done.keys()

    def priced(self) -> dict[tuple[int, int], LayerWork]:
        """The (layer, micro-batch) pairs priced so far (what the schedule ran)."""
        return dict(self._done)


@dataclass(frozen=True)
class _WorkRow:
    table: WorkTable
    layer: int

    def __getitem__(self, mb: int) -> LayerWork:
        return self.table.get(self.layer, mb)


@dataclass
class StepPlan:
    """Everything the engine reads, for one training step or one inference forward."""

    scn: Scenario
    topo: Topology
    layers: int  # MoE layers of one pipeline stage
    micro_batches: int
    training: bool
    compute_s: dict[str, float]  # forward seconds of the per-layer ops equal on all GPUs
    work: WorkTable  # [layer][micro-batch]
    stats: LoadStats
    dispatch_row_bytes: float
    slowdown_G: F64
    capacity: int | None  # rows per expert per capacity domain, None = dropless
    split_exchange_X: F64  # seconds of each group's split-size exchange (0: none)
    pricer: CommPricer
    cost: CostModel
    loads: LoadModel
    pp: int = 1
    placement: dict[str, Any] = field(default_factory=dict)  # Placer.details()
    #: TP / CP collectives equal in every layer: ``tp`` (one TP block, AG + RS), ``tp2``
    #: (a dense layer's two blocks), ``cp`` / ``cp_bwd`` (the K/V ring); absent when unused
    collectives: dict[str, Coflows] = field(default_factory=dict)
    _sends: dict[tuple[int, int], tuple[Coflows, Coflows]] = field(default_factory=dict)
    ahead: AheadLoads | None = None  # loads drawn a micro-batch ahead while the engine runs

    def close(self) -> None:
        """Stop drawing loads ahead (the step is simulated)."""
        if self.ahead is not None:
            self.ahead.close()

    @property
    def groups_per_stage(self) -> int:
        return self.topo.num_groups // self.pp

    def pp_send(self, src: int, dst: int) -> tuple[Coflows, Coflows]:
        """Egress (sender's links) and ingress (receiver's links) of one activation send.

        Every GPU of the sending rank's EP group sends its micro-batch's hidden states
        (``T`` rows in the model dtype) to the GPU of the same position on rank ``dst``:
        over NVLink when both groups sit in one node, else over the NICs and uplinks.
        """
        hit = self._sends.get((src, dst))
        if hit is None:
            hit = self._sends[src, dst] = self._price_send(src, dst)
        return hit

    def same_node(self, a: int, b: int) -> bool:
        """Whether pipeline ranks ``a`` and ``b`` (their first EP groups) share a node."""
        gpn, ep, gps = self.topo.gpus_per_node, self.topo.ep, self.groups_per_stage
        return (a * gps * ep) // gpn == (b * gps * ep) // gpn

    def _price_send(self, src: int, dst: int) -> tuple[Coflows, Coflows]:
        same_node = self.same_node(src, dst)
        nbytes = self.scn.workload.tokens_per_gpu * row_bytes(
            self.scn.model.hidden_size, self.scn.model.dtype
        )
        X, P = self.topo.num_groups, self.topo.ep
        per = np.full((X, P), float(nbytes))
        zero = np.zeros((X, P))
        su, net = (per, zero) if same_node else (zero, per)
        return self.pricer.per_gpu(su, net, egress=True), self.pricer.per_gpu(su, net, egress=False)


@dataclass(frozen=True)
class Coflows:
    """One collective in every group: bytes per link, latency and time alone on the links.

    ``sent_XT``: bytes one GPU of the group sends on average, per tier (scale-up,
    network), as the collective moves them (before any calibration scaling).
    """

    demand_XL: F64  # bytes per link
    latency_X: F64  # seconds before the bytes flow
    solo_X: F64  # seconds the bytes take with no other coflow: max_l demand / capacity
    sent_XT: F64 | None = None

    @functools.cached_property
    def peak_X(self) -> F64:
        """Bytes of each group's most loaded link (what max-min filling divides by)."""
        return self.demand_XL.max(axis=1) if self.demand_XL.shape[1] else np.zeros(len(self))

    @functools.cached_property
    def share_XL(self) -> F64:
        """Each group's demand over its peak: the rows the fluid network's filling reads,
        once for every group rather than once per transfer (profiled hot path)."""
        return self.demand_XL / np.where(self.peak_X > 0, self.peak_X, 1.0)[:, None]

    @functools.cached_property
    def scalars_X(self) -> list[tuple[float, float, float]]:
        """``(latency, solo, peak)`` of each group as Python floats (read per transfer)."""
        lat, solo, peak = self.latency_X.tolist(), self.solo_X.tolist(), self.peak_X.tolist()
        return list(zip(lat, solo, peak, strict=True))

    def __len__(self) -> int:
        return len(self.demand_XL)

    def timed(self, latency_s: float, total_s: float) -> Coflows:
        """The same coflows scaled so that alone each takes ``total_s``, ``latency_s`` of it
        before the bytes flow (a measured collective's time at this size)."""
        flow = max(total_s - latency_s, 0.0)
        scale_X = np.where(self.solo_X > 0, flow / np.maximum(self.solo_X, 1e-30), 0.0)
        return Coflows(
            self.demand_XL * scale_X[:, None],
            np.full_like(self.latency_X, latency_s),
            self.solo_X * scale_X,
            self.sent_XT,
        )

    def delayed(self, seconds_X: F64) -> Coflows:
        """The same coflows started ``seconds_X`` later (a step that must finish first)."""
        return Coflows(self.demand_XL, self.latency_X + seconds_X, self.solo_X, self.sent_XT)


class CommPricer:
    """Bytes per link and latency of coflows, from spec or calibrated comm figures.

    Link capacities are the spec figures; a calibrated ``alltoall`` fit for a
    tier scales that tier's demand by ``spec bandwidth / fitted bandwidth(bytes
    per rank)`` so a coflow alone takes what the fit predicts.
    """

    def __init__(
        self,
        hw: HardwareProfile,
        cost: CostModel,
        topo: Topology,
        dispatcher: str | None = None,
        shape: DeepEPShape | None = None,
    ):
        self.cost, self.topo = cost, topo
        self.spec = dict(zip(("scaleup", "scaleout"), spec_bandwidths(hw), strict=True))
        self.fits = hw.calibration.alltoall if hw.calibration is not None else {}
        # measured DeepEP kernels (issue 11) price the NVLink tier of their dispatcher
        self.op_fits = deepep_tier_fits(cost, dispatcher, shape)

    def price(self, rows_XL: F64, row_bytes: float, op: str | None = None) -> Coflows:
        """The coflows of ``rows_XL`` rows of ``row_bytes`` each, one per group.

        ``op`` (``dispatch``/``combine``) selects a measured DeepEP fit where the
        profile has one for the dispatcher; otherwise the tier's all-to-all fit.
        """
        demand = rows_XL * row_bytes
        P = self.topo.ep
        sent = np.stack([demand[:, :P].sum(-1), demand[:, 2 * P : 3 * P].sum(-1)], -1) / P
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
        return Coflows(demand, latency, solo, sent)

    def measured(self, cf: Coflows, parts: list[tuple[str, int, float]]) -> Coflows:
        """``cf`` timed as the sum of measured collectives, each ``(kind, GPUs, message
        bytes)`` (nccl-tests' size), when the profile has every one of them
        (``calibration.collectives``, measured inside one node: call it for groups
        inside a node only); otherwise ``cf`` as the links price it."""
        fits = [(self.cost.collective_fit(kind, n), b) for kind, n, b in parts]
        if not fits or any(f is None for f, _ in fits) or sum(b for _, b in fits) <= 0:
            return cf
        lat = sum(tables.curve_latency_s(f, b) for f, b in fits if f is not None)
        total = sum(float(tables.curve_s(f, b)) for f, b in fits if f is not None)
        return cf.timed(lat, total)

    def per_gpu(
        self,
        scaleup_B_XP: F64,
        network_B_XP: F64,
        *,
        egress: bool | None = None,
        steps_XT: F64 | None = None,
    ) -> Coflows:
        """A collective from per-GPU byte demands: each GPU sends and receives them.

        ``scaleup_B_XP`` / ``network_B_XP``: bytes each GPU of each group moves over
        NVLink / its NIC (and its node's uplinks); ``egress`` True (False) puts only
        the sending (receiving) side on the links, None both. ``steps_XT``: latency
        steps per tier (ring hops), default one per tier that carries bytes.
        """
        X, P, N = self.topo.num_groups, self.topo.ep, self.topo.nodes_per_group
        zero = np.zeros((X, P))
        out_su, in_su = (scaleup_B_XP, scaleup_B_XP)
        out_net, in_net = (network_B_XP, network_B_XP)
        if egress is True:
            in_su, in_net = zero, zero
        elif egress is False:
            out_su, out_net = zero, zero
        M = (self.topo.node_of_P[:, None] == np.arange(N)[None, :]).astype(float)
        parts = [out_su, in_su, out_net, in_net, out_net @ M, in_net @ M]
        rows = np.concatenate(parts, axis=-1)
        lat = np.zeros(X)
        for t, (tier, B) in enumerate((("scaleup", scaleup_B_XP), ("scaleout", network_B_XP))):
            per = B.max(-1)
            steps = np.ones(X) if steps_XT is None else steps_XT[:, t]
            link_lat = self.cost.link(tier, float(per.max())).latency_s  # type: ignore[arg-type]
            lat = lat + np.where(per > 0, steps * link_lat, 0.0)
        cf = self.price(rows, 1.0)  # calibrated fits scale the demand as for an all-to-all
        sent = np.stack([out_su.mean(-1), out_net.mean(-1)], -1)
        return Coflows(cf.demand_XL, lat, cf.solo_X, sent)


#: (hidden, top_k, experts, ep, {op: row bytes priced}) of a scenario's DeepEP calls
DeepEPShape = tuple[int, int, int, int, dict[str, float]]
#: dispatcher -> DeepEP mode whose measured kernels price its NVLink tier
DEEPEP_MODES = {"low_latency": "ll", "hierarchical": "normal"}


def deepep_tier_fits(
    cost: CostModel, dispatcher: str | None, shape: DeepEPShape | None = None
) -> dict[str, dict[str, CommFit]]:
    """``{op: {"scaleup": fit}}`` from a measured profile's DeepEP fits (empty if none).

    ``shape``: ``(hidden, top_k, experts, ep, {op: row bytes})`` of the scenario,
    whose DeepEP shape terms (:meth:`CostModel.deepep_line`) fold into the line.
    """
    mode = DEEPEP_MODES.get(dispatcher or "")
    out: dict[str, dict[str, CommFit]] = {}
    for op in ("dispatch", "combine"):
        if not mode:
            continue
        if shape is None:
            fit: CommFit | None = cost.deepep_fit(mode, op)
        else:
            D, K, E, ep, rows = shape
            fit = cost.deepep_line(mode, op, D, K, max(ep, 2), experts=E, row=rows.get(op))
        if fit is not None:
            out[op] = {"scaleup": fit}
    return out


def build_plan(
    scn: Scenario, hw: HardwareProfile, topo: Topology, seed: int, layers: int | None = None
) -> StepPlan:
    """Price every op of one step of ``scn`` on ``hw`` (see module docstring).

    ``layers``: MoE layers per pipeline rank to draw loads for (default: from the
    scenario's schedule and layer split).
    """
    cost = CostModel(hw)
    pp = scn.parallel.pp
    if layers is None:
        layers = moe_layers_per_rank(*layout_for(scn))
    mbs = scn.workload.micro_batches
    loads = LoadModel(scn, topo, seed, layers)
    stats = LoadStats()
    training = scn.workload.mode == "training"
    m = scn.model
    rows = {
        "dispatch": row_bytes(m.hidden_size, scn.dispatch_dtype),
        "combine": row_bytes(m.hidden_size, scn.combine_dtype),
    }
    shape = (m.hidden_size, m.top_k, m.num_experts, topo.ep, rows)
    pricer = CommPricer(hw, cost, topo, scn.dispatcher, shape)
    exchange = split_exchange_s(scn, topo, pricer)
    placer = Placer(scn, topo, loads, layers)  # expert -> GPU slots (contiguous: identity)

    ahead = AheadLoads(loads, mbs)

    def make(i: int, m: int) -> LayerWork:
        load = ahead.load(i, m)
        if (i, m + 1) not in works.priced_keys():
            ahead.ahead(i, m + 1)
        placed = placer.apply(load, i)
        return _layer_work(scn, topo, cost, pricer, placed, stats, training, exchange, i, load)

    works = WorkTable(make, layers, mbs)
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
        capacity=loads.capacity_per_domain,
        split_exchange_X=exchange,
        pricer=pricer,
        cost=cost,
        loads=loads,
        pp=pp,
        collectives=layer_collectives(scn, topo, pricer),
        placement=placer.details(),
        ahead=ahead,
    )


def ring_coflow(
    pricer: CommPricer, topo: Topology, bytes_G: F64 | float, hops: int, intra_node: bool
) -> Coflows:
    """A ring collective in which each GPU sends and receives ``bytes_G`` in ``hops`` steps.

    On NVLink when the ring stays inside a node, else on the NICs; ``[G]`` bytes are
    in the plan's group-major order.
    """
    X, P = topo.num_groups, topo.ep
    B = np.broadcast_to(np.asarray(bytes_G, dtype=np.float64), (X * P,)).reshape(X, P)
    zero = np.zeros((X, P))
    steps = np.zeros((X, 2))
    steps[:, 0 if intra_node else 1] = hops
    su, net = (B, zero) if intra_node else (zero, B)
    return pricer.per_gpu(su, net, steps_XT=steps)


def layer_collectives(scn: Scenario, topo: Topology, pricer: CommPricer) -> dict[str, Coflows]:
    """Coflows of the TP block and CP ring collectives (bytes: :mod:`moesim.model.collectives`)."""
    m, p, gpn = scn.model, scn.parallel, scn.cluster.gpus_per_node
    b, T = DTYPE_BYTES[m.dtype], float(scn.workload.tokens_per_gpu)
    out: dict[str, Coflows] = {}
    if p.tp > 1:
        block = collectives.tp_block_bytes(T, m.hidden_size, b, p.tp)
        hops, intra = 2 * (p.tp - 1), p.tp <= gpn
        # one block: an all-gather and a reduce-scatter of the T x D activations
        ag_rs = [("all_gather", p.tp, T * m.hidden_size * b),
                 ("reduce_scatter", p.tp, T * m.hidden_size * b)]  # fmt: skip
        for name, n in (("tp", 1), ("tp2", 2)):
            cf = ring_coflow(pricer, topo, n * block, n * hops, intra)
            out[name] = pricer.measured(cf, n * ag_rs) if intra else cf
    if p.cp > 1 and m.dense is not None:
        intra = p.tp * p.cp <= gpn
        for name, bwd in (("cp", False), ("cp_bwd", True)):
            nbytes = collectives.cp_bytes(T, m.dense, b, p.cp, p.tp, backward=bwd)
            out[name] = ring_coflow(pricer, topo, nbytes, p.cp - 1, intra)
    return out


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
    """Per GPU, its compute time over the profile's (a GPU listed twice: the slower)."""
    slow = np.ones(scn.cluster.num_gpus)
    listed: set[int] = set()
    for s in scn.workload.stragglers:
        first = s.gpu not in listed
        slow[s.gpu] = s.compute_slowdown if first else max(slow[s.gpu], s.compute_slowdown)
        listed.add(s.gpu)
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
    layer: int = 0,
    logical: Load | None = None,
) -> LayerWork:
    """``load`` per physical expert slot (placement applied), ``logical`` per expert."""
    X, P = topo.num_groups, topo.ep
    E, D = load.sent_GE.shape[1], scn.model.hidden_size  # physical slots of a group
    recv_XE = group_sum(load.sent_GE, X)  # rows each expert runs
    recv_GL = recv_XE.reshape(X * P, E // P)  # by GPU and local expert
    m = scn.model
    experts_s = cost.experts_s(recv_GL, D, m.moe_intermediate_size, m.dtype, recipe=m.expert_recipe)
    rows_XL = dispatch_rows(scn, topo, load)
    _add_stats(st, logical or load, load, X, P, rows_XL, layer)
    comb_bytes = row_bytes(D, scn.combine_dtype)
    dispatch = pricer.price(rows_XL, row_bytes(D, scn.dispatch_dtype), op="dispatch")
    combine = pricer.price(rows_XL[:, topo.swap_L], comb_bytes, op="combine")
    grad = pricer.price(rows_XL, comb_bytes) if training else dispatch
    dispatch = dispatch.delayed(exchange_X)  # only the forward dispatch learns new splits
    regroup_s = np.zeros(X * P)
    if scn.dispatcher in REGROUP and P > 1 and E // P > 1:
        regroup_s = cost.regroup_s(recv_GL.sum(-1), D, scn.model.dtype)
    experts_s, etp = _expert_tp(scn, topo, cost, pricer, recv_GL, np.asarray(experts_s))
    return LayerWork(
        experts_s,
        np.asarray(regroup_s, dtype=np.float64),
        dispatch,
        combine,
        grad,
        etp,
        _recompute_experts_s(scn, cost, recv_GL, experts_s),
        etp_group_rows(scn, recv_GL.sum(-1)),
        row_sum(load.sent_GE),
    )


def etp_group_rows(scn: Scenario, recv_G: F64) -> F64:
    """Rows each GPU's expert GEMMs hold: its own, or with expert TP its ETP group's
    (gathered before the GEMMs; the ETP ranks are the same EP rank of ``etp``
    consecutive groups, as in :func:`_expert_tp`)."""
    etp, P = scn.parallel.etp, scn.parallel.ep
    if etp == 1:
        return recv_G
    rows = recv_G.reshape(-1, etp, P).sum(1, keepdims=True)
    return np.broadcast_to(rows, (rows.shape[0], etp, P)).reshape(-1).copy()


def _expert_tp(
    scn: Scenario, topo: Topology, cost: CostModel, pricer: CommPricer, recv_GL: F64, exp_G: F64
) -> tuple[F64, Coflows | None]:
    """Expert TP: each GPU runs its ETP group's rows on ``F / etp``; their AG + RS.

    The ETP ranks of one expert are the same EP rank of ``etp`` consecutive
    groups (ETP is the innermost MoE dimension, see :mod:`.topology`). Each GPU
    sends ``2 (etp - 1) R D b`` with ``R`` the most rows one of its ETP group got.
    """
    etp = scn.parallel.etp
    experts = np.asarray(exp_G, dtype=np.float64)
    if etp == 1:
        return experts, None
    m = scn.model
    G, Lx = recv_GL.shape
    P = scn.parallel.ep
    rows = recv_GL.reshape(G // (etp * P), etp, P, Lx).sum(1, keepdims=True)
    rows = np.broadcast_to(rows, (G // (etp * P), etp, P, Lx)).reshape(G, Lx)
    F = m.moe_intermediate_size // etp
    experts = np.asarray(
        cost.experts_s(rows, m.hidden_size, F, m.dtype, recipe=m.expert_recipe),
        dtype=np.float64,
    )
    own = recv_GL.sum(-1).reshape(G // (etp * P), etp, P).max(1, keepdims=True)
    own = np.broadcast_to(own, (G // (etp * P), etp, P)).reshape(G)
    nbytes = collectives.etp_bytes(1.0, m.hidden_size, DTYPE_BYTES[m.dtype], etp) * own
    intra = etp <= scn.cluster.gpus_per_node
    return experts, ring_coflow(pricer, topo, nbytes, 2 * (etp - 1), intra)


def _recompute_experts_s(scn: Scenario, cost: CostModel, recv_GL: F64, experts_G: F64) -> F64:
    """Selective recompute of ``moe`` (the expert FFNs) and/or ``moe_act`` (their SwiGLU)."""
    w = scn.workload
    out = np.zeros_like(experts_G)
    if w.recompute_granularity != "selective":
        return out
    if "moe" in w.recompute_modules:
        return experts_G.copy()  # the FFNs, their activation included
    if "moe_act" in w.recompute_modules:
        m = scn.model
        F = m.moe_intermediate_size // scn.parallel.etp
        nbytes = dense.ops.swiglu_bytes(recv_GL.sum(-1), F, DTYPE_BYTES[m.dtype])
        out = np.asarray(cost.memory_s("activation", nbytes), dtype=np.float64)
    return out


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
    X, P, E = topo.num_groups, topo.ep, load.sent_GE.shape[1]
    return load.sent_GE.reshape(X, P, P, E // P).sum(-1).astype(np.float64)


def _alltoall_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    return flat_links(_per_rank_XPP(scn, topo, load), topo)


def _allgather_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    rows = np.full((topo.num_groups, topo.ep, topo.ep), float(scn.workload.tokens_per_gpu))
    return flat_links(rows, topo)


def _hierarchical_rows(scn: Scenario, topo: Topology, load: Load) -> F64:
    X, P = topo.num_groups, topo.ep
    return hierarchical_links(load.tok_GP.reshape(X, P, P), load.tok_GNd.reshape(X, P, -1), topo)


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


def _add_stats(
    st: LoadStats, load: Load, placed: Load, X: int, P: int, rows_XL: F64, layer: int
) -> None:
    """Expert imbalance from the logical ``load``, GPU imbalance from the ``placed`` one."""
    per_expert = group_sum(load.routed_GE, X)
    kept_XE = per_expert if load.kept_GE is load.routed_GE else group_sum(load.kept_GE, X)
    st.routed += float(per_expert.sum())
    st.kept += float(kept_XE.sum())
    imb = per_expert.max(-1) / np.maximum(per_expert.mean(-1), 1e-12)
    st.expert_imbalance.extend(imb.tolist())
    st.layer_expert_imbalance.setdefault(layer, []).append(float(imb.mean()))
    R = placed.kept_GE.shape[1]
    per_gpu = group_sum(placed.kept_GE, X).reshape(X, P, R // P).sum(-1)
    st.gpu_imbalance.extend((per_gpu.max(-1) / np.maximum(per_gpu.mean(-1), 1e-12)).tolist())
    egress = rows_XL[:, :P].sum(-1) + rows_XL[:, 2 * P : 3 * P].sum(-1)
    st.sent_rows_per_gpu.extend((egress / P).tolist())


def _dense_costs(scn: Scenario, cost: CostModel) -> dict[str, float]:
    """Forward seconds of the ops that are equal on every GPU of a micro-batch."""
    return dense.dense_costs(scn, cost)


def _dense_layer_params(scn: Scenario) -> float:
    """Parameters of the leading dense layers (attention + dense FFN), all stages together."""
    m, d = scn.model, scn.model.dense
    if d is None or not d.num_dense_layers:
        return 0.0
    F = d.dense_intermediate_size or m.moe_intermediate_size
    attn = params.attention_params(d, m.hidden_size) + m.hidden_size
    return float(d.num_dense_layers * (attn + params.mlp_params(m.hidden_size, F)))


def _non_expert_params(scn: Scenario) -> float:
    """Parameters per MoE layer outside the routed experts (attention, norms, router, shared)."""
    m = scn.model
    attn = params.attention_params(m.dense, m.hidden_size) if m.dense is not None else 0
    return float(attn + m.hidden_size + params.moe_other_params(m))
