"""Per-GPU memory at the peak of one step: state, activations in flight, MoE buffers, KV cache.

Legend: G = GPUs, S = pipeline stages, L = MoE layers the plan drew (one stage),
M = micro-batches. Bytes unless a name ends in ``_GiB``.

What one GPU holds (:data:`PARTS`), each from a closed form of the scenario and,
for the MoE parts, from the routed loads of the simulated step (so a GPU whose
experts are hot holds more than its neighbours):

- ``params`` / ``grads`` / ``optimizer``: the parameters of the GPU's stage, from
  :func:`moesim.model.count_params` (experts divided by EP x ETP, the rest by TP;
  embedding on the first stage, LM head and MTP on the last; two stages with
  DualPipe) in ``memory.param_dtype``; gradients in ``memory.grad_dtype``;
  optimizer state (:func:`state_bytes_per_param`): fp32 master weights when the
  parameters are 16-bit, an fp32 copy of 16-bit gradients, and Adam's two
  moments, sharded by the distributed optimizer (``training.distributed_optimizer``)
  over each parameter's data-parallel group: attention DP x CP for non-expert
  weights, expert-DP for expert weights (Megatron-Core's table, see the tests).
- ``activations``: attention, norms and dense FFNs saved for backward, per layer
  by the per-layer formula of Korthikanti et al. 2022 (:func:`attention_bytes`,
  :func:`ffn_bytes`; recompute by :class:`Recompute`), times the micro-batches in
  flight under ``parallel.pp_schedule`` (:func:`inflight_micro_batches`; 1F1B holds
  ``min(m, p - s)`` on stage s); the LM head's logits on the last stage.
- ``moe_tokens``: rows saved by each MoE layer, from the loads: the rows the
  GPU's experts received (the expert GEMM input) and the expert outputs returned
  to it (kept for the gradient of the routing weights); ``moe_expert_act``: the
  experts' intermediate activations (``3F`` per received row with a fused SwiGLU,
  ``4F`` unfused as in moesim's kernels, ``2F`` for a plain FFN), plus the
  router's fp32 probabilities and the shared experts. Both are times the
  micro-batches in flight, over the consecutive micro-batches with the largest sum.
- ``transient``: the backward working set of the largest layer (gradients of its
  expert output rows and intermediate, ``recv · (D + F)``), training only.
- ``dispatcher``: communication buffers: the permuted send buffer of one layer
  (``alltoall`` / ``hierarchical``), the gathered rows (``allgather``) or DeepEP's
  fixed low-latency buffers (:func:`deepep_low_latency_bytes`).
- ``kv_cache``: inference only, ``2 · kv_heads · head_dim`` per token and layer
  (MLA: the compressed latent).
- ``reserve``: ``memory.reserve_GiB``, what the allocator and the framework keep.

Inference keeps no activations for backward: one layer's working set is held at
a time (no micro-batches in flight, no transient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import HardwareProfile
from moesim.config.scenario import MemoryConfig, Scenario
from moesim.errors import lookup
from moesim.model import count_params
from moesim.simulate import capacity
from moesim.simulate.plan import StepPlan, row_bytes
from moesim.simulate.schedules import Pipeline, layout_for

F64 = NDArray[np.float64]
GiB = float(2**30)
PARTS = (
    "params",
    "grads",
    "optimizer",
    "activations",
    "moe_tokens",
    "moe_expert_act",
    "transient",
    "dispatcher",
    "kv_cache",
    "reserve",
)
#: bytes of a dropout mask element (Korthikanti et al. count one byte)
MASK_BYTES = 1.0


# -- parameters, gradients, optimizer state -------------------------------------------
def state_bytes_per_param(
    mem: MemoryConfig, model_dtype: str, shard: int, *, distributed: bool = True
) -> tuple[float, float, float]:
    """``(param, grad, optimizer)`` bytes per parameter on one rank.

    Optimizer state: master weights in ``optimizer_dtype`` unless the parameters
    already are, a copy of the gradients in ``optimizer_dtype`` when they are
    narrower (fp16/bf16 grads, as Megatron-Core's fp16 path), and the moments
    (Adam 2, SGD with momentum 1). The distributed optimizer divides the state by
    ``shard``, the size of the parameter's data-parallel group, when ``distributed``.
    """
    p_dt = mem.param_dtype or model_dtype
    p, g, o = DTYPE_BYTES[p_dt], DTYPE_BYTES[mem.grad_dtype], DTYPE_BYTES[mem.optimizer_dtype]
    mom = DTYPE_BYTES[mem.moments_dtype or mem.optimizer_dtype]
    state = (0.0 if p >= o else o) + (0.0 if g >= o else o) + MOMENTS[mem.optimizer] * mom
    if distributed:
        state /= shard
    return p, g, state


MOMENTS = {"adam": 2, "sgd": 1}


@dataclass(frozen=True)
class StageParams:
    """Parameters of one pipeline stage held by one GPU: routed experts and the rest."""

    expert: float
    other: float


@dataclass(frozen=True)
class RankLayers:
    """The model chunks one pipeline rank holds: ``kinds[c]`` are chunk c's layers
    (``dense`` / ``moe``, MTP modules as ``moe`` on the last virtual stage)."""

    stages: tuple[int, ...]  # virtual stage of each chunk
    kinds: tuple[tuple[str, ...], ...]
    first: bool  # holds virtual stage 0 (the embedding)
    last: bool  # holds the last virtual stage (LM head, MTP modules)

    @property
    def dense(self) -> int:
        return sum(k.count("dense") for k in self.kinds)

    @property
    def moe(self) -> int:
        return sum(k.count("moe") for k in self.kinds)


def rank_layers(scn: Scenario) -> tuple[Pipeline, list[RankLayers]]:
    """The schedule (:func:`moesim.simulate.schedules.layout_for`) and every rank's chunks."""
    pipe, layout = layout_for(scn)
    out = []
    for r in range(pipe.ranks):
        stages = tuple(st for st, _ in pipe.chunks(r))
        kinds = tuple(tuple(layout.stage_layers[st]) for st in stages)
        out.append(RankLayers(stages, kinds, 0 in stages, pipe.stages - 1 in stages))
    return pipe, out


def stage_layers(scn: Scenario) -> list[tuple[int, int]]:
    """``(dense, moe)`` layers of every pipeline rank (MTP modules not included)."""
    _, ranks = rank_layers(scn)
    mtp = scn.model.mtp_num_layers
    return [(r.dense, r.moe - (mtp if r.last else 0)) for r in ranks]


def stage_params(
    scn: Scenario, stage: int, dense: int, moe: int, *, first: bool | None = None,
    last: bool | None = None,
) -> StageParams:  # fmt: skip
    """Parameters one GPU of pipeline rank ``stage`` holds, from :func:`moesim.model.count_params`.

    ``dense`` and ``moe`` layers of the main model; routed experts split over
    ``ep x etp``, the rest (attention, dense FFNs, routers, shared experts,
    norms) over ``tp``; the embedding with the first virtual stage, the LM head
    and the MTP modules with the last (``first`` / ``last``; None: rank 0 /
    rank ``pp - 1``, as in 1F1B). With tied embeddings a last stage that is not also
    the first holds its own copy of the table (Megatron-Core's
    ``shared_embedding_or_output_weight``), kept equal by the embedding group's
    gradient all-reduce.
    """
    m, par = scn.model, scn.parallel
    first = stage == 0 if first is None else first
    last = stage == par.pp - 1 if last is None else last
    c = count_params(m)
    layers, dense_total = scn.num_layers, scn.num_layers - m.num_moe_layers
    expert_layer = c.experts / m.num_moe_layers
    other = (dense + moe) * c.attention / layers + moe * c.moe_other / m.num_moe_layers
    other += dense * c.dense_ffn / dense_total if dense_total else 0.0
    expert = moe * expert_layer
    if first:
        other += c.embedding
    if last:
        mtp_experts = m.mtp_num_layers * expert_layer
        other += c.lm_head + c.mtp - mtp_experts
        expert += mtp_experts
        if m.tie_word_embeddings and not first:
            other += c.embedding
    return StageParams(expert / (par.ep * par.etp), other / par.tp)


def shard_groups(scn: Scenario) -> tuple[int, int]:
    """``(expert, non-expert)`` data-parallel sizes the distributed optimizer shards over:
    expert-DP, and attention DP x CP."""
    par, n = scn.parallel, scn.cluster.num_gpus
    return par.expert_dp(n), par.attention_dp(n) * par.cp


def state_bytes(scn: Scenario, sp: StageParams) -> dict[str, float]:
    """params / grads / optimizer bytes of one GPU holding ``sp``, each group sharded by its DP."""
    mem = scn.memory
    edp, dp = shard_groups(scn)
    dist = scn.training.distributed_optimizer
    pe, ge, oe = state_bytes_per_param(mem, scn.model.dtype, edp, distributed=dist)
    po, go, oo = state_bytes_per_param(mem, scn.model.dtype, dp, distributed=dist)
    train = 1.0 if scn.workload.mode == "training" else 0.0  # inference: weights only
    return {
        "params": sp.expert * pe + sp.other * po,
        "grads": train * (sp.expert * ge + sp.other * go),
        "optimizer": train * (sp.expert * oe + sp.other * oo),
    }


# -- activations (Korthikanti et al. 2022, "Reducing Activation Recomputation") --------
def act_bytes(dtype: str) -> float:
    """Bytes of a saved activation: fp8 recipes keep 16-bit activations around the GEMMs."""
    return max(2.0, DTYPE_BYTES[dtype]) if dtype == "fp8" else DTYPE_BYTES[dtype]


def attention_bytes(
    tokens: float,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    seq: int,
    *,
    tp: int = 1,
    sp: bool = True,
    selective: bool = False,
    dropout: bool = True,
    norm_outputs: bool = True,
    b: float = 2.0,
    dims: tuple[int, int, int, int] | None = None,
    latent: int = 0,
) -> float:
    """Bytes one GPU saves for the attention block and both layer norms of one layer.

    Korthikanti et al. (MHA, ``heads · head_dim = h``): ``11sbh + 5as²b`` for
    attention and ``4sbh`` for the two norms, 16-bit values and byte masks. The
    QKV input, the two norm inputs and the output dropout mask are replicated
    over TP unless sequence parallelism splits them; ``selective`` recompute drops
    the ``5as²b`` scores/softmax/dropout term (what flash attention saves too);
    ``norm_outputs=False`` (layernorm recompute) drops the QKV input.
    GQA: K and V have ``kv_heads`` heads; ``dims`` = (Q, K, V, output-projection
    input) widths override them (MLA), ``latent`` adds MLA's compressed q/kv
    width, computed on every TP rank. ``tokens = s · b`` of the TP group.
    """
    q, k, v, o = dims or (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim,
                          heads * head_dim)  # fmt: skip
    mask = MASK_BYTES if dropout else 0.0
    qkv_in = b * hidden if norm_outputs else 0.0
    replicated = tokens * (qkv_in + mask * hidden + 2 * b * hidden)  # qkv in, mask, norm inputs
    split = tokens * b * (q + k + v + o)  # Q, K, V, output-projection input
    if not selective:
        split += heads * seq * tokens * (b + mask + (b if dropout else 0.0))  # 5as²b
    return replicated / (tp if sp else 1) + split / tp + tokens * b * latent


def ffn_bytes(
    tokens: float,
    hidden: int,
    ffn: int,
    *,
    gated: bool = False,
    fused: bool = True,
    tp: int = 1,
    sp: bool = True,
    dropout: bool = True,
    norm_outputs: bool = True,
    intermediate: bool = True,
    b: float = 2.0,
) -> float:
    """Bytes one GPU saves for a dense FFN of one layer (Korthikanti: ``19sbh`` at ``4h``).

    Replicated over TP (unless SP): the input ``2sbh`` (a norm output: dropped by
    layernorm recompute) and the dropout mask ``sbh``. Split by TP: the
    intermediate per token (:func:`intermediate_factor`; none with mlp recompute).
    """
    mask = MASK_BYTES if dropout else 0.0
    replicated = tokens * hidden * ((b if norm_outputs else 0.0) + mask)
    split = tokens * b * ffn * intermediate_factor(gated, fused) if intermediate else 0.0
    return replicated / (tp if sp else 1) + split / tp


def intermediate_factor(gated: bool, fused: bool) -> float:
    """Saved values per row and FFN column: act(fc1) 2, fused SwiGLU 3, unfused 4."""
    if not gated:
        return 2.0
    return 3.0 if fused else 4.0


def korthikanti_layer_bytes(
    s: int, b: int, h: int, a: int, *, tp: int = 1, sp: bool = True, selective: bool = False
) -> float:
    """The paper's per-layer total: ``sbh(34 + 5as/h) / t`` with SP (``34 sbh / t`` selective)."""
    tokens = s * b
    attn = attention_bytes(tokens, h, a, a, h // a, s, tp=tp, sp=sp, selective=selective)
    return attn + ffn_bytes(tokens, h, 4 * h, tp=tp, sp=sp)


@dataclass(frozen=True)
class Recompute:
    """What each layer does not keep for backward (Megatron-Core's recompute options)."""

    full: bool = False  # only each layer's input is kept
    core_attn: bool = False  # no s x s scores (flash attention keeps none either)
    layernorm: bool = False  # norm outputs (QKV / FFN / router inputs) rebuilt
    mlp: bool = False  # dense FFN intermediates rebuilt
    moe_act: bool = False  # experts keep fc1's output only (2F per row)
    shared_experts: bool = False  # shared experts' intermediates rebuilt
    moe: bool = False  # the whole MoE part is rebuilt: only its input is kept

    @staticmethod
    def of(scn: Scenario) -> Recompute:
        w = scn.workload
        flash = scn.memory.flash_attention
        if w.recompute_granularity == "full":
            return Recompute(full=True, core_attn=True)
        mods = set(w.recompute_modules) if w.recompute_granularity == "selective" else set()
        flags = {name: name in mods for name in RECOMPUTE_FLAGS}
        flags["core_attn"] = flags["core_attn"] or flash
        return Recompute(**flags)


RECOMPUTE_FLAGS = ("core_attn", "layernorm", "mlp", "moe_act", "shared_experts", "moe")


# -- pipeline schedules ---------------------------------------------------------------
def _one_f_one_b(stages: int, vpp: int, m: int) -> F64:
    return np.minimum(m, stages - np.arange(stages)).astype(np.float64)


def _interleaved(stages: int, vpp: int, m: int) -> F64:
    """Megatron's interleaved warm-up ``2(p - s - 1) + (v - 1)p`` chunks plus one, in stages."""
    s = np.arange(stages)
    chunks = 2 * (stages - s - 1) + (vpp - 1) * stages + 1
    return np.minimum(chunks / vpp, m).astype(np.float64)


def _dualpipe(stages: int, vpp: int, m: int) -> F64:
    """DeepSeek-V3 report, Table 2: ``PP + 1`` micro-batches of activations on every rank."""
    return np.full(stages, float(min(m, stages + 1)))


def _zb_h1(stages: int, vpp: int, m: int) -> F64:
    """ZB-H1 (Qi et al. 2023): every rank reaches 1F1B's first-stage peak, ``p``, because
    the weight passes it holds back keep their inputs."""
    return np.full(stages, float(min(m, stages)))


#: closed forms of the micro-batches in flight on each stage ``[S]`` (the memory model walks
#: the schedule itself, :func:`walk_schedule`; the tests check the two agree)
SCHEDULES = {
    "1f1b": _one_f_one_b,
    "zb_h1": _zb_h1,
    "interleaved": _interleaved,
    "dualpipe": _dualpipe,
}


def inflight_micro_batches(schedule: str, stages: int, vpp: int, m: int) -> F64:
    """Micro-batches whose activations stage ``s`` holds at its peak, ``[S]`` (pp = 1: 1)."""
    if stages == 1:
        return np.ones(1)
    fn = lookup(SCHEDULES, schedule, field="parallel.pp_schedule", what="pipeline schedule")
    return fn(stages, vpp, m)


# -- MoE buffers ----------------------------------------------------------------------
def deepep_low_latency_bytes(max_tokens: int, hidden: int, num_experts: int) -> float:
    """DeepEP's low-latency RDMA buffer (``csrc/config.hpp`` ``LowLatencyLayout``).

    Two (odd/even) copies of a send buffer ``max(T·dispatch_msg, E·T·combine_msg)``,
    a receive buffer ``E·T·max(dispatch_msg, combine_msg)`` and signalling ``E·4``;
    a dispatch message is ``16 + max(2h, h + 4h/128)`` bytes, a combine one ``2h``.
    """
    scales = hidden // 128
    disp = 16 + max(2 * hidden, hidden + 4 * scales)
    comb = 2 * hidden
    send = max(max_tokens * disp, num_experts * max_tokens * comb)
    recv = num_experts * max_tokens * max(disp, comb)
    return 2.0 * (send + recv + num_experts * 4)


def moe_saved_bytes(scn: Scenario, recv: F64, sent: F64) -> tuple[F64, F64]:
    """``(tokens, expert_act)`` bytes one MoE layer saves for backward, per GPU.

    ``recv`` rows the GPU's experts ran, ``sent`` rows it dispatched (same shape).
    Tokens: expert inputs ``recv · D`` and returned outputs ``sent · D``.
    Expert activations: ``recv · F / etp · factor`` (:func:`intermediate_factor`;
    2 with ``moe_act`` recompute), the router's fp32 probabilities ``T · E · 4``
    and the shared experts' intermediate (``T · F_sh · factor``: a TP rank runs the
    group's ``tp · T`` tokens through ``1/tp`` of the columns).
    """
    m, T, rc = scn.model, scn.workload.tokens_per_gpu, Recompute.of(scn)
    b = act_bytes(m.dtype)
    tokens = (recv + sent) * m.hidden_size * b
    factor = intermediate_factor(True, scn.memory.fused_activation)
    per_row = m.moe_intermediate_size / scn.parallel.etp * (2.0 if rc.moe_act else factor)
    act = recv * per_row * b + T * m.num_experts * 4.0
    if m.num_shared_experts and not rc.shared_experts:
        F_sh = m.shared_expert_intermediate_size or m.moe_intermediate_size
        act = act + T * F_sh * factor * b * m.num_shared_experts
    return tokens, act


def recv_bound_rows(scn: Scenario) -> tuple[float, str]:
    """Most rows one GPU's experts can receive in one layer, and what bounds it.

    With a capacity factor every source sends each expert at most its capacity
    (summed over capacity domains): ``ep · E/ep · C``. Dropless, every source may
    send all its tokens to one GPU, one row per local expert chosen:
    ``ep · T · min(k, E/ep)``.
    """
    m, r, T, ep = scn.model, scn.router, scn.workload.tokens_per_gpu, scn.parallel.ep
    local = m.num_experts // ep
    dropless = float(ep * T * min(m.top_k, local))
    seq = r.sequence_length if r.capacity_per == "sequence" else None
    caps = capacity.capacities(
        capacity.domain_sizes(T, seq), m.num_experts, m.top_k, r.capacity_factor
    )
    if caps is None:
        return dropless, "dropless: every source sends all its tokens to one GPU"
    return min(dropless, float(ep * local * caps.sum())), "capacity factor"


# -- the whole report -----------------------------------------------------------------
@dataclass(frozen=True)
class MemoryReport:
    """Bytes per part and GPU (``parts[name]`` is ``[G]``) and where the peak is."""

    parts: dict[str, F64]
    stage_G: NDArray[np.int64]
    inflight_S: F64
    hbm_bytes: float
    recv_rows_peak: float
    recv_rows_mean: float
    recv_bound: tuple[float, str]

    @property
    def total_G(self) -> F64:
        return np.sum([self.parts[p] for p in PARTS], axis=0)

    @property
    def peak_gpu(self) -> int:
        return int(np.argmax(self.total_G))

    @property
    def fits(self) -> bool:
        return bool(self.total_G.max() <= self.hbm_bytes)

    def to_dict(self, scn: Scenario) -> dict[str, Any]:
        total, g = self.total_G, self.peak_gpu
        row = scn.model.hidden_size * act_bytes(scn.model.dtype)
        out: dict[str, Any] = {
            "peak_GiB": float(total[g]) / GiB,
            "peak_gpu": g,
            "peak_stage": int(self.stage_G[g]),
            "hbm_GiB": self.hbm_bytes / GiB,
            "headroom_GiB": (self.hbm_bytes - float(total[g])) / GiB,
            "mean_GiB": float(total.mean()) / GiB,
            "min_GiB": float(total.min()) / GiB,
            "parts_GiB": {p: float(self.parts[p][g]) / GiB for p in PARTS},
            "inflight_micro_batches": [float(v) for v in self.inflight_S],
            "schedule": scn.parallel.pp_schedule if scn.parallel.pp > 1 else "none",
            "recompute": scn.workload.recompute_granularity,
            "recv_rows_peak": self.recv_rows_peak,
            "recv_rows_mean": self.recv_rows_mean,
            "recv_buffer_peak_GiB": self.recv_rows_peak * row / GiB,
            "recv_rows_bound": self.recv_bound[0],
            "recv_buffer_bound_GiB": self.recv_bound[0] * row / GiB,
            "recv_bound_by": self.recv_bound[1],
        }
        if len(total) <= 256:
            out["per_gpu_GiB"] = [float(v) / GiB for v in total]
        return out


def memory_report(scn: Scenario, hw: HardwareProfile, plan: StepPlan) -> MemoryReport:
    """Per-GPU memory of the step ``plan`` prices (see the module docstring)."""
    G, S = plan.topo.num_gpus, scn.parallel.pp
    stage_G = np.arange(G) // (G // S)
    pipe, ranks = rank_layers(scn)
    recv_LMG, sent_LMG = priced_rows(plan)
    tok_LMG, act_LMG = moe_saved_bytes(scn, recv_LMG, sent_LMG)
    parts = {p: np.zeros(G) for p in PARTS}
    inflight = np.ones(S)
    mtp = scn.model.mtp_num_layers
    for s, rank in enumerate(ranks):
        sel = stage_G == s
        main_moe = rank.moe - (mtp if rank.last else 0)
        sp = stage_params(scn, s, rank.dense, main_moe, first=rank.first, last=rank.last)
        for name, v in state_bytes(scn, sp).items():
            parts[name][sel] = v
        moe_idx = np.arange(rank.moe) % plan.layers
        loads = (tok_LMG[:, :, sel], act_LMG[:, :, sel], recv_LMG[moe_idx][:, :, sel])
        inflight[s] = _rank_activations(scn, parts, sel, pipe, s, rank, plan, loads)
        parts["kv_cache"][sel] = kv_cache_bytes(scn, rank.dense + rank.moe)
        if rank.last and plan.training:
            parts["activations"][sel] += logits_bytes(scn)
    parts["dispatcher"] = dispatcher_bytes(scn, recv_LMG, sent_LMG)
    parts["reserve"][:] = scn.memory.reserve_GiB * GiB
    return MemoryReport(
        parts=parts,
        stage_G=stage_G.astype(np.int64),
        inflight_S=inflight,
        hbm_bytes=hw.gpu.hbm_GiB * GiB,
        recv_rows_peak=float(recv_LMG.max()),
        recv_rows_mean=float(recv_LMG.mean()),
        recv_bound=recv_bound_rows(scn),
    )


def priced_rows(plan: StepPlan) -> tuple[F64, F64]:
    """Rows received and sent ``[L, M, G]`` of every (layer, micro-batch) the engine priced.

    The plan prices only the pairs the schedule runs (:class:`~.plan.WorkTable`);
    a pair it did not run (DualPipe runs half the micro-batches through each chunk)
    takes the mean of that layer's priced micro-batches, so memory never forces
    loads the step does not draw.
    """
    G, L, M = plan.topo.num_gpus, plan.work.layers, plan.work.mbs
    recv, sent = np.full((L, M, G), np.nan), np.full((L, M, G), np.nan)
    for (layer, mb), w in plan.work.priced().items():
        recv[layer, mb], sent[layer, mb] = w.recv_rows_G, w.sent_rows_G
    for a in (recv, sent):
        known = ~np.isnan(a[:, :, 0])
        if not known.any():
            a[:] = 0.0
            continue
        fill = np.nanmean(np.where(known[:, :, None], a, np.nan), axis=1, keepdims=True)
        fill = np.where(np.isnan(fill), np.nanmean(a, axis=(0, 1), keepdims=True), fill)
        np.copyto(a, np.broadcast_to(fill, a.shape), where=~known[:, :, None])
    return recv, sent


def _rank_activations(
    scn: Scenario,
    parts: dict[str, F64],
    sel: NDArray[np.bool_],
    pipe: Pipeline,
    r: int,
    rank: RankLayers,
    plan: StepPlan,
    loads: tuple[F64, F64, F64],
) -> float:
    """Fill the activation parts of pipeline rank ``r``'s GPUs; returns its in-flight
    micro-batches in units of one stage's layers (``L / pp``), see :func:`walk_schedule`."""
    tok_LMG, act_LMG, recv_LMG = loads
    attn, ffn = dense_layer_bytes(scn)
    b, D = act_bytes(scn.model.dtype), scn.model.hidden_size
    F, T = scn.model.moe_intermediate_size / scn.parallel.etp, scn.workload.tokens_per_gpu
    one_tok = tok_LMG.max((0, 1)) if rank.moe else 0.0
    one_act = act_LMG.max((0, 1)) if rank.moe else 0.0
    if not plan.training:  # one layer's working set at a time
        parts["moe_tokens"][sel], parts["moe_expert_act"][sel] = one_tok, one_act
        parts["activations"][sel] = attn + (ffn if rank.dense and not rank.moe else 0.0)
        return 1.0
    rc = Recompute.of(scn)
    rebuilt = rc.full or rc.moe  # the MoE part is rebuilt in backward, one layer at a time
    per_layer = (T * D * b, T * D * b) if rc.full else (attn + ffn, attn)
    chunks = _chunk_bytes(rank, per_layer, tok_LMG, act_LMG, plan.layers, kept=not rebuilt)
    peak, inflight = walk_schedule(pipe, r, chunks, plan.micro_batches)
    parts["activations"][sel] = peak[0] + (attn + ffn * (rank.dense > 0) if rc.full else 0.0)
    parts["moe_tokens"][sel] = peak[1] + (one_tok if rebuilt else 0.0)
    parts["moe_expert_act"][sel] = peak[2] + (one_act if rebuilt else 0.0)
    trans = recv_LMG.max((0, 1)) * (D + F) * b if rank.moe else np.zeros(int(sel.sum()))
    if rank.dense:
        trans = np.maximum(trans, T * (D + _dense_ffn(scn)) * b)
    parts["transient"][sel] = trans
    return inflight


#: one chunk's saved bytes per micro-batch: (dense part, MoE rows ``[M, G]``, MoE act ``[M, G]``)
Chunk = tuple[float, F64, F64]


def _chunk_bytes(
    rank: RankLayers,
    per_layer: tuple[float, float],
    tok_LMG: F64,
    act_LMG: F64,
    plan_layers: int,
    *,
    kept: bool,
) -> dict[int, Chunk]:
    """Saved bytes of each of the rank's chunks (by virtual stage) for one micro-batch.

    ``per_layer`` = (a dense layer, a MoE layer's attention and norms); the rank's
    MoE layers take the plan's drawn layers in order (cycling when there are more).
    """
    out, j = {}, 0
    M, n = tok_LMG.shape[1], tok_LMG.shape[2]
    for stage, kinds in zip(rank.stages, rank.kinds, strict=True):
        moe = kinds.count("moe")
        idx = np.arange(j, j + moe) % plan_layers
        j += moe
        tok = tok_LMG[idx].sum(0) if kept and moe else np.zeros((M, n))
        act = act_LMG[idx].sum(0) if kept and moe else np.zeros((M, n))
        out[stage] = (kinds.count("dense") * per_layer[0] + moe * per_layer[1], tok, act)
    return out


#: tasks that free a (stage, micro-batch)'s activations: the (whole or weight) backward
FREES = ("B", "W")


def walk_schedule(
    pipe: Pipeline, r: int, chunks: dict[int, Chunk], plan_mbs: int
) -> tuple[tuple[F64, F64, F64], float]:
    """Peak saved bytes per GPU of rank ``r`` over its schedule, and its in-flight count
    (most (virtual stage, micro-batch) pairs held at once, in ``L / pp`` layers' worth:
    Korthikanti's and the DeepSeek-V3 report's unit; :func:`inflight_micro_batches`
    gives their closed forms).

    Walks the rank's slots in order: a forward ``F`` of (stage, micro-batch) adds
    that chunk's bytes, a backward ``B`` (or the weight pass ``W`` of a split
    backward, which still needs the inputs) frees them. In a slot of two lanes
    both forwards count before either frees. Micro-batch ``i`` uses the plan's
    loads of micro-batch ``i mod`` (micro-batches drawn). Per GPU, the parts are
    taken when its total peaks.
    """
    n = next(iter(chunks.values()))[1].shape[1]
    const, tok, act = 0.0, np.zeros(n), np.zeros(n)
    best = (np.zeros(n), np.zeros(n), np.zeros(n))
    held = most = 0
    for slot in pipe.slots[r]:
        tasks = [t for lane in slot for t in lane]
        for kind, stage, mb in tasks:
            if kind == "F":
                c, i = chunks[stage], mb % plan_mbs
                const, tok, act, held = const + c[0], tok + c[1][i], act + c[2][i], held + 1
        most = max(most, held)
        up = const + tok + act > best[0] + best[1] + best[2]
        best = (
            np.where(up, const, best[0]),
            np.where(up, tok, best[1]),
            np.where(up, act, best[2]),
        )
        for kind, stage, mb in tasks:
            if kind in FREES:
                c, i = chunks[stage], mb % plan_mbs
                const, tok, act, held = const - c[0], tok - c[1][i], act - c[2][i], held - 1
    return best, most * pipe.ranks / pipe.stages  # in stages' worth of layers


def _dense_ffn(scn: Scenario) -> int:
    d = scn.model.dense
    return (d.dense_intermediate_size if d is not None else None) or scn.model.moe_intermediate_size


def dense_layer_bytes(scn: Scenario) -> tuple[float, float]:
    """``(attention + norms, dense FFN)`` bytes one GPU saves per layer and micro-batch.

    Korthikanti's ``s · b`` is the TP x CP group's batch (``tokens_per_gpu · tp · cp``
    with sequence parallelism); CP splits what remains by ``cp``.
    """
    d, m, mem, par = scn.model.dense, scn.model, scn.memory, scn.parallel
    rc, b = Recompute.of(scn), act_bytes(m.dtype)
    sb = scn.workload.tokens_per_gpu * par.tp * par.cp
    keep_norm = not rc.layernorm
    ffn = ffn_bytes(
        sb, m.hidden_size, _dense_ffn(scn), gated=True, fused=mem.fused_activation,
        intermediate=not rc.mlp, tp=par.tp, sp=par.sp, dropout=mem.dropout, b=b,
        norm_outputs=keep_norm,
    )  # fmt: skip
    if d is None:
        return 0.0, ffn / par.cp
    dims, latent = None, 0
    if d.kind == "mla":
        qk = (d.qk_nope_head_dim or 0) + (d.qk_rope_head_dim or 0)
        H, v = d.num_attention_heads, d.v_head_dim or 0
        dims = (H * qk, H * qk, H * v, H * v)
        latent = (d.q_lora_rank or 0) + (d.kv_lora_rank or 0) + (d.qk_rope_head_dim or 0)
    attn = attention_bytes(
        sb, m.hidden_size, d.num_attention_heads, d.num_key_value_heads, d.head_dim,
        d.seq_length, selective=rc.core_attn, dims=dims, latent=latent, tp=par.tp, sp=par.sp,
        dropout=mem.dropout, b=b, norm_outputs=keep_norm,
    )  # fmt: skip
    return attn / par.cp, ffn / par.cp


def logits_bytes(scn: Scenario) -> float:
    """The LM head's logits and loss on the last stage, Korthikanti's ``4 s b V / t``."""
    V, par = scn.model.vocab_size or 0, scn.parallel
    return 4.0 * scn.workload.tokens_per_gpu * par.tp * V / par.tp


def dispatcher_bytes(scn: Scenario, recv_LMG: F64, sent_LMG: F64) -> F64:
    """Communication buffers per GPU ``[G]`` (see :data:`DISPATCHER_BUFFERS`); none at ep 1."""
    if scn.parallel.ep == 1:
        return np.zeros(recv_LMG.shape[2])
    fn = lookup(DISPATCHER_BUFFERS, scn.dispatcher, field="dispatcher", what="dispatcher")
    return np.broadcast_to(fn(scn, recv_LMG, sent_LMG), recv_LMG.shape[2]).astype(np.float64)


def _send_buffer(scn: Scenario, recv_LMG: F64, sent_LMG: F64) -> F64:
    """The permuted rows of one layer waiting for the all-to-all (dispatch dtype)."""
    return sent_LMG.max((0, 1)) * row_bytes(scn.model.hidden_size, scn.dispatch_dtype)


def _gathered(scn: Scenario, recv_LMG: F64, sent_LMG: F64) -> F64:
    P, T = scn.parallel.ep, scn.workload.tokens_per_gpu
    return np.asarray(P * T * row_bytes(scn.model.hidden_size, scn.dispatch_dtype))


def _deepep_ll(scn: Scenario, recv_LMG: F64, sent_LMG: F64) -> F64:
    m = scn.model
    return np.asarray(
        deepep_low_latency_bytes(scn.workload.tokens_per_gpu, m.hidden_size, m.num_experts)
    )


#: dispatcher -> its buffers per GPU: by the loads (all-to-all) or fixed (DeepEP low latency)
DISPATCHER_BUFFERS = {
    "alltoall": _send_buffer,
    "hierarchical": _send_buffer,
    "allgather": _gathered,
    "low_latency": _deepep_ll,
}


def kv_cache_bytes(scn: Scenario, layers: int) -> float:
    """KV cache of one GPU's ``layers`` (inference): tokens cached x bytes per token and layer.

    Decode: ``tokens_per_gpu`` sequences per micro-batch, each ``seq_length`` long;
    prefill: the ``tokens_per_gpu`` prompt tokens of each micro-batch. GQA/MHA:
    ``2 · kv_heads · head_dim`` per token, K/V heads split over TP (replicated
    when there are fewer heads than TP ranks); MLA: the compressed latent
    ``kv_lora_rank + qk_rope_head_dim`` (DeepSeek-V2/V3), on every TP rank.
    """
    d, w = scn.model.dense, scn.workload
    if w.mode == "training" or d is None:
        return 0.0
    per_mb = w.tokens_per_gpu * (d.seq_length // scn.parallel.cp if w.mode == "decode" else 1)
    tokens = per_mb * w.micro_batches
    b = DTYPE_BYTES[scn.memory.kv_cache_dtype or scn.model.dtype]
    if d.kind == "mla":
        width = float((d.kv_lora_rank or 0) + (d.qk_rope_head_dim or 0))
    else:
        width = (
            2.0 * d.num_key_value_heads * d.head_dim / min(scn.parallel.tp, d.num_key_value_heads)
        )
    return float(layers * tokens * width * b)
