"""Seconds of the per-layer ops that are the same on every GPU of a micro-batch.

T = tokens one GPU holds (``workload.tokens_per_gpu``), D = hidden size.
Shapes, FLOPs and bytes come from :mod:`moesim.model`; this module prices them
on one :class:`~moesim.costs.model.CostModel`. All values are forward
seconds; the engine doubles GEMMs and keeps memory-bound ops at 1x in the
backward (``BACKWARD_FACTOR``).

With TP a rank multiplies its TP group's ``tp * T`` tokens by ``1/tp`` of each
weight, the FLOPs of its own ``T`` tokens through the whole weight. On a profile
with a measured GEMM table (imported GPU tables) the projections, FFNs and LM
head are priced GEMM by GEMM at their sharded shapes (``[tp T, k] x [k, n/tp]``
or ``[tp T, k/tp] x [k/tp, n]``); otherwise by their FLOPs on the profile's
dense fit or the spec roofline, where TP changes no GEMM time. TP's collectives,
the CP ring and expert TP are ops of the program on the fabric
(:func:`moesim.simulate.plan.layer_collectives`).
Without SP the norms run on all ``tp * T`` tokens of the group.
"""

from __future__ import annotations

from moesim.config.base import DTYPE_BYTES
from moesim.config.router import gate_kind
from moesim.config.scenario import Scenario
from moesim.costs import work
from moesim.costs.model import CostModel
from moesim.model import ops
from moesim.model.flops import mean_keys

#: backward seconds per forward second of each compute op (GEMMs 2x: data + weight grads).
#: The attention core's backward does 2.5x its forward's FLOPs: five matmuls (S = QK^T
#: recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q) against the forward's
#: two, the count of Dao-AILab/flash-attention ``benchmarks/benchmark_flash_attention.py``
#: (``flops(mode="bwd") = 2.5 * f``); priced at the forward's rate.
BACKWARD_FACTOR = {
    "dense": 2.0, "attn_core": 2.5, "norm": 1.0, "gate": 1.0, "permute": 1.0, "unpermute": 1.0,
    "shared_experts": 2.0, "dense_layer": 2.0,
}  # fmt: skip


def _attention(scn: Scenario, cost: CostModel) -> tuple[float, float]:
    """``(projections + core, core)`` seconds of one layer's attention.

    FP8 recipes (Transformer Engine) run the projections in fp8 but the
    ``softmax(QK^T) V`` core in bf16 (flash attention), so the core is priced in bf16.
    """
    m, d = scn.model, scn.model.dense
    if d is None:
        return 0.0, 0.0
    T, dt = scn.workload.tokens_per_gpu, m.dtype
    b = DTYPE_BYTES[dt]
    causal = scn.workload.mode != "decode"
    cf, cb = ops.attention_core(m, T, b, causal=causal)
    core_dt = "bf16" if dt == "fp8" else dt
    pf, pb = ops.attention_proj(d, m.hidden_size, T, b)
    proj = _gemms_or_flops(scn, cost, ops.attention_gemms(d, m.hidden_size), pf, pb)
    table = _core_table_s(scn, cost, core_dt, cb) if causal else None
    core = table if table is not None else float(cost.dense_s(cf, cb, core_dt))
    return proj + core, core


def _core_table_s(scn: Scenario, cost: CostModel, dt: str, nbytes: float) -> float | None:
    """The layer-mean attention core on the profile's measured attention fit
    (:meth:`CostModel.attention_s`, shape :func:`ops.attention_call`), or None without
    one for the attention kind and ``dt``. Sliding-window layers (not in the fit:
    the tables measure full causal masks) keep their FLOPs on the dense fit or roofline."""
    m, d, T = scn.model, scn.model.dense, scn.workload.tokens_per_gpu
    call = ops.attention_call(m, T, scn.parallel.tp, scn.parallel.cp)
    if d is None or call is None:
        return None
    b, s, h, kv, dqk, dv, share = call
    full = cost.attention_s(b, s, h, kv, dqk, dv, dt, mla=d.kind == "mla")
    if full is None:
        return None
    layers = d.num_dense_layers + m.num_moe_layers * m.moe_layer_freq + m.mtp_num_layers
    n_slide = min(d.num_sliding_layers, layers)
    slide = 0.0
    if n_slide:
        keys = mean_keys(d.seq_length, d.sliding_window, causal=True)
        flops = T * 2.0 * d.num_attention_heads * (dqk + dv) * keys
        slide = float(cost.dense_s(flops, nbytes, dt))
    return (float(full) * share * (layers - n_slide) + slide * n_slide) / layers


def _gemms_s(scn: Scenario, cost: CostModel, gemms: list[ops.Gemm]) -> float | None:
    """Seconds of a layer's GEMMs at their TP-sharded shapes (:func:`ops.sharded`) on
    the profile's measured GEMM table (None: no table for the model's dtype; the
    caller prices the FLOPs instead)."""
    dt = scn.model.dtype
    if not cost.has_gemm_table(dt):
        return None
    tp, T = scn.parallel.tp, scn.workload.tokens_per_gpu
    return sum(float(cost.gemm_s(*ops.sharded(g, T, tp), dt)) for g in gemms)


