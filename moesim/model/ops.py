"""FLOPs and HBM bytes of the non-MoE ops of one GPU's micro-batch, forward.

T = tokens the GPU holds, D = hidden size, V = vocabulary, b = bytes per
element, S = sequence length. Weights are read once per op; activations are
read and written once. Memory-bound ops (norms, activations, loss, embedding
lookup, optimizer step) have bytes only; the simulator prices them with the
profile's ``copy`` bandwidth (:meth:`moesim.costs.model.CostModel.memory_s`).
"""

from __future__ import annotations

from typing import NamedTuple

from moesim.config.scenario import DenseConfig, ModelConfig
from moesim.model.flops import attention_proj_flops, core_flops_all_layers, qk_v_dims
from moesim.model.params import attention_params


def attention_proj(d: DenseConfig, D: int, T: float, b: float) -> tuple[float, float]:
    """``(flops, bytes)`` of one layer's attention projections for ``T`` tokens."""
    dqk, dv = qk_v_dims(d)
    H = d.num_attention_heads
    acts = T * (2 * D + H * (2 * dqk + dv) + H * dv) * b  # x in, q/k/v out, o in/out
    return T * attention_proj_flops(d, D), attention_params(d, D) * b + acts


#: a GEMM of one layer: ``(n, k, split)``, ``[T, k] x [k, n]`` per token row; ``split``
#: is how TP shards it: "col" (output columns, Megatron's ColumnParallelLinear) or
#: "row" (input rows, RowParallelLinear)
Gemm = tuple[int, int, str]


def attention_gemms(d: DenseConfig, D: int) -> list[Gemm]:
    """One layer's attention projections as GEMMs (their FLOPs are
    :func:`~moesim.model.flops.attention_proj_flops`): MHA/GQA q, k, v and o; MLA
    the q down/up (or q), kv down and up, and o."""
    H = d.num_attention_heads
    if d.kind != "mla":
        q, kv = H * d.head_dim, d.num_key_value_heads * d.head_dim
        return [(q + 2 * kv, D, "col"), (D, q, "row")]
    nope, rope, v = d.qk_nope_head_dim or 0, d.qk_rope_head_dim or 0, d.v_head_dim or 0
    r_kv = d.kv_lora_rank or 0
    out: list[Gemm] = []
    if d.q_lora_rank:
        out += [(d.q_lora_rank, D, "col"), (H * (nope + rope), d.q_lora_rank, "col")]
    else:
        out.append((H * (nope + rope), D, "col"))
    out += [(r_kv + rope, D, "col"), (H * (nope + v), r_kv, "col"), (D, H * v, "row")]
    return out


def ffn_gemms(D: int, F: int) -> list[Gemm]:
    """A SwiGLU FFN: gate and up (``2F`` columns), then down."""
    return [(2 * F, D, "col"), (D, F, "row")]


def lm_head_gemms(m: ModelConfig) -> list[Gemm]:
    """The LM head (vocabulary-parallel columns); none without a vocabulary."""
    return [(m.vocab_size, m.hidden_size, "col")] if m.vocab_size else []


def mtp_proj_gemms(D: int) -> list[Gemm]:
    """One MTP depth's ``eh_proj``: ``[T, 2D] x [2D, D]``."""
    return [(D, 2 * D, "col")]


def sharded(gemm: Gemm, T: float, tp: int) -> tuple[float, float, float]:
    """``(m, n, k)`` one TP rank multiplies: its group's ``tp * T`` rows through ``1/tp``
    of the weight, the output columns of a "col" GEMM, the input rows of a "row" one
    (the FLOPs of ``T`` rows through the whole weight)."""
    n, k, split = gemm
    n_r, k_r = (n / tp, k) if split == "col" else (n, k / tp)
    return T * tp, max(n_r, 1.0), max(k_r, 1.0)


def attention_core(m: ModelConfig, T: float, b: float, *, causal: bool) -> tuple[float, float]:
    """``(flops, bytes)`` of one layer's ``softmax(QK^T)V`` for ``T`` tokens (layer mean).

    Decode (``causal=False``: one new token per sequence) reads the KV cache:
    ``S`` entries of ``2 KV hd`` (GQA) or of the compressed ``kv_lora + rope`` (MLA).
    """
    d = m.dense
    if d is None:
        return 0.0, 0.0
    layers = d.num_dense_layers + m.num_moe_layers * m.moe_layer_freq + m.mtp_num_layers
    flops = T * core_flops_all_layers(m, causal=causal) / layers
    dqk, dv = qk_v_dims(d)
    nbytes = T * d.num_attention_heads * (dqk + dv) * b  # q in, o out (flash: no S x S)
    if not causal:
        if d.kind == "mla":
            per_key = (d.kv_lora_rank or 0) + (d.qk_rope_head_dim or 0)
        else:
            per_key = 2 * d.num_key_value_heads * d.head_dim
        nbytes += T * d.seq_length * per_key * b
    return flops, nbytes


class AttentionCall(NamedTuple):
    """One GPU's causal attention core as one fused-kernel call of ``batch`` sequences of
    ``seq`` tokens with ``heads`` query and ``kv_heads`` KV heads (MLA: K and V per head)
    and head dims ``d_qk``, ``d_v``; the GPU does ``share`` of that call's work."""

    batch: float
    seq: int
    heads: float
    kv_heads: float
    d_qk: int
    d_v: int
    share: float


def attention_call(m: ModelConfig, T: float, tp: int = 1, cp: int = 1) -> AttentionCall | None:
    """The full-attention layers' core of a GPU holding ``T`` tokens, as one kernel call.

    With TP a rank runs ``H / tp`` heads on its group's ``tp T`` tokens; with CP it holds
    ``S / cp`` of each sequence and does ``1 / cp`` of the work of its ``tp T cp / S``
    whole sequences (the ring's chunks priced at the whole sequence's rate). The
    call's FLOPs times ``share`` are the ``T`` tokens' :func:`attention_core` FLOPs of a
    full-attention layer. None without attention.
    """
    d = m.dense
    if d is None:
        return None
    dqk, dv = qk_v_dims(d)
    S, H = d.seq_length, d.num_attention_heads
    kv = H if d.kind == "mla" else d.num_key_value_heads
    return AttentionCall(tp * T * cp / S, S, H / tp, max(kv / tp, 1.0), dqk, dv, 1.0 / cp)


def norm_bytes(T: float, D: int, b: float) -> float:
    """One RMSNorm over ``T x D``: read and write."""
    return 2.0 * T * D * b


def swiglu_bytes(rows: float, F: int, b: float) -> float:
    """SwiGLU activation of ``rows`` FFN rows: read gate and up, write the product."""
    return 3.0 * rows * F * b


def lm_head(m: ModelConfig, T: float, b: float) -> tuple[float, float]:
    """``(flops, bytes)`` of the LM head GEMM for ``T`` tokens (0 without a vocabulary)."""
    V = m.vocab_size or 0
    return 2.0 * T * m.hidden_size * V, (V * m.hidden_size + T * m.hidden_size + T * V) * b


def loss_bytes(m: ModelConfig, T: float, b: float) -> float:
    """Cross-entropy over ``T x V`` logits: read them twice (max, sum of exp)."""
    return 2.0 * T * (m.vocab_size or 0) * b


def embedding_bytes(m: ModelConfig, T: float, b: float) -> float:
    """Embedding lookup: gather ``T`` rows and write them."""
    return 2.0 * T * m.hidden_size * b if m.vocab_size else 0.0
