"""Expert FFNs over expert-major rows, and a whole MoE layer.

Legend: T = tokens, D = model dim, F = expert FFN dim, E = experts, K = top-k,
N = permuted rows (grouped by expert), A/B = in/out dims of one grouped GEMM.

``experts_forward(x_ND, tokens_per_expert_E, w_gate_EDF, w_up_EDF, w_down_EFD,
strategy=...) -> y_ND`` applies expert e's SwiGLU FFN,
``down(act(x @ w_gate[e]) * (x @ w_up[e]))``, to its ``tokens_per_expert_E[e]``
consecutive rows (``w_gate=None``: plain ``down(act(x @ w_up[e]))``, e.g. Switch;
``activation="gpt_oss"``: GPT-OSS's clamped GLU, with optional per-expert biases).
Every strategy (:data:`EXPERT_STRATEGIES`) is one grouped GEMM
``[N, A] x [E, A, B] -> [N, B]``:

- ``loop``       one ``mm`` per expert with rows (Hugging Face eager, Megatron
  SequentialMLP).
- ``bmm``        pad every expert to the largest load, one ``torch.bmm`` over
  [E, C, A] (Switch / GShard capacity buffers, padded batched GEMM).
- ``grouped_mm`` ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on
  older torch) with int32 end offsets: one kernel for ragged groups (torchtitan,
  Megatron TE GroupedGEMM). The fast path is a CUDA sm90+ GPU; torch 2.13 also
  runs it on CPU, forward only (its CPU backward fails). Dims are zero padded to
  16-byte rows as the kernel requires. :func:`grouped_mm_available` says whether
  it runs on a device/dtype; ``experts_forward`` raises :class:`ConfigError` if not.

``moe_forward`` runs router → permute → experts → unpermute (+ shared experts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from moesim.errors import ConfigError, lookup
from moesim.kernels.dispatch import permute, unpermute
from moesim.kernels.gating import RouterSpec, Routing, route, router_logits

__all__ = [
    "ACTIVATIONS",
    "EXPERT_STRATEGIES",
    "GLUS",
    "ExpertWeights",
    "MoEOutput",
    "SharedExpert",
    "experts_forward",
    "grouped_mm_available",
    "moe_forward",
]

GroupedMatmul = Callable[[Tensor, Tensor, Tensor], Tensor]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0


def _gpt_oss_glu(gate_NF: Tensor, up_NF: Tensor) -> Tensor:
    """GPT-OSS: (clamp(up, ±7) + 1) · g · sigmoid(1.702 g), g = min(gate, 7)."""
    gate_NF = gate_NF.clamp(max=GPT_OSS_LIMIT)
    up_NF = up_NF.clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
    return (up_NF + 1) * gate_NF * torch.sigmoid(gate_NF * GPT_OSS_ALPHA)


#: gated units beyond act(gate) · up, by activation name
GLUS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"gpt_oss": _gpt_oss_glu}


# ------------------------------------------------------------ grouped GEMMs


def _loop_gmm(x_NA: Tensor, counts_E: Tensor, w_EAB: Tensor) -> Tensor:
    # split / unbind / cat rather than slice-assign and ``w_EAB[e]``: the same GEMMs and
    # one copy of the output, and under autograd a backward of one cat and one stack
    # (indexing a slice of ``w_EAB`` would materialise a full-size gradient per expert)
    rows_E = counts_E.tolist()
    if not rows_E:
        return x_NA.new_empty(x_NA.shape[0], w_EAB.shape[2])
    parts = [x @ w for x, w in zip(torch.split(x_NA, rows_E), w_EAB.unbind(0), strict=True)]
    return torch.cat(parts)


def _bmm_gmm(x_NA: Tensor, counts_E: Tensor, w_EAB: Tensor) -> Tensor:
    E, A, B = w_EAB.shape
    C = int(counts_E.max()) if E else 0
    if int(counts_E.min()) == C:  # already a capacity layout
        return torch.bmm(x_NA.view(E, C, A), w_EAB).reshape(E * C, B)
    counts_E = counts_E.to(x_NA.device)
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_NA.device), counts_E)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(x_NA.shape[0], device=x_NA.device) - starts_E[expert_N]
    x_ECA = x_NA.new_zeros(E, C, A)
    x_ECA[expert_N, rank_N] = x_NA
    return torch.bmm(x_ECA, w_EAB)[expert_N, rank_N]


def _grouped_mm_fn() -> Callable[..., Tensor] | None:
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def _pad_last(t: Tensor, multiple: int) -> Tensor:
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def _grouped_gmm(x_NA: Tensor, counts_E: Tensor, w_EAB: Tensor) -> Tensor:
    fn = _grouped_mm_fn()
    if fn is None or not grouped_mm_available(x_NA.device.type, x_NA.dtype):
        raise ConfigError(
            f"grouped_mm is not available for {x_NA.dtype} on {x_NA.device.type} with torch "
            f"{torch.__version__}; use strategy loop or bmm",
            field="strategy",
            value="grouped_mm",
        )
    align = 16 // x_NA.element_size()
    B = w_EAB.shape[2]
    x_pad = _pad_last(x_NA, align).contiguous()
    w_pad = _pad_last(w_EAB.transpose(1, 2), align).transpose(1, 2)  # pad A
    w_pad = _pad_last(w_pad, align).contiguous()  # pad B
    offs_E = torch.cumsum(counts_E, 0).to(device=x_NA.device, dtype=torch.int32)
    return fn(x_pad, w_pad, offs=offs_E)[:, :B]


@functools.cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``grouped_mm`` runs for this device type and dtype (a tiny trial call)."""
    fn = _grouped_mm_fn()
    if fn is None:
        return False
    try:
        x = torch.ones(4, 8, device=device_type, dtype=dtype)
        w = torch.ones(2, 8, 8, device=device_type, dtype=dtype)
        out = fn(x, w, offs=torch.tensor([2, 4], dtype=torch.int32, device=device_type))
        return bool(torch.allclose(out.float(), torch.full((4, 8), 8.0, device=device_type)))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


