"""Dispatch: gather each token's rows into expert-major order, and combine them back.

Legend: T = tokens, D = model dim, E = experts, K = top-k, C = capacity
(rows per expert in a padded layout), N = rows of the permuted tensor.

``permute(x_TD, routing, strategy=..., num_experts=E, capacity=None)`` returns
``(x_ND, tokens_per_expert_E, state)``: rows grouped by expert (expert 0 first,
within an expert in token order), ``tokens_per_expert_E`` the *layout* (rows of
each expert in ``x_ND``, int64) and a :class:`DispatchState` for
``unpermute(y_ND, state, strategy=...) -> y_TD`` which multiplies every row by
its routing weight and sums rows back into token order (float32 accumulation,
output in ``y_ND``'s dtype). Dropped assignments (``kept_TK`` False) are not
dispatched and contribute nothing.

With ``capacity`` (or ``routing.pad_to_capacity``) every expert gets exactly
``capacity`` rows, zero padded (N = E·C), as Megatron-Core's
``moe_pad_expert_input_to_capacity``; rows beyond an explicit ``capacity`` are
dropped. ``state.counts_E`` holds the real rows per expert.

Strategies (:data:`DISPATCH_STRATEGIES`):

- ``sort``      stable argsort of the flat expert ids, gather, and scatter-add on
  the way back (Megatron-Core ``permute``/``unpermute``, MegaBlocks).
- ``einsum``    one-hot dispatch mask [T, E, C] and combine tensor, two einsums
  into / out of a capacity buffer [E, C, D] (GShard, Switch / Mesh-TF). Dropless
  routings use C = the largest expert load.
- ``index_add`` a Python loop over experts with ``torch.where`` and
  ``index_add_`` (Hugging Face eager MoE blocks).

Under expert parallelism a rank receives its rows grouped by source rank, then by
local expert. :func:`sort_chunks` regroups them expert-major before the expert
GEMMs and back after (Megatron-Core's ``sort_chunks_by_idxs``, needed when a rank
holds more than one expert).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moesim.errors import lookup
from moesim.kernels.gating import Routing

__all__ = [
    "DISPATCH_STRATEGIES",
    "DispatchState",
    "Dispatcher",
    "permute",
    "sort_chunks",
    "unpermute",
]


@dataclass(frozen=True)
class DispatchState:
    """What ``unpermute`` needs. ``token_N`` token of each row (-1 = padding),
    ``weight_N`` its combine weight (0 for padding), ``counts_E`` kept rows per
    expert, ``layout_E`` rows per expert in ``x_ND``; ``combine_TEC`` only for einsum."""

    num_tokens: int
    token_N: Tensor
    weight_N: Tensor
    counts_E: Tensor
    layout_E: Tensor
    combine_TEC: Tensor | None = None

    def with_unit_weights(self) -> DispatchState:
        """The same layout combining with weight 1 (for weights applied to the inputs)."""
        real_N = (self.token_N >= 0).to(self.weight_N.dtype)
        combine = None if self.combine_TEC is None else self._unit_combine()
        return replace(self, weight_N=real_N, combine_TEC=combine)

    def _unit_combine(self) -> Tensor:
        assert self.combine_TEC is not None
        C = self.combine_TEC.shape[2]
        rows = torch.nonzero(self.token_N >= 0).squeeze(1)
        unit = torch.zeros_like(self.combine_TEC)
        unit[self.token_N[rows], rows // C, rows % C] = 1.0
        return unit


PermuteFn = Callable[[Tensor, Routing, int, "int | None"], tuple[Tensor, DispatchState]]
UnpermuteFn = Callable[[Tensor, DispatchState], Tensor]


@dataclass(frozen=True)
class Dispatcher:
    """A dispatch strategy: a permute and its inverse."""

    permute: PermuteFn
    unpermute: UnpermuteFn


def _flat_kept(routing: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """(expert_M, token_M, weight_M) of the kept assignments in token-major order."""
    K = routing.expert_ids_TK.shape[1]
    kept_M = routing.kept_TK.reshape(-1)
    flat = torch.arange(kept_M.numel(), device=kept_M.device)[kept_M]
    expert_M = routing.expert_ids_TK.reshape(-1)[flat]
    weight_M = routing.weights_TK.reshape(-1)[flat]
    return expert_M, flat // K, weight_M


def _ranks(expert_M: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order_M, rank of each sorted row within its expert, counts_E)."""
    order_M = torch.sort(expert_M, stable=True)[1]
    counts_E = torch.bincount(expert_M, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_e = expert_M[order_M]
    rank = torch.arange(order_M.numel(), device=expert_M.device) - starts_E[sorted_e]
    return order_M, rank, counts_E


def _padded_rows(
    token_M: Tensor, weight_M: Tensor, expert_M: Tensor, rank: Tensor, E: int, C: int
) -> tuple[Tensor, Tensor]:
    """token_N / weight_N of an E·C layout: row e·C + rank, -1 / 0 where empty."""
    fits = rank < C
    slot = expert_M[fits] * C + rank[fits]
    token_N = torch.full((E * C,), -1, dtype=torch.long, device=token_M.device)
    weight_N = torch.zeros(E * C, dtype=weight_M.dtype, device=weight_M.device)
    token_N[slot] = token_M[fits]
    weight_N[slot] = weight_M[fits]
    return token_N, weight_N


def _gather_rows(x_TD: Tensor, token_N: Tensor) -> Tensor:
    x_ND = x_TD[token_N.clamp(min=0)]
    return x_ND * (token_N >= 0).unsqueeze(1).to(x_ND.dtype) if (token_N < 0).any() else x_ND


# ---------------------------------------------------------------------- sort


def _sort_permute(
    x_TD: Tensor, routing: Routing, E: int, capacity: int | None
) -> tuple[Tensor, DispatchState]:
    expert_M, token_M, weight_M = _flat_kept(routing)
    order_M, rank, counts_E = _ranks(expert_M, E)
    token_M, weight_M, expert_M = token_M[order_M], weight_M[order_M], expert_M[order_M]
    if capacity is None:
        state = DispatchState(x_TD.shape[0], token_M, weight_M, counts_E, counts_E)
        return x_TD[token_M], state
    token_N, weight_N = _padded_rows(token_M, weight_M, expert_M, rank, E, capacity)
    layout_E = torch.full_like(counts_E, capacity)
    state = DispatchState(x_TD.shape[0], token_N, weight_N, counts_E.clamp(max=capacity), layout_E)
    return _gather_rows(x_TD, token_N), state


def _scatter_unpermute(y_ND: Tensor, state: DispatchState) -> Tensor:
    D = y_ND.shape[1]
    real = state.token_N >= 0
    rows = y_ND[real].float() * state.weight_N[real].float().unsqueeze(1)
    out = torch.zeros(state.num_tokens, D, dtype=torch.float32, device=y_ND.device)
    out.scatter_add_(0, state.token_N[real].unsqueeze(1).expand(-1, D), rows)
    return out.to(y_ND.dtype)


# -------------------------------------------------------------------- einsum


def _einsum_permute(
    x_TD: Tensor, routing: Routing, E: int, capacity: int | None
) -> tuple[Tensor, DispatchState]:
    T, D = x_TD.shape
    expert_M, token_M, weight_M = _flat_kept(routing)
    order_M, rank_sorted, counts_E = _ranks(expert_M, E)
    rank_M = torch.empty_like(rank_sorted).scatter_(0, order_M, rank_sorted)
    C = capacity if capacity is not None else int(counts_E.max()) if counts_E.numel() else 0
    fits = rank_M < C
    dispatch_TEC = torch.zeros(T, E, C, dtype=x_TD.dtype, device=x_TD.device)
    combine_TEC = torch.zeros(T, E, C, dtype=torch.float32, device=x_TD.device)
    idx = (token_M[fits], expert_M[fits], rank_M[fits])
    dispatch_TEC[idx] = 1
    combine_TEC[idx] = weight_M[fits].float()
    x_ND = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD).reshape(E * C, D)
    token_N, weight_N = _padded_rows(token_M, weight_M, expert_M, rank_M, E, C)
    layout_E = torch.full_like(counts_E, C)
    state = DispatchState(T, token_N, weight_N, counts_E.clamp(max=C), layout_E, combine_TEC)
    return x_ND, state


