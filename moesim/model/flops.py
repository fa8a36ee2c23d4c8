"""FLOPs per token and the model-FLOPs formula behind MFU.

D = hidden size, H = query heads, KV = key/value heads, hd = head dim,
S = sequence length, V = vocabulary.

One formula per model, Megatron / MaxText style: training FLOPs per token are
``6 * N_matmul + 3 * A`` (forward ``2 N + A``; backward twice the forward),
where ``N_matmul`` is the weights one token multiplies (attention projections,
dense FFN, router, top-k routed + shared experts, LM head, MTP modules; no
embedding lookup, norms or biases) and ``A`` is the attention core,
``softmax(QK^T) V``, per token: ``2 * H * (d_qk + d_v) * S_eff`` per layer
with ``S_eff`` the mean keys a query sees (``S / 2`` causal, window-limited
for sliding layers, ``S`` for a decode token reading its whole cache).
Recompute is not model FLOPs and is not counted (MFU, not HFU).
"""

from __future__ import annotations

from moesim.config.scenario import DenseConfig, ModelConfig, Scenario
from moesim.model.params import count_params


def qk_v_dims(d: DenseConfig) -> tuple[int, int]:
    """Per-head dims of the query/key and of the value the core multiplies."""
    if d.kind == "mla":
        return (d.qk_nope_head_dim or 0) + (d.qk_rope_head_dim or 0), d.v_head_dim or 0
    return d.head_dim, d.head_dim


def attention_proj_flops(d: DenseConfig, D: int) -> float:
    """Forward FLOPs per token of one layer's attention projections (2 per MAC).

    MHA/GQA: ``2 (D*H*hd + 2*D*KV*hd + H*hd*D)``. MLA with ranks ``r_q, r_kv``:
    ``2 (D r_q + r_q H (nope+rope) + D (r_kv + rope) + r_kv H (nope + v) + H v D)``.
    """
    H = d.num_attention_heads
    if d.kind != "mla":
        q, kv = H * d.head_dim, d.num_key_value_heads * d.head_dim
        return 2.0 * (D * q + 2 * D * kv + q * D)
    nope, rope, v = d.qk_nope_head_dim or 0, d.qk_rope_head_dim or 0, d.v_head_dim or 0
    r_kv = d.kv_lora_rank or 0
    if d.q_lora_rank:
        q = D * d.q_lora_rank + d.q_lora_rank * H * (nope + rope)
    else:
        q = D * H * (nope + rope)
    kv = D * (r_kv + rope) + r_kv * H * (nope + v)
    return 2.0 * (q + kv + H * v * D)


def mean_keys(seq: int, window: int | None, causal: bool) -> float:
    """Mean keys a query attends to in a sequence of ``seq`` (continuous form)."""
    if not causal:
        return float(seq if window is None else min(seq, window))
    if window is None or window >= seq:
        return seq / 2.0
    return window * (1.0 - window / (2.0 * seq))


def attention_core_flops(d: DenseConfig, *, causal: bool = True) -> float:
    """Forward FLOPs per token of one full-attention layer's core: ``2 H (d_qk + d_v) S_eff``."""
    dqk, dv = qk_v_dims(d)
    return 2.0 * d.num_attention_heads * (dqk + dv) * mean_keys(d.seq_length, None, causal)


def core_flops_all_layers(m: ModelConfig, *, causal: bool = True) -> float:
    """Attention-core forward FLOPs per token summed over the layers (sliding ones windowed)."""
    d = m.dense
    if d is None:
        return 0.0
    layers = d.num_dense_layers + m.num_moe_layers * m.moe_layer_freq + m.mtp_num_layers
    dqk, dv = qk_v_dims(d)
    per_key = 2.0 * d.num_attention_heads * (dqk + dv)
    full = mean_keys(d.seq_length, None, causal)
    slide = mean_keys(d.seq_length, d.sliding_window, causal)
    n_slide = min(d.num_sliding_layers, layers)
    return per_key * ((layers - n_slide) * full + n_slide * slide)


def matmul_params(m: ModelConfig) -> float:
    """``N_matmul``: weights one token multiplies in a forward (see module docstring)."""
    c = count_params(m)
    D = m.hidden_size
    layers = m.num_moe_layers * m.moe_layer_freq + (m.dense.num_dense_layers if m.dense else 0)
    n = c.active - _non_matmul(m, layers + m.mtp_num_layers)
    if m.tie_word_embeddings and m.vocab_size:
        n += m.vocab_size * D  # the tied head still multiplies
    if m.vocab_size:
        n += m.mtp_num_layers * m.vocab_size * D  # each MTP depth runs the shared head
    return float(n)


def _non_matmul(m: ModelConfig, layers: int) -> int:
    """Norm scales, biases and sinks inside ``ParamCounts.active`` (not multiplied)."""
    D, d = m.hidden_size, m.dense
    per_layer = 2 * D  # input / post-attention norms
    if d is not None:
        if d.kind == "mla":
            per_layer += (d.q_lora_rank or 0) + (d.kv_lora_rank or 0)
        else:
            q, kv = d.num_attention_heads * d.head_dim, d.num_key_value_heads * d.head_dim
            if d.attention_bias or d.qkv_bias:
                per_layer += q + 2 * kv
            if d.attention_bias:
                per_layer += D
            if d.qk_norm:
                per_layer += 2 * d.head_dim
            if d.attention_sinks:
                per_layer += d.num_attention_heads
    moe = 0
    if m.router_bias:
        moe += m.num_experts
    if m.expert_bias:
        moe += m.top_k * (2 * m.moe_intermediate_size + D)
    n = layers * per_layer + (m.num_moe_layers + m.mtp_num_layers) * moe
    n += m.mtp_num_layers * 3 * D  # enorm, hnorm, shared-head norm
    return n + (D if m.vocab_size else 0)  # final norm


def forward_flops_per_token(m: ModelConfig, *, causal: bool = True) -> float:
    """``2 N_matmul + A`` (see module docstring)."""
    return 2.0 * matmul_params(m) + core_flops_all_layers(m, causal=causal)


def model_flops_per_token(scn: Scenario) -> float:
    """Model FLOPs per token of ``scn``: 3x forward for training, 1x for inference."""
    causal = scn.workload.mode != "decode"
    fwd = forward_flops_per_token(scn.model, causal=causal)
    return 3.0 * fwd if scn.workload.mode == "training" else fwd


FORMULA = (
    "6*N_matmul + 3*A per token (training; forward 2*N_matmul + A): N_matmul = active matmul "
    "weights incl. LM head and MTP, A = sum over layers of 2*H*(d_qk+d_v)*S_eff, S_eff = S/2 causal"
)
