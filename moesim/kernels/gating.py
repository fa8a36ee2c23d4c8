"""Routers: which experts each token goes to, with what weight, and what capacity drops.

Legend: T = tokens, E = experts, K = top-k slots per token, S = sequences,
Eg = expert groups.

``route(logits_TE, spec, bias_E=None, generator=None) -> Routing`` runs the
router named by ``spec.kind``; :data:`ROUTERS` maps every kind in
:data:`moesim.config.router.ROUTER_KINDS` to its implementation:

- ``softmax_topk``  softmax over all experts, top-k, optional renormalisation
  (``normalize``: Mixtral, Qwen3-MoE, OLMoE with ``norm_topk_prob``; none:
  Qwen2-MoE default) or p-norm renormalisation (``norm_p``: DBRX).
- ``topk_softmax``  top-k on the logits, softmax over the k (GPT-OSS, Granite, JetMoE).
- ``sigmoid_topk``  sigmoid scores; the correction bias ``bias_E`` only affects
  *selection*; group-limited routing (``n_group``/``topk_group``, group score =
  sum of the group's top-2 biased scores, other groups masked with -inf);
  ``normalize`` divides by (sum + 1e-20); ``routed_scaling_factor`` (DeepSeek-V3).
- ``sigmoid_top1``  top-1 on the logits, weight = sigmoid(logit) (Llama 4; needs
  top_k = 1; Llama 4 scales the expert *input* by it: ``moe_forward(scale_inputs=True)``).
- ``switch_top1``   softmax, argmax, weight = max probability (Switch Transformer;
  needs top_k = 1);
  per-sequence capacity in position order with ``capacity_per="sequence"`` and
  ``drop_policy="position"``. Jitter multiplies the router *inputs*, so it is
  applied by :func:`router_logits`, not here.
- ``noisy_topk``    Shazeer et al. 2017: H = logits + N(0,1)·softplus(noise_logits)
  (std 1 without ``noise_logits_TE``), top-k of H, softmax over the k. Noise is
  drawn from ``generator``; ``generator=None`` is inference (no noise).
- ``expert_choice`` Zhou et al. 2022: softmax over experts, each expert takes
  its top-``capacity`` tokens (capacity = ceil(cf·T·k/E), cf defaults to 1);
  K = most experts any token got, unused slots have ``kept=False``.
- ``hash``          Roller et al. 2021: a fixed multiplicative hash of the token id
  (position when no ``token_ids_T``) picks k consecutive experts, weight 1/k.
- ``soft``          every token to every expert (K = E), weighted by the softmax
  (the dense soft routing; no slots, no capacity).

Capacity (every token-choice kind, i.e. all but ``expert_choice``; ``soft`` never
drops) follows Megatron-Core's ``topk_softmax_with_capacity``:
``capacity = ceil((T·k/E)·cf)`` per expert (T = sequence length when ``capacity_per="sequence"``);
``drop_policy="probs"`` keeps an expert's highest-weight assignments,
``"position"`` the earliest tokens; ``pad_to_capacity`` asks dispatch to pad every
expert to ``capacity`` rows. ``capacity_factor=None`` is dropless.

Losses are returned *unweighted* (``Routing.loss(spec)`` applies the coefficients):
``aux_loss`` = E · Σ_e f_e · P_e, the Switch / Mixtral / Qwen load-balancing loss
(f_e = top-k selections of e per token before dropping, P_e = mean score of e
— sigmoid scores normalised per token — both over unmasked tokens; Switch
averages it over sequences); it is 0 for
``expert_choice``, ``hash`` and ``soft`` which have no such loss.
``z_loss`` = mean over tokens of logsumexp(logits)² (ST-MoE / Switch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from moesim.config.base import FieldError
from moesim.config.router import ROUTER_KINDS, TOP1_KINDS, RouterSpec
from moesim.errors import ConfigError

__all__ = [
    "ROUTERS",
    "RouterSpec",
    "Routing",
    "apply_capacity",
    "expert_capacity",
    "jitter",
    "load_balancing_loss",
    "route",
    "router_logits",
    "z_loss",
]

_HASH_MULT = 2654435761  # Knuth's multiplicative hash constant (2^32 / golden ratio)


@dataclass(frozen=True)
class Routing:
    """Result of a router. All tensors live on the logits' device.

    ``expert_ids_TK`` int64 expert of each slot; ``weights_TK`` float32 weight that
    multiplies that expert's output (0 where not kept); ``kept_TK`` False where
    capacity dropped the slot (or, for expert choice, the slot is unused);
    ``probs_TE`` float32 scores over all experts (softmax or sigmoid);
    ``aux_loss``/``z_loss`` unweighted scalars; ``capacity`` rows one expert
    can hold in this batch (per-sequence capacity × sequences with
    ``capacity_per="sequence"``) or None when dropless;
    ``pad_to_capacity`` asks dispatch to pad every expert to ``capacity`` rows.
    """

    expert_ids_TK: Tensor
    weights_TK: Tensor
    kept_TK: Tensor
    probs_TE: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    capacity: int | None = None
    pad_to_capacity: bool = False

    @property
    def num_experts(self) -> int:
        return int(self.probs_TE.shape[1])

    def tokens_per_expert(self) -> Tensor:
        """int64 [E]: kept assignments per expert."""
        ids = self.expert_ids_TK[self.kept_TK]
        return torch.bincount(ids, minlength=self.num_experts)

    def dropped_fraction(self) -> float:
        """Dropped assignments / all top-k assignments (0 for dropless routers)."""
        return float((~self.kept_TK).float().mean()) if self.kept_TK.numel() else 0.0

    def loss(self, spec: RouterSpec) -> Tensor:
        """aux_loss_coef · aux_loss + z_loss_coef · z_loss."""
        return spec.aux_loss_coef * self.aux_loss + spec.z_loss_coef * self.z_loss


class _Choice(NamedTuple):
    """What a router kind decides before capacity: ids, weights, scores."""

    ids_TK: Tensor
    weights_TK: Tensor
    probs_TE: Tensor
    kept_TK: Tensor | None = None  # set only by kinds that drop by themselves


@dataclass(frozen=True)
class _Extras:
    bias_E: Tensor | None
    generator: torch.Generator | None
    noise_logits_TE: Tensor | None
    token_ids_T: Tensor | None


RouterFn = Callable[[Tensor, RouterSpec, _Extras], _Choice]


# --------------------------------------------------------------------- kinds


def _softmax_topk(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    probs_TE = torch.softmax(logits_TE, dim=-1)
    top_TK, ids_TK = torch.topk(probs_TE, spec.top_k, dim=-1)
    if spec.norm_p is not None:
        top_TK = top_TK / torch.norm(top_TK, p=spec.norm_p, dim=-1, keepdim=True)
    elif spec.normalize:
        top_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
    return _Choice(ids_TK, top_TK * spec.routed_scaling_factor, probs_TE)


def _topk_softmax(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    top_TK, ids_TK = torch.topk(logits_TE, spec.top_k, dim=-1)
    weights_TK = torch.softmax(top_TK, dim=-1) * spec.routed_scaling_factor
    return _Choice(ids_TK, weights_TK, torch.softmax(logits_TE, dim=-1))


def _group_mask_TE(choice_TE: Tensor, n_group: int, topk_group: int) -> Tensor:
    """True for experts in each token's ``topk_group`` best groups (sum of top-2)."""
    T, E = choice_TE.shape
    per_group = choice_TE.view(T, n_group, E // n_group)
    group_scores_TEg = per_group.topk(min(2, E // n_group), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores_TEg, topk_group, dim=-1, sorted=False)[1]
    mask_TEg = torch.zeros_like(group_scores_TEg, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask_TEg.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


def _sigmoid_topk(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    scores_TE = logits_TE.sigmoid()
    choice_TE = scores_TE if ex.bias_E is None else scores_TE + ex.bias_E.float()
    if spec.n_group is not None and spec.topk_group is not None:
        mask_TE = _group_mask_TE(choice_TE, spec.n_group, spec.topk_group)
        choice_TE = choice_TE.masked_fill(~mask_TE, float("-inf"))
    ids_TK = torch.topk(choice_TE, spec.top_k, dim=-1, sorted=False)[1]
    weights_TK = scores_TE.gather(1, ids_TK)
    if spec.normalize:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return _Choice(ids_TK, weights_TK * spec.routed_scaling_factor, scores_TE)


def _sigmoid_top1(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    top_TK, ids_TK = torch.topk(logits_TE, spec.top_k, dim=-1)
    weights_TK = torch.sigmoid(top_TK) * spec.routed_scaling_factor
    return _Choice(ids_TK, weights_TK, logits_TE.sigmoid())


def _switch_top1(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    probs_TE = torch.softmax(logits_TE, dim=-1)
    top_TK, ids_TK = torch.max(probs_TE, dim=-1, keepdim=True)
    return _Choice(ids_TK, top_TK * spec.routed_scaling_factor, probs_TE)


def _noisy_topk(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    noisy_TE = logits_TE
    if ex.generator is not None:
        std_TE = (
            torch.ones_like(logits_TE)
            if ex.noise_logits_TE is None
            else F.softplus(ex.noise_logits_TE.float())
        )
        noise_TE = torch.randn(
            logits_TE.shape, generator=ex.generator, device=logits_TE.device, dtype=logits_TE.dtype
        )
        noisy_TE = logits_TE + noise_TE * std_TE
    top_TK, ids_TK = torch.topk(noisy_TE, spec.top_k, dim=-1)
    weights_TK = torch.softmax(top_TK, dim=-1) * spec.routed_scaling_factor
    return _Choice(ids_TK, weights_TK, torch.softmax(noisy_TE, dim=-1))


def _expert_choice(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    probs_TE = torch.softmax(logits_TE, dim=-1)
    T, E = probs_TE.shape
    cf = 1.0 if spec.capacity_factor is None else spec.capacity_factor
    capacity = min(expert_capacity(T, E, spec.top_k, cf), T)
    token_idx_EC = torch.topk(probs_TE.t(), capacity, dim=-1)[1]
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=probs_TE.device)
    chosen_TE.scatter_(0, token_idx_EC.t(), True)
    k_max = max(int(chosen_TE.sum(dim=-1).max()), 1) if T else 1
    ranked_TE = torch.where(chosen_TE, probs_TE, torch.full_like(probs_TE, -1.0))
    order_TK = torch.sort(ranked_TE, dim=-1, descending=True, stable=True)[1][:, :k_max]
    kept_TK = chosen_TE.gather(1, order_TK)
    weights_TK = probs_TE.gather(1, order_TK) * kept_TK * spec.routed_scaling_factor
    return _Choice(order_TK, weights_TK, probs_TE, kept_TK)


def _hash(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    T, E = logits_TE.shape
    device = logits_TE.device
    ids_T = torch.arange(T, device=device) if ex.token_ids_T is None else ex.token_ids_T.long()
    base_T = ((ids_T * _HASH_MULT) % (1 << 32)) % E
    ids_TK = (base_T[:, None] + torch.arange(spec.top_k, device=device)) % E
    weights_TK = torch.full(ids_TK.shape, spec.routed_scaling_factor / spec.top_k, device=device)
    return _Choice(ids_TK, weights_TK, torch.softmax(logits_TE, dim=-1))


def _soft(logits_TE: Tensor, spec: RouterSpec, ex: _Extras) -> _Choice:
    probs_TE = torch.softmax(logits_TE, dim=-1)
    T, E = probs_TE.shape
    ids_TK = torch.arange(E, device=probs_TE.device).expand(T, E).contiguous()
    return _Choice(ids_TK, probs_TE * spec.routed_scaling_factor, probs_TE)


#: router kind -> implementation; keys are exactly ``ROUTER_KINDS``
ROUTERS: dict[str, RouterFn] = {
    "softmax_topk": _softmax_topk,
    "topk_softmax": _topk_softmax,
    "sigmoid_topk": _sigmoid_topk,
    "sigmoid_top1": _sigmoid_top1,
    "switch_top1": _switch_top1,
    "noisy_topk": _noisy_topk,
    "expert_choice": _expert_choice,
    "hash": _hash,
    "soft": _soft,
}
assert tuple(ROUTERS) == ROUTER_KINDS, "ROUTERS must implement exactly ROUTER_KINDS"

_NO_AUX = ("expert_choice", "hash", "soft")
_SINGLE = TOP1_KINDS


# ------------------------------------------------------------------ capacity


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Rows per expert: ``ceil((T·k/E)·cf)`` as Megatron-Core's ``get_capacity``."""
    return math.ceil((num_tokens * top_k / num_experts) * capacity_factor)


def apply_capacity(
    ids_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    capacity: int,
    drop_policy: str = "probs",
    sequence_length: int | None = None,
) -> Tensor:
    """bool [T, K]: True for assignments that fit in their expert's capacity.

    ``probs`` keeps each expert's ``capacity`` highest weights (ties: earlier
    token first); ``position`` keeps the first ``capacity`` tokens in order.
    With ``sequence_length`` the capacity applies to each sequence separately.
    """
    T, K = ids_TK.shape
    device = ids_TK.device
    group_TK = ids_TK
    if sequence_length is not None:
        seq_T = torch.arange(T, device=device) // sequence_length
        group_TK = seq_T[:, None] * num_experts + ids_TK
    group_N = group_TK.reshape(-1)
    if drop_policy == "probs":
        order_N = torch.sort(-weights_TK.reshape(-1).float(), stable=True)[1]
    else:
        order_N = torch.arange(T * K, device=device)
    order_N = order_N[torch.sort(group_N[order_N], stable=True)[1]]
    sorted_groups = group_N[order_N]
    counts = torch.bincount(sorted_groups, minlength=int(group_N.max()) + 1 if T else 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(T * K, device=device) - starts[sorted_groups]
    rank_N = torch.empty_like(rank_sorted).scatter_(0, order_N, rank_sorted)
    return (rank_N < capacity).view(T, K)


# -------------------------------------------------------------------- losses


def load_balancing_loss(
    probs_TE: Tensor, ids_TK: Tensor, token_mask_T: Tensor | None = None
) -> Tensor:
    """E · Σ_e f_e · P_e over unmasked tokens (HF ``load_balancing_loss_func``).

    f_e = selections of expert e / tokens (sums to K), P_e = mean of ``probs_TE[:, e]``.
    """
    T, E = probs_TE.shape
    mask_T = (
        torch.ones(T, device=probs_TE.device)
        if token_mask_T is None
        else token_mask_T.to(probs_TE.device, torch.float32)
    )
    counts_E = torch.zeros(E, device=probs_TE.device).scatter_add_(
        0, ids_TK.reshape(-1), mask_T.repeat_interleave(ids_TK.shape[1])
    )
    rows = mask_T.sum()
    prob_E = (probs_TE.float() * mask_T[:, None]).sum(dim=0)
    return torch.sum((counts_E / rows) * (prob_E / rows)) * E


def _switch_aux(probs_TE: Tensor, ids_TK: Tensor, sequence_length: int | None) -> Tensor:
    """Switch form: the load-balancing loss averaged over sequences (groups)."""
    T, E = probs_TE.shape
    L = T if sequence_length is None else sequence_length
    onehot_SLE = F.one_hot(ids_TK[:, 0], E).float().view(T // L, L, E)
    frac_SE = onehot_SLE.mean(dim=1)
    prob_SE = probs_TE.float().view(T // L, L, E).mean(dim=1)
    return torch.mean(frac_SE * prob_SE) * E**2


def z_loss(logits_TE: Tensor, token_mask_T: Tensor | None = None) -> Tensor:
    """Mean over (unmasked) tokens of logsumexp(logits)² (Switch / ST-MoE z-loss)."""
    z_T = torch.logsumexp(logits_TE.float(), dim=-1) ** 2
    if token_mask_T is None:
        return z_T.mean()
    mask_T = token_mask_T.to(z_T.device, torch.float32)
    return (z_T * mask_T).sum() / mask_T.sum()


def _aux(
    kind: str, probs_TE: Tensor, ids_TK: Tensor, spec: RouterSpec, mask: Tensor | None
) -> Tensor:
    if kind in _NO_AUX or probs_TE.shape[0] == 0:
        return torch.zeros((), device=probs_TE.device)
    if kind in ("sigmoid_topk", "sigmoid_top1"):
        probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True)
    if kind == "switch_top1" and mask is None:
        return _switch_aux(probs_TE, ids_TK, spec.sequence_length)
    return load_balancing_loss(probs_TE, ids_TK, mask)


# --------------------------------------------------------------------- route


def _check(logits_TE: Tensor, spec: RouterSpec) -> None:
    if logits_TE.dim() != 2:
        raise ConfigError(f"logits must be [T, E], got shape {tuple(logits_TE.shape)}")
    E = int(logits_TE.shape[1])
    try:
        spec.check_experts(E)
    except FieldError as err:
        raise ConfigError(err.reason, field=f"router.{err.field}", value=err.value) from None
    if spec.kind in _SINGLE and spec.top_k != 1:
        raise ConfigError(
            f"router kind {spec.kind!r} routes each token to one expert; use top_k: 1",
            field="router.top_k",
            value=spec.top_k,
        )
    L = spec.sequence_length
    if spec.capacity_per == "sequence" and L is not None and logits_TE.shape[0] % L:
        raise ConfigError(
            f"tokens ({logits_TE.shape[0]}) must be a multiple of sequence_length",
            field="router.sequence_length",
            value=L,
        )


def _capacity(spec: RouterSpec, T: int, E: int) -> int | None:
    """Capacity of one expert per capacity group (the batch, or one sequence)."""
    if spec.capacity_factor is None or spec.kind == "soft":
        return None
    tokens = spec.sequence_length if spec.capacity_per == "sequence" else T
    return expert_capacity(int(tokens or 0), E, spec.top_k, spec.capacity_factor)


def route(
    logits_TE: Tensor,
    spec: RouterSpec,
    bias_E: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    token_mask_T: Tensor | None = None,
    noise_logits_TE: Tensor | None = None,
    token_ids_T: Tensor | None = None,
) -> Routing:
    """Route T tokens over E experts as ``spec.kind`` does (see module docstring).

    ``logits_TE`` router logits (computed in float32 here); ``bias_E`` selection-only
    bias (``sigmoid_topk``); ``generator`` seeds noise (``noisy_topk``);
    ``token_mask_T`` (1 = real token) masks padding out of the losses;
    ``noise_logits_TE`` the noise-gate logits of ``noisy_topk``; ``token_ids_T``
    what ``hash`` hashes. Raises :class:`ConfigError` for specs that cannot route E.
    """
    _check(logits_TE, spec)
    logits_TE = logits_TE.float()
    extras = _Extras(bias_E, generator, noise_logits_TE, token_ids_T)
    choice = ROUTERS[spec.kind](logits_TE, spec, extras)
    T, E = logits_TE.shape
    capacity = _capacity(spec, T, E)
    kept_TK = choice.kept_TK
    if kept_TK is None:
        kept_TK = torch.ones_like(choice.ids_TK, dtype=torch.bool)
        if capacity is not None:
            seq = spec.sequence_length if spec.capacity_per == "sequence" else None
            kept_TK = apply_capacity(
                choice.ids_TK, choice.weights_TK, E, capacity, spec.drop_policy, seq
            )
            capacity *= T // seq if seq else 1
    else:  # expert choice: every expert took the same number of tokens
        capacity = int(torch.bincount(choice.ids_TK[kept_TK], minlength=E).max()) if T else 0
    return Routing(
        expert_ids_TK=choice.ids_TK.long(),
        weights_TK=choice.weights_TK * kept_TK,
        kept_TK=kept_TK,
        probs_TE=choice.probs_TE,
        aux_loss=_aux(spec.kind, choice.probs_TE, choice.ids_TK, spec, token_mask_T),
        z_loss=z_loss(logits_TE, token_mask_T) if T else torch.zeros(()),
        capacity=capacity,
        pad_to_capacity=spec.pad_to_capacity and capacity is not None,
    )


# -------------------------------------------------------- router inputs


def jitter(x_TD: Tensor, eps: float, generator: torch.Generator | None) -> Tensor:
    """x · U(1-eps, 1+eps) (Switch / Mixtral router jitter); identity without a generator."""
    if eps <= 0 or generator is None:
        return x_TD
    noise = torch.rand(x_TD.shape, generator=generator, device=x_TD.device, dtype=x_TD.dtype)
    return x_TD * (1.0 - eps + 2.0 * eps * noise)


def router_logits(
    x_TD: Tensor,
    router_weight_DE: Tensor,
    spec: RouterSpec,
    router_bias_E: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """float32 [T, E] logits of a linear router, with ``spec.jitter_eps`` input jitter."""
    x_TD = jitter(x_TD.float(), spec.jitter_eps, generator)
    logits_TE = x_TD @ router_weight_DE.float()
    return logits_TE if router_bias_E is None else logits_TE + router_bias_E.float()
