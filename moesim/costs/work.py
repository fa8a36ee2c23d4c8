"""Bytes moved and FLOPs done by each MoE op.

T = tokens, D = hidden size, F = expert intermediate size, E = experts,
K = top-k, ``b`` = bytes per element. One definition used by the benchmark
(achieved GB/s and TFLOP/s), the calibration fits and the simulator.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

SCORE_BYTES = 4.0  # router scores are fp32 in every implementation we model
INDEX_BYTES = 8.0  # int64 expert ids / permutation indices


def gate_bytes(T: ArrayLike, D: int, E: int, K: int, b: float) -> NDArray[np.float64]:
    """Read x_TD and W_DE, write logits_TE, read/write scores, write ids and weights."""
    t = np.asarray(T, dtype=np.float64)
    return t * D * b + D * E * b + 3.0 * t * E * SCORE_BYTES + t * K * (INDEX_BYTES + SCORE_BYTES)


def gate_flops(T: ArrayLike, D: int, E: int) -> NDArray[np.float64]:
    return 2.0 * np.asarray(T, dtype=np.float64) * D * E


def permute_bytes(T: ArrayLike, D: int, K: int, b: float) -> NDArray[np.float64]:
    """Gather T*K rows of D elements into expert order: read + write each row."""
    rows = np.asarray(T, dtype=np.float64) * K
    return 2.0 * rows * D * b + rows * INDEX_BYTES


def unpermute_bytes(T: ArrayLike, D: int, K: int, b: float) -> NDArray[np.float64]:
    """Read T*K expert outputs and their weights, write T combined rows."""
    t = np.asarray(T, dtype=np.float64)
    return t * K * (D * b + SCORE_BYTES + INDEX_BYTES) + t * D * b


def regroup_bytes(M: ArrayLike, D: int, b: float) -> NDArray[np.float64]:
    """Sort M received rows expert-major and back (two gathers): read + write each, twice."""
    rows = np.asarray(M, dtype=np.float64)
    return 2.0 * (2.0 * rows * D * b + rows * INDEX_BYTES)


def expert_flops(tokens: ArrayLike, D: int, F: int, swiglu: bool = True) -> NDArray[np.float64]:
    """FLOPs of one expert FFN on ``tokens`` rows: gate+up (2 or 1 GEMMs) and down."""
    mats = 3.0 if swiglu else 2.0
    return 2.0 * np.asarray(tokens, dtype=np.float64) * D * F * mats


def expert_activation_bytes(
    tokens: ArrayLike, D: int | ArrayLike, F: int | ArrayLike
) -> NDArray[np.float64]:
    """Activation bytes one expert's ``tokens`` rows move through memory (bf16).

    Each row reads its input and writes its output (``D`` each) and writes then
    reads its SwiGLU intermediate (``F`` each): ``2 (D + F)`` elements of 2 bytes.
    """
    t = np.asarray(tokens, dtype=np.float64)
    return t * 2.0 * (np.asarray(D, dtype=np.float64) + np.asarray(F, dtype=np.float64)) * 2.0


#: rows and columns of one output tile of the fused-MoE GEMMs (the tile a CTA computes)
WEIGHT_TILE = 128


def expert_weight_tiles(
    tokens: ArrayLike, D: int | ArrayLike, F: int | ArrayLike
) -> NDArray[np.float64]:
    """Output tiles one expert's GEMMs on ``tokens`` rows split into (zero without rows).

    Gate/up (``2F`` columns) and down (``D`` columns) in :data:`WEIGHT_TILE`-wide
    column tiles, times ``ceil(tokens / WEIGHT_TILE)`` row tiles: the CTAs that
    stream the expert's weights in parallel. A call with few tiles cannot keep
    every SM's loads in flight, so its weights stream below the HBM bandwidth.
    """
    t = np.asarray(tokens, dtype=np.float64)
    cols = (2.0 * np.asarray(F, dtype=np.float64) + np.asarray(D, dtype=np.float64)) / WEIGHT_TILE
    return np.where(t > 0, np.ceil(t / WEIGHT_TILE - 1e-9) * cols, 0.0)


def expert_bytes(
    tokens: ArrayLike, D: int, F: int, b: float, swiglu: bool = True
) -> NDArray[np.float64]:
    """Weights read once per expert with tokens, activations in and out."""
    t = np.asarray(tokens, dtype=np.float64)
    mats = 3.0 if swiglu else 2.0
    weights = np.where(t > 0, mats * D * F * b, 0.0)
    return weights + t * (2.0 * D + (mats - 1.0) * F) * b


def attention_flops(
    T: ArrayLike, D: int, heads: int, kv_heads: int, head_dim: int, seq: int, causal: bool = True
) -> NDArray[np.float64]:
    """Projections (QKV, out) and the score/value products for T tokens of sequences of ``seq``."""
    t = np.asarray(T, dtype=np.float64)
    proj = 2.0 * t * D * head_dim * (2 * heads + 2 * kv_heads)
    core = 4.0 * t * seq * heads * head_dim * (0.5 if causal else 1.0)
    return proj + core


def attention_bytes(
    T: ArrayLike, D: int, heads: int, kv_heads: int, head_dim: int, b: float
) -> NDArray[np.float64]:
    t = np.asarray(T, dtype=np.float64)
    weights = D * head_dim * (2 * heads + 2 * kv_heads) * b
    return weights + t * (2.0 * D + 2 * (heads + 2 * kv_heads) * head_dim) * b


#: DeepSeek-V3's context MLA kernel (aiconfigurator's ``context_mla`` table): q/k head
#: dim (128 + 64 rope) and v head dim, K and V expanded per head
MLA_CONTEXT_DIMS = (192, 128)
#: query rows one CTA of a fused attention kernel (FMHA) holds: its query tile
ATTN_TILE = 128


def attention_core_flops(
    batch: ArrayLike, seq: ArrayLike, heads: ArrayLike, d_qk: ArrayLike, d_v: ArrayLike
) -> NDArray[np.float64]:
    """Causal ``softmax(QK^T) V`` of ``batch`` sequences of ``seq``: ``b H S^2 (d_qk + d_v)``.

    ``2 S (d_qk + d_v)`` per query and head over ``S / 2`` keys on average (the
    continuous count of :func:`moesim.model.flops.mean_keys`, as the model FLOPs).
    """
    b, s, h = (np.asarray(v, dtype=np.float64) for v in (batch, seq, heads))
    return b * h * s * s * (np.asarray(d_qk, dtype=np.float64) + np.asarray(d_v, dtype=np.float64))


def attention_core_bytes(
    batch: ArrayLike,
    seq: ArrayLike,
    heads: ArrayLike,
    kv_heads: ArrayLike,
    d_qk: ArrayLike,
    d_v: ArrayLike,
    b: float = 2.0,
) -> NDArray[np.float64]:
    """Q, K, V read and O written once (flash attention keeps ``S x S`` on chip):
    ``batch seq (heads + kv_heads) (d_qk + d_v) b``."""
    rows = np.asarray(batch, dtype=np.float64) * np.asarray(seq, dtype=np.float64)
    width = np.asarray(heads, dtype=np.float64) + np.asarray(kv_heads, dtype=np.float64)
    return (
        rows * width * (np.asarray(d_qk, dtype=np.float64) + np.asarray(d_v, dtype=np.float64)) * b
    )


def attention_tiles(
    batch: ArrayLike, seq: ArrayLike, heads: ArrayLike, tile: int = ATTN_TILE
) -> NDArray[np.float64]:
    """Query tiles (CTAs) of one call: ``batch heads ceil(seq / tile)``."""
    s = np.asarray(seq, dtype=np.float64)
    return (
        np.asarray(batch, dtype=np.float64)
        * np.asarray(heads, dtype=np.float64)
        * np.ceil(s / tile)
    )