def _einsum_unpermute(y_ND: Tensor, state: DispatchState) -> Tensor:
    assert state.combine_TEC is not None, "einsum unpermute needs an einsum permute state"
    _, E, C = state.combine_TEC.shape
    y_ECD = y_ND.float().reshape(E, C, y_ND.shape[1])
    return torch.einsum("tec,ecd->td", state.combine_TEC, y_ECD).to(y_ND.dtype)


# ----------------------------------------------------------------- index_add


def _loop_permute(
    x_TD: Tensor, routing: Routing, E: int, capacity: int | None
) -> tuple[Tensor, DispatchState]:
    tokens, weights, counts = [], [], []
    for e in range(E):
        token_idx, slot = torch.where((routing.expert_ids_TK == e) & routing.kept_TK)
        tokens.append(token_idx)
        weights.append(routing.weights_TK[token_idx, slot])
        counts.append(token_idx.numel())
    token_M, weight_M = torch.cat(tokens), torch.cat(weights)
    counts_E = torch.tensor(counts, dtype=torch.long, device=x_TD.device)
    if capacity is not None:
        expert_M = torch.repeat_interleave(torch.arange(E, device=x_TD.device), counts_E)
        rank = torch.arange(token_M.numel(), device=x_TD.device) - (
            torch.cumsum(counts_E, 0) - counts_E
        ).repeat_interleave(counts_E)
        token_N, weight_N = _padded_rows(token_M, weight_M, expert_M, rank, E, capacity)
        layout_E = torch.full_like(counts_E, capacity)
        state = DispatchState(
            x_TD.shape[0], token_N, weight_N, counts_E.clamp(max=capacity), layout_E
        )
        return _gather_rows(x_TD, token_N), state
    return x_TD[token_M], DispatchState(x_TD.shape[0], token_M, weight_M, counts_E, counts_E)