def _gemms_or_flops(
    scn: Scenario,
    cost: CostModel,
    gemms: list[ops.Gemm],
    flops: float,
    nbytes: float,
    copies: int = 1,
) -> float:
    """``copies`` x the GEMMs on the measured table, else ``copies`` x (``flops``,
    ``nbytes``) as one op on the dense fit or the spec roofline."""
    on_table = _gemms_s(scn, cost, gemms)
    if on_table is not None:
        return copies * on_table
    return float(cost.dense_s(copies * flops, copies * nbytes, scn.model.dtype))


def _norm_tokens(scn: Scenario) -> float:
    p = scn.parallel
    return scn.workload.tokens_per_gpu * (1 if p.sp else p.tp)


def _ffn_s(scn: Scenario, cost: CostModel, F: int, copies: int = 1) -> float:
    """A dense SwiGLU FFN (shared expert, dense layer) on T tokens, activation included."""
    m, T = scn.model, scn.workload.tokens_per_gpu
    b = DTYPE_BYTES[m.dtype]
    D = m.hidden_size
    flops, nbytes = float(work.expert_flops(T, D, F)), float(work.expert_bytes(T, D, F, b))
    # the copies side by side: one FFN of copies x F (the table), copies x the FLOPs (else)
    gemm = _gemms_s(scn, cost, ops.ffn_gemms(D, F * copies))
    if gemm is None:
        gemm = float(cost.dense_s(flops * copies, nbytes * copies, m.dtype))
    act = cost.memory_s("activation", ops.swiglu_bytes(T * copies, F, b))
    return float(gemm + act)


def _head_s(scn: Scenario, cost: CostModel) -> tuple[float, float]:
    """``(all, memory-bound)`` seconds of the embedding lookup, LM head, loss, and each
    MTP depth's projection and head; the memory-bound part (loss, lookup) has a
    memory-bound backward (one pass: the softmax gradient, the gradient scatter), the
    rest is GEMMs (data and weight gradients)."""
    m, T = scn.model, scn.workload.tokens_per_gpu
    if not m.vocab_size:
        return 0.0, 0.0
    b, D = DTYPE_BYTES[m.dtype], m.hidden_size
    hf, hb = ops.lm_head(m, T, b)
    heads = 1 + m.mtp_num_layers
    gemm = _gemms_or_flops(scn, cost, ops.lm_head_gemms(m), hf, hb, heads)
    mem = float(cost.memory_s("loss", ops.loss_bytes(m, T, b) * heads))
    mem += float(cost.memory_s("embedding", ops.embedding_bytes(m, T, b) * heads))
    if m.mtp_num_layers:  # each depth's eh_proj
        mtp = ops.mtp_proj_gemms(D)
        gemm += _gemms_or_flops(scn, cost, mtp, 4.0 * T * D * D, 2 * D * D * b, m.mtp_num_layers)
    return gemm + mem, mem


def dense_costs(scn: Scenario, cost: CostModel) -> dict[str, float]:
    """Forward seconds of the ops equal on every GPU (see module docstring)."""
    m, T = scn.model, scn.workload.tokens_per_gpu
    D, K, E, dt = m.hidden_size, m.top_k, m.num_experts, m.dtype
    b = DTYPE_BYTES[dt]
    attn, core = _attention(scn, cost)
    norm = 2.0 * float(cost.memory_s("norm", ops.norm_bytes(_norm_tokens(scn), D, b)))
    shared = 0.0
    if m.num_shared_experts:
        F_sh = m.shared_expert_intermediate_size or m.moe_intermediate_size
        shared = _ffn_s(scn, cost, F_sh, m.num_shared_experts)
    F_d = (m.dense.dense_intermediate_size if m.dense else None) or m.moe_intermediate_size
    dense_layer = attn + _ffn_s(scn, cost, F_d) + norm
    head, head_mem = _head_s(scn, cost)
    return {
        "dense": attn,
        "attn_core": core,
        "norm": norm,
        "gate": float(
            cost.gate_s(T, D, E, K, dt, kind=gate_kind(scn.router.kind, scn.router.n_group))
        ),
        "permute": float(cost.permute_s(T, D, K, dt)),
        "unpermute": float(cost.unpermute_s(T, D, K, dt)),
        "shared_experts": shared,
        "dense_layer": dense_layer,
        "head": head,
        "head_mem": head_mem,
    }


def optimizer_s(scn: Scenario, cost: CostModel) -> float:
    """The optimizer step: a memory-bound pass over the busiest GPU's local parameters.

    With the distributed optimizer (ZeRO-1, ``training.distributed_optimizer``) a GPU
    updates its shard: non-expert parameters over ``dp * cp``, expert ones over ``edp``.
    """
    from moesim.model import params_per_rank

    r, p, n = params_per_rank(scn), scn.parallel, scn.cluster.num_gpus
    local = r.total
    if scn.training.distributed_optimizer:
        local = r.expert / p.expert_dp(n) + (r.non_expert + r.embedding) / (
            p.attention_dp(n) * p.cp
        )
    nbytes = local * scn.workload.optimizer_bytes_per_param
    return float(cost.memory_s("optimizer", nbytes)) if nbytes > 0 else 0.0
