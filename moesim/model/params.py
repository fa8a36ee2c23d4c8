"""Parameter counts of a model from its shapes, the way Hugging Face builds it.

D = hidden size, H = query heads, KV = key/value heads, hd = head dim,
F = expert FFN size, E = routed experts, V = vocabulary. Counts are exact
element counts of every weight, bias and norm scale (checked against
``transformers`` models built on the meta device, tests/test_model.py).
MTP modules (DeepSeek-V3) are counted apart: HF does not build them, and they
share the main model's embedding and LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.config.scenario import DenseConfig, ModelConfig, Scenario


@dataclass(frozen=True)
class ParamCounts:
    """Elements of one model, split by where they live and what a token uses."""

    embedding: int  # input embedding (V x D)
    lm_head: int  # output projection (0 when tied) + final norm
    attention: int  # every layer's attention, its norms included
    dense_ffn: int  # dense-FFN layers' MLPs
    experts: int  # routed experts of every MoE layer (what EP shards)
    moe_other: int  # routers and shared experts of every MoE layer
    mtp: int  # MTP modules (not in HF's model), embedding / head shared
    active_experts: int  # routed experts one token runs (top_k per MoE layer)

    @property
    def total(self) -> int:
        """What HF's model holds: everything but the MTP modules."""
        return self.embedding + self.lm_head + self.non_embedding - self.mtp

    @property
    def non_embedding(self) -> int:
        return self.attention + self.dense_ffn + self.experts + self.moe_other + self.mtp

    @property
    def with_mtp(self) -> int:
        return self.total + self.mtp

    @property
    def active(self) -> int:
        """Parameters one token's forward reads (MTP included, embedding row excluded)."""
        dense_part = self.attention + self.dense_ffn + self.moe_other + self.lm_head
        return dense_part + self.active_experts + self.mtp_active

    mtp_active: int = 0  # MTP parameters one token uses (its experts: top_k only)


def attention_params(d: DenseConfig, D: int) -> int:
    """One layer's attention: projections, their biases, q/k norms, sinks, input norm."""
    H = d.num_attention_heads
    if d.kind == "mla":
        return _mla_params(d, D) + D
    q, kv = H * d.head_dim, d.num_key_value_heads * d.head_dim
    n = D * q + 2 * D * kv + q * D
    if d.attention_bias or d.qkv_bias:
        n += q + 2 * kv
    if d.attention_bias:
        n += D
    if d.qk_norm:
        n += 2 * d.head_dim
    if d.attention_sinks:
        n += H
    return n + D  # input_layernorm


def _mla_params(d: DenseConfig, D: int) -> int:
    H = d.num_attention_heads
    nope, rope, v = d.qk_nope_head_dim or 0, d.qk_rope_head_dim or 0, d.v_head_dim or 0
    kv_rank = d.kv_lora_rank or 0
    if d.q_lora_rank:
        q = D * d.q_lora_rank + d.q_lora_rank + d.q_lora_rank * H * (nope + rope)
    else:
        q = D * H * (nope + rope)
    kv = D * (kv_rank + rope) + kv_rank + kv_rank * H * (nope + v)
    return q + kv + H * v * D


def mlp_params(D: int, F: int, *, gated: bool = True, bias: bool = False) -> int:
    """One FFN: gate+up (gated) or up, and down; optional biases."""
    mats = 3 if gated else 2
    n = mats * D * F
    if bias:
        n += (mats - 1) * F + D
    return n


def moe_other_params(m: ModelConfig) -> int:
    """One MoE layer outside its routed experts: router and shared experts."""
    D, E = m.hidden_size, m.num_experts
    n = D * E + (E if m.router_bias else 0)
    if m.num_shared_experts:
        F_sh = m.shared_expert_intermediate_size or m.moe_intermediate_size
        n += m.num_shared_experts * mlp_params(D, F_sh)
        if m.shared_expert_gate:
            n += D
    return n


def _layer_norm_after_attention(m: ModelConfig) -> int:
    return m.hidden_size  # post_attention_layernorm


def count_params(m: ModelConfig) -> ParamCounts:
    """Exact parameter counts of ``m`` (see module docstring)."""
    D = m.hidden_size
    d = m.dense
    moe_layers = m.num_moe_layers
    dense_layers = (d.num_dense_layers if d else 0) + moe_layers * (m.moe_layer_freq - 1)
    layers = moe_layers + dense_layers
    attn = (attention_params(d, D) if d else D) + _layer_norm_after_attention(m)
    F_d = (d.dense_intermediate_size if d else None) or m.moe_intermediate_size
    expert = mlp_params(D, m.moe_intermediate_size, bias=m.expert_bias)
    other = moe_other_params(m)
    V = m.vocab_size or 0
    head = (0 if m.tie_word_embeddings else V * D) + (D if m.vocab_size else 0)
    mtp_layer = attn + m.num_experts * expert + other + 2 * D + 2 * D * D + D
    mtp_active = attn + m.top_k * expert + other + 2 * D + 2 * D * D + D
    return ParamCounts(
        embedding=V * D,
        lm_head=head,
        attention=layers * attn,
        dense_ffn=dense_layers * mlp_params(D, F_d),
        experts=moe_layers * m.num_experts * expert,
        moe_other=moe_layers * other,
        mtp=m.mtp_num_layers * mtp_layer,
        active_experts=moe_layers * m.top_k * expert,
        mtp_active=m.mtp_num_layers * mtp_active,
    )


@dataclass(frozen=True)
class RankParams:
    """Parameters one GPU holds, by how they are sharded (elements)."""

    expert: float  # routed experts: / (ep * etp) per MoE layer, layers / pp
    non_expert: float  # attention, dense FFN, routers, shared experts, norms: / tp, / pp
    embedding: float  # embedding + LM head (+ MTP) on the first / last stage, / tp

    @property
    def total(self) -> float:
        return self.expert + self.non_expert + self.embedding


def params_per_rank(scn: Scenario) -> RankParams:
    """Parameters on the busiest GPU of ``scn`` (Megatron-Core sharding).

    Routed experts are split over ``ep`` (whole experts) and ``etp`` (each
    expert's FFN); everything else over ``tp`` (norms and routers are
    replicated in Megatron; their share is counted split here, which is a
    < 0.1 % difference); layers over ``pp``, with the embedding on the first
    stage and the LM head (and MTP modules) on the last, so with ``pp > 1`` the
    busiest stage holds the larger of the two. Not divided by DP: the
    distributed optimizer's sharding is the caller's to apply (``dp`` for
    non-expert, ``edp`` for expert parameters).
    """
    p = scn.parallel
    c = count_params(scn.model)
    stage = 1.0 / p.pp
    mtp_experts = scn.model.mtp_num_layers * (
        c.experts / scn.model.num_moe_layers if scn.model.num_moe_layers else 0.0
    )
    expert = c.experts * stage / (p.ep * p.etp)
    non_expert = (c.attention + c.dense_ffn + c.moe_other) * stage / p.tp
    # pp > 1: the embedding on the first stage, the LM head on the last
    ends = c.embedding + c.lm_head if p.pp == 1 else max(c.embedding, c.lm_head)
    emb = ends / p.tp
    emb += (c.mtp - mtp_experts) / p.tp
    expert += mtp_experts / (p.ep * p.etp)
    return RankParams(expert=expert, non_expert=non_expert, embedding=emb)
