"""Expert capacity, drops and padding: pure numpy, same definitions as the kernels.

Legend: G = source GPUs, S = capacity domains per GPU (sequences, or 1 for the
whole micro-batch), T = tokens, K = top-k, E = experts.

``capacity = ceil((tokens · k / E) · cf)`` per expert per domain, as
:func:`moesim.kernels.gating.expert_capacity` (Megatron-Core ``get_capacity``).
The *number* of assignments an expert keeps in a domain is
``min(routed, capacity)`` whatever the drop policy; the policy only decides
*which* (``probs``: highest router weight, ``position``: earliest tokens), and
that matters only where per-token ids exist (:func:`keep_mask`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

I64 = NDArray[np.int64]
Counts = NDArray[Any]  # integral counts, as int64 or float32


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Rows per expert per domain: ``ceil((T·k/E)·cf)`` (the kernels' formula, same rounding)."""
    return math.ceil((num_tokens * top_k / num_experts) * capacity_factor)


def domain_sizes(tokens: int, sequence_length: int | None) -> I64:
    """Tokens in each capacity domain of one GPU's micro-batch: ``[S]``."""
    if sequence_length is None or sequence_length >= tokens:
        return np.array([tokens], dtype=np.int64)
    full, rest = divmod(tokens, sequence_length)
    sizes = [sequence_length] * full + ([rest] if rest else [])
    return np.asarray(sizes, dtype=np.int64)


def capacities(
    sizes_S: I64, num_experts: int, top_k: int, capacity_factor: float | None
) -> I64 | None:
    """Capacity of every domain ``[S]``, or None when dropless."""
    if capacity_factor is None:
        return None
    caps = [expert_capacity(int(n), num_experts, top_k, capacity_factor) for n in sizes_S]
    return np.asarray(caps, dtype=np.int64)


def keep_counts(routed_GSE: Counts, cap_S: I64 | None) -> Counts:
    """Assignments kept per (source, domain, expert): ``min(routed, capacity)``."""
    if cap_S is None:
        return routed_GSE
    return np.minimum(routed_GSE, cap_S[None, :, None].astype(routed_GSE.dtype))


def sent_counts(kept_GSE: Counts, cap_S: I64 | None, pad: bool) -> Counts:
    """Rows dispatched per (source, domain, expert): kept, or the capacity when padding."""
    if cap_S is None or not pad:
        return kept_GSE
    return np.broadcast_to(cap_S[None, :, None], kept_GSE.shape).astype(kept_GSE.dtype)


def keep_mask(
    ids_GTK: I64, E: int, sizes_S: I64, cap_S: I64, priority_GTK: NDArray[np.float64] | None
) -> NDArray[np.bool_]:
    """bool ``[G, T, K]``: assignments that fit their expert's capacity in their domain.

    ``priority_GTK`` None keeps the earliest tokens (``position``); otherwise the
    highest priorities (``probs``; ties: earlier token first), as the kernels do.
    """
    G, T, K = ids_GTK.shape
    dom_T = np.repeat(np.arange(len(sizes_S)), sizes_S)
    group = (np.arange(G)[:, None, None] * len(sizes_S) + dom_T[None, :, None]) * E + ids_GTK
    flat = group.ravel()
    if priority_GTK is None:
        order = np.argsort(flat, kind="stable")
    else:
        order = np.lexsort((-priority_GTK.ravel(), flat))
    sorted_groups = flat[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    starts = np.repeat(first, np.diff(np.r_[first, len(flat)]))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(flat)) - starts
    cap_T = cap_S[dom_T]
    return rank.reshape(G, T, K) < cap_T[None, :, None]
