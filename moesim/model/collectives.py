"""Bytes each GPU sends in the TP / SP, expert-TP and CP collectives of one layer.

T = tokens one GPU holds (``workload.tokens_per_gpu``), D = hidden size,
b = bytes per element, n = group size. Ring algorithms (NCCL's for these
sizes): an all-gather or a reduce-scatter of a tensor of ``n`` shards moves
``(n - 1)`` shards out of every rank; an all-reduce moves twice that.

Per layer, forward (the backward mirrors each one with the same bytes:
all-gather <-> reduce-scatter):

* TP with SP, attention block: all-gather the ``T x D`` input shards before
  the QKV projection, reduce-scatter after the output projection:
  ``2 (tp - 1) T D b``. Without SP one all-reduce of the ``tp T x D`` output:
  the same bytes. Dense-FFN layers and shared experts pay the same again.
* ETP: after the EP all-to-all a rank all-gathers the ``R`` rows the other
  ETP ranks received, and reduce-scatters the expert outputs:
  ``2 (etp - 1) R D b``.
* CP ring attention: a rank's K and V chunk travels the ring, ``cp - 1`` hops:
  ``(cp - 1) T (d_k + d_v) h b`` with ``h = heads / tp`` the rank's heads
  (KV heads for GQA; all heads for MLA, whose K/V are decompressed per head);
  backward passes K/V again and their gradients: twice the forward.
"""

from __future__ import annotations

from moesim.config.base import DTYPE_BYTES
from moesim.config.scenario import DenseConfig, Scenario
from moesim.model.flops import qk_v_dims


def ring_bytes(kind: str, shard_bytes: float, n: int) -> float:
    """Bytes one rank sends in a ring ``allgather``/``reducescatter``/``allreduce``."""
    if n <= 1:
        return 0.0
    factor = {"allgather": 1.0, "reducescatter": 1.0, "allreduce": 2.0}[kind]
    return factor * (n - 1) * shard_bytes


def tp_block_bytes(T: float, D: int, b: float, tp: int) -> float:
    """One TP-sharded block (attention or MLP), forward: AG + RS (SP) or one AR."""
    return ring_bytes("allgather", T * D * b, tp) + ring_bytes("reducescatter", T * D * b, tp)


def etp_bytes(rows: float, D: int, b: float, etp: int) -> float:
    """Expert TP, forward: all-gather of received rows, reduce-scatter of outputs."""
    return 2.0 * ring_bytes("allgather", rows * D * b, etp)


def kv_width(d: DenseConfig, tp: int) -> float:
    """Elements of K plus V per token on one TP rank (what CP rings pass)."""
    dqk, dv = qk_v_dims(d)
    heads = d.num_attention_heads if d.kind == "mla" else d.num_key_value_heads
    return (dqk + dv) * max(heads // tp, 1)


def cp_bytes(T: float, d: DenseConfig, b: float, cp: int, tp: int, *, backward: bool) -> float:
    """CP ring exchange of one attention layer (forward, or backward = 2x forward)."""
    fwd = (cp - 1) * T * kv_width(d, tp) * b if cp > 1 else 0.0
    return 2.0 * fwd if backward else fwd


def layer_collective_bytes(scn: Scenario, expert_rows: float) -> dict[str, float]:
    """Forward bytes one GPU sends per MoE layer in each collective (see module docstring)."""
    m, p = scn.model, scn.parallel
    b = DTYPE_BYTES[m.dtype]
    T, D = float(scn.workload.tokens_per_gpu), m.hidden_size
    out = {
        "tp_attn": tp_block_bytes(T, D, b, p.tp),
        "tp_shared": tp_block_bytes(T, D, b, p.tp) if m.num_shared_experts else 0.0,
        "etp": etp_bytes(expert_rows, D, b, p.etp),
        "cp": cp_bytes(T, m.dense, b, p.cp, p.tp, backward=False) if m.dense else 0.0,
    }
    return out