#: strategy name -> grouped GEMM ``(x_NA, tokens_per_expert_E, w_EAB) -> y_NB``
EXPERT_STRATEGIES: dict[str, GroupedMatmul] = {
    "loop": _loop_gmm,
    "bmm": _bmm_gmm,
    "grouped_mm": _grouped_gmm,
}


def _strategy(name: str) -> GroupedMatmul:
    return lookup(EXPERT_STRATEGIES, name, field="strategy", what="expert strategy")


def _check_activation(name: str) -> None:
    if name not in ACTIVATIONS and name not in GLUS:
        allowed = ", ".join([*ACTIVATIONS, *GLUS])
        raise ConfigError(f"unknown activation; allowed: {allowed}", field="activation", value=name)


def _hidden(name: str, gate_NF: Tensor | None, up_NF: Tensor) -> Tensor:
    """act(gate) · up, a named GLU(gate, up), or act(up) for a non-gated FFN."""
    if gate_NF is None:
        if name in GLUS:
            raise ConfigError("a GLU activation needs gate weights", field="activation", value=name)
        return ACTIVATIONS[name](up_NF)
    if name in GLUS:
        return GLUS[name](gate_NF, up_NF)
    return ACTIVATIONS[name](gate_NF) * up_NF


def _biased(
    gmm: GroupedMatmul, x_NA: Tensor, counts_E: Tensor, w_EAB: Tensor, b_EB: Tensor | None
) -> Tensor:
    """gmm plus a per-expert bias on each row."""
    y_NB = gmm(x_NA, counts_E, w_EAB)
    if b_EB is None:
        return y_NB
    expert_N = torch.repeat_interleave(torch.arange(len(counts_E)), counts_E)
    return y_NB + b_EB[expert_N.to(b_EB.device)].to(y_NB.dtype)


def experts_forward(
    x_ND: Tensor,
    tokens_per_expert_E: Tensor,
    w_gate_EDF: Tensor | None,
    w_up_EDF: Tensor,
    w_down_EFD: Tensor,
    strategy: str = "loop",
    *,
    activation: str = "silu",
    b_gate_EF: Tensor | None = None,
    b_up_EF: Tensor | None = None,
    b_down_ED: Tensor | None = None,
) -> Tensor:
    """[N, D] expert outputs of the rows in ``x_ND`` (grouped by expert, see module doc).

    ``tokens_per_expert_E`` must sum to N. ``activation`` names an act in
    :data:`ACTIVATIONS` (h = act(gate) · up) or a GLU in :data:`GLUS`; the
    optional per-expert biases are added after each projection (GPT-OSS).
    Output dtype = ``x_ND.dtype``.
    """
    gmm = _strategy(strategy)
    _check_activation(activation)
    counts_E = tokens_per_expert_E.to(torch.long).cpu()
    if int(counts_E.sum()) != x_ND.shape[0]:
        raise ValueError(
            f"tokens_per_expert sums to {int(counts_E.sum())} but x_ND has {x_ND.shape[0]} rows"
        )
    up_NF = _biased(gmm, x_ND, counts_E, w_up_EDF, b_up_EF)
    gate_NF = None if w_gate_EDF is None else _biased(gmm, x_ND, counts_E, w_gate_EDF, b_gate_EF)
    return _biased(gmm, _hidden(activation, gate_NF, up_NF), counts_E, w_down_EFD, b_down_ED)