def _loop_unpermute(y_ND: Tensor, state: DispatchState) -> Tensor:
    out = torch.zeros(state.num_tokens, y_ND.shape[1], dtype=torch.float32, device=y_ND.device)
    start = 0
    for rows in state.layout_E.tolist():
        token_idx = state.token_N[start : start + rows]
        real = token_idx >= 0
        y_rows = y_ND[start : start + rows][real].float()
        weight = state.weight_N[start : start + rows][real].float().unsqueeze(1)
        out.index_add_(0, token_idx[real], y_rows * weight)
        start += rows
    return out.to(y_ND.dtype)


#: strategy name -> (permute, unpermute)
DISPATCH_STRATEGIES: dict[str, Dispatcher] = {
    "sort": Dispatcher(_sort_permute, _scatter_unpermute),
    "einsum": Dispatcher(_einsum_permute, _einsum_unpermute),
    "index_add": Dispatcher(_loop_permute, _loop_unpermute),
}


def _strategy(name: str) -> Dispatcher:
    return lookup(DISPATCH_STRATEGIES, name, field="strategy", what="dispatch strategy")


def permute(
    x_TD: Tensor,
    routing: Routing,
    strategy: str = "sort",
    num_experts: int | None = None,
    capacity: int | None = None,
) -> tuple[Tensor, Tensor, DispatchState]:
    """Group ``x_TD``'s rows by expert; see the module docstring for the contract.

    ``num_experts`` defaults to ``routing.num_experts``; ``capacity`` defaults to
    ``routing.capacity`` when ``routing.pad_to_capacity`` (else no padding).
    """
    E = routing.num_experts if num_experts is None else num_experts
    if capacity is None and routing.pad_to_capacity:
        capacity = routing.capacity
    x_ND, state = _strategy(strategy).permute(x_TD, routing, E, capacity)
    return x_ND, state.layout_E, state


def unpermute(y_ND: Tensor, state: DispatchState, strategy: str = "sort") -> Tensor:
    """Weighted sum of expert rows back into token order: y_TD[t] = Σ w · y_ND[row of t]."""
    return _strategy(strategy).unpermute(y_ND, state)


def sort_chunks(x_MD: Tensor, counts_RL: Tensor, *, inverse: bool = False) -> Tensor:
    """Rows in (source, local expert) chunks -> (local expert, source) order.

    ``counts_RL[r, l]`` rows came from source rank ``r`` for local expert ``l``, in
    that order in ``x_MD``. Rows of one chunk keep their order; ``inverse=True``
    undoes the reordering. One local expert (``L == 1``): the identity, no copy.
    """
    if counts_RL.shape[1] == 1:
        return x_MD
    idx_M = _sort_chunks_index(counts_RL.to(torch.int64).cpu()).to(x_MD.device)
    if not inverse:
        return x_MD.index_select(0, idx_M)
    out_MD = torch.empty_like(x_MD)
    out_MD[idx_M] = x_MD
    return out_MD


def _sort_chunks_index(counts_RL: Tensor) -> Tensor:
    """Source row of every output row when the (source, expert) chunks go expert-major."""
    flat = counts_RL.flatten()
    starts_RL = (torch.cumsum(flat, 0) - flat).view_as(counts_RL)
    counts_C, starts_C = counts_RL.t().flatten(), starts_RL.t().flatten()  # chunks, new order
    lands_C = torch.cumsum(counts_C, 0) - counts_C  # where each chunk lands
    M = int(flat.sum())
    shift_M = torch.repeat_interleave(starts_C - lands_C, counts_C, output_size=M)
    return torch.arange(M, dtype=torch.int64) + shift_M
