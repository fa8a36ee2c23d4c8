"""Slow, obviously right references for the kernels (tests only; plain Python loops).

Legend: T = tokens, D = model dim, F = FFN dim, E = experts, K = top-k.
Every function works token by token / expert by expert on Python lists of
floats (scores) or small tensors (rows), so it can be checked by reading it.

- :func:`ref_route`      every router kind, per token (no noise: noisy_topk with
  no generator), with capacity dropping by :func:`ref_keep`.
- :func:`ref_keep`       capacity per expert (and per sequence), probs / position.
- :func:`ref_aux_loss`, :func:`ref_z_loss`  the losses by their formulas.
- :func:`ref_permute`    rows grouped by expert, token order inside.
- :func:`ref_moe`        y_t = Σ_kept w · expert(x_t) (+ shared), one token at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moesim.config.router import RouterSpec

_HASH_MULT = 2654435761


@dataclass
class RefRouting:
    """Lists per token: expert ids, weights, kept flags (same slot order as ``route``)."""

    ids: list[list[int]]
    weights: list[list[float]]
    kept: list[list[bool]]
    probs: list[list[float]]


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    ex = [math.exp(x - m) for x in xs]
    return [e / sum(ex) for e in ex]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _top(scores: list[float], k: int, allowed: list[bool] | None = None) -> list[int]:
    """Indices of the k largest scores among allowed ones (ties: lower index first)."""
    idx = [i for i in range(len(scores)) if allowed is None or allowed[i]]
    return sorted(idx, key=lambda i: (-scores[i], i))[:k]


def _token(logits: list[float], spec: RouterSpec, bias: list[float] | None, tid: int):
    """(ids, weights, probs) of one token for a token-choice kind."""
    E, k, kind = len(logits), spec.top_k, spec.kind
    probs = _softmax(logits)
    if kind in ("softmax_topk", "switch_top1"):
        ids = _top(probs, k)
        w = [probs[i] for i in ids]
        if spec.norm_p is not None:
            norm = sum(abs(x) ** spec.norm_p for x in w) ** (1 / spec.norm_p)
            w = [x / norm for x in w]
        elif spec.normalize and kind == "softmax_topk":
            w = [x / sum(w) for x in w]
    elif kind in ("topk_softmax", "noisy_topk"):
        ids = _top(logits, k)
        w = _softmax([logits[i] for i in ids])
    elif kind == "sigmoid_top1":
        probs = [_sigmoid(x) for x in logits]
        ids = _top(logits, k)
        w = [probs[i] for i in ids]
    elif kind == "sigmoid_topk":
        probs = [_sigmoid(x) for x in logits]
        ids = _top(
            [p + (bias[i] if bias else 0.0) for i, p in enumerate(probs)],
            k,
            _groups_allowed(probs, spec, bias),
        )
        w = [probs[i] for i in ids]
        if spec.normalize:
            w = [x / (sum(w) + 1e-20) for x in w]
    elif kind == "hash":
        base = ((tid * _HASH_MULT) % (1 << 32)) % E
        ids = [(base + j) % E for j in range(k)]
        w = [1.0 / k] * k
    elif kind == "soft":
        ids, w = list(range(E)), probs
    else:
        raise ValueError(kind)
    return ids, [x * spec.routed_scaling_factor for x in w], probs


def _groups_allowed(probs: list[float], spec: RouterSpec, bias: list[float] | None):
    if spec.n_group is None or spec.topk_group is None:
        return None
    E, G = len(probs), spec.n_group
    size = E // G
    choice = [p + (bias[i] if bias else 0.0) for i, p in enumerate(probs)]
    group_score = [
        sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(G)
    ]
    best = _top(group_score, spec.topk_group)
    return [i // size in best for i in range(E)]


def ref_keep(
    ids: list[list[int]],
    weights: list[list[float]],
    E: int,
    capacity: int,
    policy: str,
    sequence_length: int | None = None,
) -> list[list[bool]]:
    """Per (sequence, expert): keep the ``capacity`` best (probs) or earliest (position)."""
    T = len(ids)
    L = sequence_length or max(T, 1)
    kept = [[False] * len(row) for row in ids]
    for s in range(0, T, L):
        for e in range(E):
            slots = [
                (t, j)
                for t in range(s, min(s + L, T))
                for j in range(len(ids[t]))
                if ids[t][j] == e
            ]
            if policy == "probs":
                slots.sort(key=lambda tj: -weights[tj[0]][tj[1]])
            for t, j in slots[:capacity]:
                kept[t][j] = True
    return kept


def _expert_choice(logits_TE: list[list[float]], spec: RouterSpec) -> RefRouting:
    T, E = len(logits_TE), len(logits_TE[0])
    probs = [_softmax(row) for row in logits_TE]
    cf = 1.0 if spec.capacity_factor is None else spec.capacity_factor
    c = min(math.ceil(T * spec.top_k / E * cf), T)
    chosen: list[list[int]] = [[] for _ in range(T)]
    for e in range(E):
        for t in sorted(range(T), key=lambda t: (-probs[t][e], t))[:c]:
            chosen[t].append(e)
    k_max = max(1, *(len(c_) for c_ in chosen))
    ids, weights, kept = [], [], []
    for t in range(T):
        mine = sorted(chosen[t], key=lambda e: (-probs[t][e], e))
        rest = [e for e in range(E) if e not in mine]
        row = (mine + rest)[:k_max]
        ids.append(row)
        weights.append(
            [probs[t][e] * spec.routed_scaling_factor if e in mine else 0.0 for e in row]
        )
        kept.append([e in mine for e in row])
    return RefRouting(ids, weights, kept, probs)


def ref_route(
    logits_TE: Tensor,
    spec: RouterSpec,
    bias_E: Tensor | None = None,
    token_ids: list[int] | None = None,
) -> RefRouting:
    """Reference routing of every kind (noise-free), token by token."""
    rows = logits_TE.double().tolist()
    if spec.kind == "expert_choice":
        return _expert_choice(rows, spec)
    bias = None if bias_E is None else bias_E.double().tolist()
    ids, weights, probs = [], [], []
    for t, row in enumerate(rows):
        i, w, p = _token(row, spec, bias, t if token_ids is None else token_ids[t])
        ids.append(i)
        weights.append(w)
        probs.append(p)
    kept = [[True] * len(r) for r in ids]
    if spec.capacity_factor is not None and spec.kind != "soft":
        E = len(rows[0])
        L = spec.sequence_length if spec.capacity_per == "sequence" else None
        cap = math.ceil(((L or len(rows)) * spec.top_k / E) * spec.capacity_factor)
        kept = ref_keep(ids, weights, E, cap, spec.drop_policy, L)
    weights = [
        [w if k else 0.0 for w, k in zip(ws, ks, strict=True)]
        for ws, ks in zip(weights, kept, strict=True)
    ]
    return RefRouting(ids, weights, kept, probs)


def ref_aux_loss(
    probs: list[list[float]], ids: list[list[int]], mask: list[bool] | None = None
) -> float:
    """E · Σ_e (selections of e / tokens) · (mean prob of e), over unmasked tokens."""
    E = len(probs[0])
    tokens = [t for t in range(len(probs)) if mask is None or mask[t]]
    f = [sum(ids[t].count(e) for t in tokens) / len(tokens) for e in range(E)]
    p = [sum(probs[t][e] for t in tokens) / len(tokens) for e in range(E)]
    return E * sum(fe * pe for fe, pe in zip(f, p, strict=True))


def ref_z_loss(logits_TE: Tensor) -> float:
    """mean_t (log Σ_e exp(logit_te))²."""
    rows = logits_TE.double().tolist()
    return sum(math.log(sum(math.exp(x) for x in row)) ** 2 for row in rows) / len(rows)


def ref_permute(x_TD: Tensor, ids_TK: Tensor, kept_TK: Tensor, E: int) -> list[Tensor]:
    """Per expert, the kept rows of x in token order."""
    out = []
    for e in range(E):
        rows = [
            x_TD[t]
            for t in range(x_TD.shape[0])
            for j in range(ids_TK.shape[1])
            if int(ids_TK[t, j]) == e and bool(kept_TK[t, j])
        ]
        out.append(torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1]))
    return out


def ref_ffn(
    x_D: Tensor,
    w_gate_DF: Tensor | None,
    w_up_DF: Tensor,
    w_down_FD: Tensor,
    act=torch.nn.functional.silu,
) -> Tensor:
    """One expert on one row: down(act(x·gate) · (x·up)), or down(act(x·up)) without gate."""
    h = act(x_D @ w_up_DF) if w_gate_DF is None else act(x_D @ w_gate_DF) * (x_D @ w_up_DF)
    return h @ w_down_FD


def ref_moe(
    x_TD: Tensor,
    ids_TK: Tensor,
    weights_TK: Tensor,
    kept_TK: Tensor,
    w_gate_EDF: Tensor | None,
    w_up_EDF: Tensor,
    w_down_EFD: Tensor,
    act=torch.nn.functional.silu,
    scale_inputs: bool = False,
) -> Tensor:
    """y_t = Σ_{kept k} w_tk · expert_{e_tk}(x_t) (or expert(w_tk · x_t) with scale_inputs)."""
    y = torch.zeros_like(x_TD, dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        for j in range(ids_TK.shape[1]):
            if not bool(kept_TK[t, j]):
                continue
            e, w = int(ids_TK[t, j]), weights_TK[t, j]
            gate = None if w_gate_EDF is None else w_gate_EDF[e]
            if scale_inputs:
                y[t] += ref_ffn(x_TD[t] * w, gate, w_up_EDF[e], w_down_EFD[e], act).double()
            else:
                y[t] += (w * ref_ffn(x_TD[t], gate, w_up_EDF[e], w_down_EFD[e], act)).double()
    return y.to(x_TD.dtype)


def ref_sort_chunks(x_MD: Tensor, counts_RL: Tensor) -> Tensor:
    """Split into (source, expert) chunks and concatenate them expert-major, one by one."""
    R, L = counts_RL.shape
    chunks, start = {}, 0
    for r in range(R):
        for e in range(L):
            n = int(counts_RL[r, e])
            chunks[r, e], start = x_MD[start : start + n], start + n
    return torch.cat([chunks[r, e] for e in range(L) for r in range(R)])
