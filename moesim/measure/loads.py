"""Synthetic expert loads for the benchmarks: balanced or Zipf-skewed, deterministic.

E = experts, T = tokens, K = top-k. ``skew`` is the Zipf exponent ``s``: expert
``e`` (0-based) gets a share proportional to ``1 / (e + 1) ** s``; ``s = 0`` is
balanced.
"""

from __future__ import annotations

import numpy as np
import torch


def zipf_weights(n: int, skew: float) -> np.ndarray:
    """Shares of ``n`` items under Zipf(``skew``), summing to 1 (uniform for skew 0)."""
    if n < 1 or skew < 0:
        raise ValueError(f"need n >= 1 and skew >= 0, got n={n}, skew={skew}")
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew
    return w / w.sum()


def zipf_counts(total: int, n: int, skew: float) -> list[int]:
    """``total`` items over ``n`` bins: floor of the Zipf expectation, remainder to the head.

    Balanced (skew 0) gives counts differing by at most one. Under skew, tail
    bins whose expectation is below one get zero, as a hot router's cold
    experts do. Deterministic; sums to ``total``.
    """
    if skew == 0:
        base, extra = divmod(total, n)
        return [base + (1 if i < extra else 0) for i in range(n)]
    counts = np.floor(zipf_weights(n, skew) * total).astype(np.int64)
    counts[0] += total - int(counts.sum())
    return [int(c) for c in counts]


def skewed_logits_TE(
    T: int, E: int, skew: float, generator: torch.Generator, device: str = "cpu"
) -> torch.Tensor:
    """float32 [T, E] router logits whose top-k picks experts ~ Zipf(``skew``).

    ``log p_e + Gumbel noise``: the top-k of that is a draw of k distinct experts
    without replacement with probabilities ``p`` (the Gumbel-top-k trick), so a
    real top-k router applied to these logits produces the skewed load.
    """
    log_p = torch.as_tensor(np.log(zipf_weights(E, skew)), dtype=torch.float32)
    u = torch.rand((T, E), generator=generator, dtype=torch.float32).clamp_(1e-9, 1 - 1e-9)
    gumbel = -torch.log(-torch.log(u))
    return (log_p + gumbel).to(device)


def uneven_splits(elements: int, world: int, skew: float = 1.0) -> list[list[int]]:
    """``S[src][dst]`` elements each rank sends to each rank in an uneven all-to-all.

    Every rank sends ``elements`` in total, split over destinations by
    Zipf(``skew``) with rank 0 the hottest receiver (a hot expert's GPU).
    """
    row = _largest_remainder(elements, zipf_weights(world, skew))
    return [list(row) for _ in range(world)]


def even_splits(elements: int, world: int) -> list[list[int]]:
    """``S[src][dst]`` for an even all-to-all (``elements`` divisible by ``world``)."""
    if elements % world:
        raise ValueError(f"elements ({elements}) must be a multiple of world ({world})")
    return [[elements // world] * world for _ in range(world)]


def _largest_remainder(total: int, shares: np.ndarray) -> list[int]:
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return [int(c) for c in counts]
