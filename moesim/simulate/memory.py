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

import math
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


def stage_layers(scn: Scenario) -> list[tuple[int, int]]:
    """``(dense, moe)`` layers of every stage: the layer stack (leading dense layers, then
    each MoE layer after its ``moe_layer_freq - 1`` dense ones) split into ``pp``
    contiguous parts, the first parts one layer longer when it does not divide."""
    m = scn.model
    nd = m.dense.num_dense_layers if m.dense is not None else 0
    kinds = np.array([0] * nd + ([0] * (m.moe_layer_freq - 1) + [1]) * m.num_moe_layers)
    return [(int((p == 0).sum()), int(p.sum())) for p in np.array_split(kinds, scn.parallel.pp)]


def stage_params(scn: Scenario, stage: int, dense: int, moe: int) -> StageParams:
    """Parameters one GPU of ``stage`` holds, from :func:`moesim.model.count_params`.

    Routed experts split over ``ep x etp``, the rest (attention, dense FFNs,
    routers, shared experts, norms) over ``tp``; the embedding on the first stage,
    the LM head and the MTP modules on the last (Megatron-Core).
    """
    m, par = scn.model, scn.parallel
    c = count_params(m)
    layers, dense_total = scn.num_layers, scn.num_layers - m.num_moe_layers
    expert_layer = c.experts / m.num_moe_layers
    other = (dense + moe) * c.attention / layers + moe * c.moe_other / m.num_moe_layers
    other += dense * c.dense_ffn / dense_total if dense_total else 0.0
    expert = moe * expert_layer
    if stage == 0:
        other += c.embedding
    if stage == par.pp - 1:
        mtp_experts = m.mtp_num_layers * expert_layer
        other += c.lm_head + c.mtp - mtp_experts
        expert += mtp_experts
    return StageParams(expert / (par.ep * par.etp), other / par.tp)


def shard_groups(scn: Scenario) -> tuple[int, int]:
    """``(expert, non-expert)`` data-parallel sizes the distributed optimizer shards over:
    expert-DP, and attention DP x CP."""
    par, n = scn.parallel, scn.cluster.num_gpus
    return par.expert_dp(n), par.attention_dp(n) * par.cp


def state_bytes(scn: Scenario, sp: StageParams) -> dict[str, float]:
    """params / grads / optimizer bytes of one GPU holding ``sp``, each group sharded by its DP."""
    par, mem = scn.parallel, scn.memory
    edp, dp = shard_groups(scn)
    dist = scn.training.distributed_optimizer
    pe, ge, oe = state_bytes_per_param(mem, scn.model.dtype, edp, distributed=dist)
    po, go, oo = state_bytes_per_param(mem, scn.model.dtype, dp, distributed=dist)
    # DualPipe: every rank holds two stages (DeepSeek-V3 report, Table 2: parameters 2x)
    copies = 2.0 if par.pp_schedule == "dualpipe" and par.pp > 1 else 1.0
    train = 1.0 if scn.workload.mode == "training" else 0.0  # inference: weights only
    return {
        "params": copies * (sp.expert * pe + sp.other * po),
        "grads": train * copies * (sp.expert * ge + sp.other * go),
        "optimizer": train * copies * (sp.expert * oe + sp.other * oo),
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
    """DeepSeek-V3 report, Table 2: ``PP + 1`` micro-batches of activations on every rank
    (DualPipeV, its V-shaped variant, holds the same with one copy of the parameters)."""
    return np.full(stages, float(min(m, stages + 1)))


#: schedule -> micro-batches of one stage's activations in flight on each stage ``[S]``;
#: ZB-H1 defers weight gradients but keeps 1F1B's activation memory (Qi et al. 2023)
SCHEDULES = {
    "1f1b": _one_f_one_b,
    "zb_h1": _one_f_one_b,
    "interleaved": _interleaved,
    "dualpipe": _dualpipe,
    "dualpipev": _dualpipe,
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
    layers = stage_layers(scn)
    recv_LMG = np.array([[w.recv_rows_G for w in ws] for ws in plan.work])
    sent_LMG = np.array([[w.sent_rows_G for w in ws] for ws in plan.work])
    tok_LMG, act_LMG = moe_saved_bytes(scn, recv_LMG, sent_LMG)
    inflight = inflight_micro_batches(
        scn.parallel.pp_schedule, S, scn.parallel.vpp, plan.micro_batches
    )
    parts = {p: np.zeros(G) for p in PARTS}
    for s, (dense, moe) in enumerate(layers):
        sel = stage_G == s
        for name, v in state_bytes(scn, stage_params(scn, s, dense, moe)).items():
            parts[name][sel] = v
        idx = np.arange(moe) % plan.layers
        _stage_activations(
            scn,
            parts,
            sel,
            dense,
            moe,
            float(inflight[s]),
            plan.training,
            tok_LMG[idx][:, :, sel],
            act_LMG[idx][:, :, sel],
            recv_LMG[idx][:, :, sel],
        )
        parts["kv_cache"][sel] = kv_cache_bytes(scn, dense + moe)
        if s == S - 1 and plan.training:
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


def _stage_activations(
    scn: Scenario,
    parts: dict[str, F64],
    sel: NDArray[np.bool_],
    dense: int,
    moe: int,
    inflight: float,
    training: bool,
    tok_LMG: F64,
    act_LMG: F64,
    recv_LMG: F64,
) -> None:
    """Fill the activation parts of the GPUs ``sel`` of one stage."""
    attn, ffn = dense_layer_bytes(scn)
    b, D = act_bytes(scn.model.dtype), scn.model.hidden_size
    F, T = scn.model.moe_intermediate_size / scn.parallel.etp, scn.workload.tokens_per_gpu
    one_tok, one_act = (tok_LMG.max((0, 1)), act_LMG.max((0, 1))) if moe else (0.0, 0.0)
    if not training:  # one layer's working set at a time
        parts["moe_tokens"][sel] = one_tok
        parts["moe_expert_act"][sel] = one_act
        parts["activations"][sel] = attn + (ffn if dense and not moe else 0.0)
        return
    rc = Recompute.of(scn)
    if rc.full:  # only each layer's input is kept; one layer is rebuilt at a time
        parts["activations"][sel] = inflight * (dense + moe) * T * D * b + attn + ffn * (dense > 0)
        parts["moe_tokens"][sel], parts["moe_expert_act"][sel] = one_tok, one_act
    else:
        parts["activations"][sel] = inflight * (dense * (attn + ffn) + moe * attn)
        if rc.moe:  # the MoE part is rebuilt in backward, one layer at a time
            parts["moe_tokens"][sel], parts["moe_expert_act"][sel] = one_tok, one_act
        elif moe:
            parts["moe_tokens"][sel] = _window(tok_LMG.sum(0), inflight)
            parts["moe_expert_act"][sel] = _window(act_LMG.sum(0), inflight)
    trans = recv_LMG.max((0, 1)) * (D + F) * b if moe else np.zeros(int(sel.sum()))
    if dense:
        trans = np.maximum(trans, T * (D + _dense_ffn(scn)) * b)
    parts["transient"][sel] = trans


def _window(x_MG: F64, inflight: float) -> F64:
    """Largest sum of ``inflight`` consecutive micro-batches per GPU (fractional: scaled)."""
    M = x_MG.shape[0]
    n = max(1, min(M, math.ceil(inflight)))
    c = np.concatenate([np.zeros((1, x_MG.shape[1])), np.cumsum(x_MG, 0)])
    best = (c[n:] - c[:-n]).max(0)
    return best * min(inflight, M) / n


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