# ---------------------------------------------------------------- the layer


@dataclass(frozen=True)
class ExpertWeights:
    """Routed experts: ``w_gate_EDF`` (None = non-gated FFN), ``w_up_EDF``, ``w_down_EFD``,
    the activation / GLU name and optional per-expert biases (GPT-OSS)."""

    w_gate_EDF: Tensor | None
    w_up_EDF: Tensor
    w_down_EFD: Tensor
    activation: str = "silu"
    b_gate_EF: Tensor | None = None
    b_up_EF: Tensor | None = None
    b_down_ED: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.w_up_EDF.shape[0])

    def block(self, rank: int, world: int) -> ExpertWeights:
        """The experts rank ``rank`` of ``world`` holds: ``rank*El .. rank*El+El-1``.

        Contiguous expert placement (El = E / world), as the EP layer and the
        simulator place experts.
        """
        n = self.num_experts // world
        sl = slice(rank * n, (rank + 1) * n)
        return self._map(lambda t: t[sl])

    def to(self, device: torch.device | str) -> ExpertWeights:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ExpertWeights:
        def opt(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return replace(
            self,
            w_gate_EDF=opt(self.w_gate_EDF),
            w_up_EDF=fn(self.w_up_EDF),
            w_down_EFD=fn(self.w_down_EFD),
            b_gate_EF=opt(self.b_gate_EF),
            b_up_EF=opt(self.b_up_EF),
            b_down_ED=opt(self.b_down_ED),
        )


@dataclass(frozen=True)
class SharedExpert:
    """Always-on expert(s) (DeepSeek, Qwen2-MoE, Llama 4), ``gate_D``: Qwen2-MoE's
    sigmoid gate ``sigmoid(x · gate_D)`` on the shared output (None = ungated)."""

    w_gate_DF: Tensor
    w_up_DF: Tensor
    w_down_FD: Tensor
    gate_D: Tensor | None = None
    activation: str = "silu"

    def __call__(self, x_TD: Tensor) -> Tensor:
        _check_activation(self.activation)
        h_TF = _hidden(self.activation, x_TD @ self.w_gate_DF, x_TD @ self.w_up_DF)
        y_TD = h_TF @ self.w_down_FD
        if self.gate_D is not None:
            y_TD = torch.sigmoid(x_TD @ self.gate_D.unsqueeze(1)) * y_TD
        return y_TD


@dataclass(frozen=True)
class MoEOutput:
    """``y_TD`` layer output; ``routing`` and ``logits_TE`` for losses and stats."""

    y_TD: Tensor
    routing: Routing
    logits_TE: Tensor


def moe_forward(
    x_TD: Tensor,
    router_weight_DE: Tensor,
    experts: ExpertWeights,
    spec: RouterSpec,
    *,
    router_bias_E: Tensor | None = None,
    bias_E: Tensor | None = None,
    generator: torch.Generator | None = None,
    dispatch: str = "sort",
    expert_strategy: str = "loop",
    shared: SharedExpert | None = None,
    scale_inputs: bool = False,
    token_mask_T: Tensor | None = None,
) -> MoEOutput:
    """One MoE layer forward: y = Σ_k w_k · expert_k(x) (+ shared(x)), dropped slots add 0.

    ``router_bias_E`` is the router's linear bias (GPT-OSS); ``bias_E`` the
    selection-only correction bias (DeepSeek-V3). ``scale_inputs`` multiplies
    the expert *input* by the weight instead of the output (Llama 4).
    """
    logits_TE = router_logits(x_TD, router_weight_DE, spec, router_bias_E, generator)
    routing = route(logits_TE, spec, bias_E, generator, token_mask_T=token_mask_T)
    x_ND, layout_E, state = permute(x_TD, routing, dispatch, experts.num_experts)
    if scale_inputs:
        x_ND = x_ND * state.weight_N.to(x_ND.dtype).unsqueeze(1)
        state = state.with_unit_weights()
    y_ND = experts_forward(
        x_ND,
        layout_E,
        experts.w_gate_EDF,
        experts.w_up_EDF,
        experts.w_down_EFD,
        expert_strategy,
        activation=experts.activation,
        b_gate_EF=experts.b_gate_EF,
        b_up_EF=experts.b_up_EF,
        b_down_ED=experts.b_down_ED,
    )
    y_TD = unpermute(y_ND, state, dispatch)
    if shared is not None:
        y_TD = y_TD + shared(x_TD)
    return MoEOutput(y_TD, routing, logits_TE)
