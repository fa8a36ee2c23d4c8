"""Router configuration (shared by the kernels and the simulator).

``RouterConfig`` is the ``router:`` section of a scenario; ``RouterSpec`` adds
``top_k`` and is what :func:`moesim.kernels.gating.route` takes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.config.base import FieldError, Frozen

#: router kinds; the kernels registry must implement exactly these
ROUTER_KINDS: tuple[str, ...] = (
    "softmax_topk",  # Mixtral, Qwen2/3-MoE, OLMoE, DBRX (norm_p)
    "topk_softmax",  # GPT-OSS, Granite, JetMoE: top-k on logits, softmax over the k
    "sigmoid_topk",  # DeepSeek-V3: sigmoid, selection-only bias, group-limited, scaling
    "sigmoid_top1",  # Llama 4
    "switch_top1",  # Switch Transformer: top-1, jitter, per-sequence capacity
    "noisy_topk",  # Shazeer et al. 2017
    "expert_choice",  # Zhou et al. 2022: experts pick tokens
    "hash",  # Roller et al. 2021: fixed hash of the token id
    "soft",  # Puigcerver et al. 2023 (soft MoE): every token to every expert, weighted
)
#: the priced variant of a kind whose options change its cost: ``sigmoid_topk`` with
#: DeepSeek-V3's group-limited selection (``n_group`` / ``topk_group``) and bias
GROUPED_SIGMOID = "sigmoid_topk.grouped"
#: what the gating bench can time and calibrate: every kind plus the variants
GATE_KINDS: tuple[str, ...] = (*ROUTER_KINDS, GROUPED_SIGMOID)
#: kinds that route every token to exactly one expert
TOP1_KINDS = ("switch_top1", "sigmoid_top1")
RouterKind = Literal[
    "softmax_topk",
    "topk_softmax",
    "sigmoid_topk",
    "sigmoid_top1",
    "switch_top1",
    "noisy_topk",
    "expert_choice",
    "hash",
    "soft",
]


class RouterConfig(Frozen):
    """How tokens choose experts and what capacity does to them."""

    kind: RouterKind = "softmax_topk"
    normalize: bool = False  # renormalise the top-k weights to sum to 1 (Mixtral, Qwen3)
    norm_p: float | None = Field(default=None, gt=0)  # DBRX: p-norm renormalisation
    n_group: int | None = Field(default=None, ge=1)  # DeepSeek-V3 group-limited routing
    topk_group: int | None = Field(default=None, ge=1)
    routed_scaling_factor: float = Field(default=1.0, gt=0)
    capacity_factor: float | None = Field(default=None, gt=0)  # None = dropless
    drop_policy: Literal["probs", "position"] = "probs"
    pad_to_capacity: bool = False
    capacity_per: Literal["batch", "sequence"] = "batch"
    sequence_length: int | None = Field(default=None, ge=1)  # for capacity_per: sequence
    jitter_eps: float = Field(default=0.0, ge=0)  # Switch: multiplicative jitter on inputs
    aux_loss_coef: float = Field(default=0.0, ge=0)
    z_loss_coef: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _groups(self) -> RouterConfig:
        if (self.n_group is None) != (self.topk_group is None):
            missing = "topk_group" if self.topk_group is None else "n_group"
            raise FieldError(missing, None, "n_group and topk_group must be set together")
        if (
            self.n_group is not None
            and self.topk_group is not None
            and self.topk_group > self.n_group
        ):
            raise FieldError("topk_group", self.topk_group, f"must be <= n_group ({self.n_group})")
        if self.capacity_per == "sequence" and self.sequence_length is None:
            raise FieldError(
                "sequence_length", None, "required when capacity_per is 'sequence' (an int >= 1)"
            )
        return self


class RouterSpec(RouterConfig):
    """A router as the kernels take it: the scenario's router section plus top_k."""

    top_k: int = Field(default=2, ge=1)

    def check_experts(self, num_experts: int) -> None:
        """Raise :class:`FieldError` if this spec cannot route over ``num_experts``."""
        if self.kind in TOP1_KINDS and self.top_k != 1:
            raise FieldError("top_k", self.top_k, f"must be 1 for router kind {self.kind!r}")
        if self.top_k > num_experts:
            raise FieldError("top_k", self.top_k, f"must be <= num_experts ({num_experts})")
        if self.n_group is not None and self.topk_group is not None:
            if num_experts % self.n_group:
                raise FieldError(
                    "n_group", self.n_group, f"must divide num_experts ({num_experts})"
                )
            reachable = self.topk_group * (num_experts // self.n_group)
            if reachable < self.top_k:
                raise FieldError(
                    "topk_group",
                    self.topk_group,
                    f"topk_group * experts per group ({reachable}) must be >= top_k ({self.top_k})",
                )


def gate_kind(kind: str, n_group: int | None) -> str:
    """The gating fit that prices a router: its kind, or the grouped DeepSeek-V3 variant.

    The cost model falls back from ``gating.<kind>.<variant>`` to ``gating.<kind>``.
    """
    return GROUPED_SIGMOID if kind == "sigmoid_topk" and n_group is not None else kind
