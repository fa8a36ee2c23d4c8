"""Scenario: one MoE model on one cluster with one router, parallelism and workload.

Names follow Megatron-Core / Hugging Face where they exist. See
``scenarios/*.yaml`` for examples and README.md for every field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from moesim.config.base import FieldError, Frozen, check_dtype
from moesim.config.dynamics import DynamicsConfig, PlacementConfig
from moesim.config.router import RouterConfig, RouterSpec


class ClusterConfig(Frozen):
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=8, ge=1)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class DenseConfig(Frozen):
    """The non-MoE part of each layer (attention), priced by the roofline."""

    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    seq_length: int = Field(ge=1)
    num_dense_layers: int = Field(default=0, ge=0)  # leading dense-FFN layers (DeepSeek-V3: 3)
    dense_intermediate_size: int | None = Field(default=None, ge=1)


class ModelConfig(Frozen):
    hidden_size: int = Field(ge=1)
    moe_intermediate_size: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    num_moe_layers: int = Field(ge=1)
    num_shared_experts: int = Field(default=0, ge=0)
    shared_expert_intermediate_size: int | None = Field(default=None, ge=1)
    dtype: str = "bf16"
    dispatch_dtype: str | None = None  # None = dtype; fp8 for DeepEP-style dispatch
    combine_dtype: str | None = None  # None = dtype
    dense: DenseConfig | None = None

    @field_validator("dtype", "dispatch_dtype", "combine_dtype")
    @classmethod
    def _dtypes(cls, value: str | None) -> str | None:
        return None if value is None else check_dtype("", value)

    @model_validator(mode="after")
    def _k_le_e(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise FieldError("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        return self


class ParallelConfig(Frozen):
    ep: int = Field(default=1, ge=1)
    dp: int = Field(default=1, ge=1)
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)

    @property
    def world(self) -> int:
        return self.ep * self.dp * self.tp * self.pp


class RoutingConfig(Frozen):
    """Where per-expert loads come from. Parameters unused by a distribution are ignored."""

    distribution: Literal["uniform", "zipf", "lognormal", "dirichlet", "trace", "router"] = (
        "uniform"
    )
    zipf_exponent: float = Field(default=1.0, ge=0)
    lognormal_sigma: float = Field(default=1.0, ge=0)
    dirichlet_concentration: float = Field(default=1.0, gt=0)
    trace: str | None = None  # .npy or .parquet of expert ids [tokens, k] (or [layers, tokens, k])
    persistence: float = Field(default=1.0, ge=0, le=1)  # 1 = same popularity in every layer
    source_skew: float = Field(default=0.0, ge=0)  # extra per-source-GPU variation (Dirichlet)
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig)  # loads over steps

    @model_validator(mode="after")
    def _trace(self) -> RoutingConfig:
        if self.distribution == "trace" and not self.trace:
            raise FieldError("trace", None, "required when distribution is 'trace' (a path)")
        return self


class Straggler(Frozen):
    gpu: int = Field(ge=0)
    compute_slowdown: float = Field(default=1.0, ge=1.0)


class WorkloadConfig(Frozen):
    mode: Literal["training", "prefill", "decode"] = "training"
    tokens_per_gpu: int = Field(default=8192, ge=1)  # per micro-batch
    micro_batches: int = Field(default=1, ge=1)
    overlap_micro_batches: bool = False  # overlap one micro-batch's a2a with another's compute
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    stragglers: list[Straggler] = Field(default_factory=list)
    seed: int = 0


DISPATCHERS = ("alltoall", "allgather", "hierarchical", "low_latency")


class Scenario(Frozen):
    name: str
    hardware: str = "h100-sxm"  # a name in hardware_profiles/ or a path
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    model: ModelConfig
    router: RouterConfig = Field(default_factory=RouterConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    dispatcher: Literal["alltoall", "allgather", "hierarchical", "low_latency"] = "alltoall"
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)  # expert -> GPU

    @model_validator(mode="after")
    def _cross(self) -> Scenario:
        m, p = self.model, self.parallel
        if m.num_experts % p.ep:
            raise FieldError(
                "parallel.ep", p.ep, f"must divide model.num_experts ({m.num_experts})"
            )
        if p.world != self.cluster.num_gpus:
            raise FieldError(
                "parallel",
                dict(p),
                f"ep*dp*tp*pp = {p.world} must equal cluster GPUs "
                f"({self.cluster.nodes}x{self.cluster.gpus_per_node} = {self.cluster.num_gpus})",
            )
        try:
            self.router_spec().check_experts(m.num_experts)
        except FieldError as err:
            field = "model.top_k" if err.field == "top_k" else f"router.{err.field}"
            raise FieldError(field, err.value, err.reason) from None
        for i, s in enumerate(self.workload.stragglers):
            if s.gpu >= self.cluster.num_gpus:
                raise FieldError(
                    f"workload.stragglers.{i}.gpu",
                    s.gpu,
                    f"must be < number of GPUs ({self.cluster.num_gpus})",
                )
        return self

    def router_spec(self) -> RouterSpec:
        """The kernel-level router spec: this scenario's router plus ``model.top_k``."""
        return RouterSpec(**dict(self.router), top_k=self.model.top_k)

    @property
    def dispatch_dtype(self) -> str:
        return self.model.dispatch_dtype or self.model.dtype

    @property
    def combine_dtype(self) -> str:
        return self.model.combine_dtype or self.model.dtype
