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


ATTENTION_KINDS = ("mha", "gqa", "mla")
MLA_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


class DenseConfig(Frozen):
    """The non-MoE part of each layer: attention, and the dense-FFN layers.

    ``attention``: ``mha`` (one KV head per query head), ``gqa`` (grouped KV
    heads) or ``mla`` (DeepSeek multi-head latent attention, with the HF
    fields ``q_lora_rank`` (None: no query compression), ``kv_lora_rank``,
    ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``). None infers
    mha/gqa from the head counts. Layers: ``num_dense_layers`` leading dense
    layers (HF ``first_k_dense_replace``), then ``model.num_moe_layers`` MoE
    layers each preceded by ``model.moe_layer_freq - 1`` interleaved dense ones.
    ``num_sliding_layers`` of the attention layers use a causal window of
    ``sliding_window`` tokens (GPT-OSS alternates 128-token windows).
    """

    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    seq_length: int = Field(ge=1)
    num_dense_layers: int = Field(default=0, ge=0)  # leading dense-FFN layers (DeepSeek-V3: 3)
    dense_intermediate_size: int | None = Field(default=None, ge=1)
    attention: Literal["mha", "gqa", "mla"] | None = None
    q_lora_rank: int | None = Field(default=None, ge=1)
    kv_lora_rank: int | None = Field(default=None, ge=1)
    qk_nope_head_dim: int | None = Field(default=None, ge=1)
    qk_rope_head_dim: int | None = Field(default=None, ge=1)
    v_head_dim: int | None = Field(default=None, ge=1)
    attention_bias: bool = False  # biases on q, k, v and o (Llama / GPT-OSS semantics)
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)
    attention_sinks: bool = False  # one learned sink logit per head (GPT-OSS)
    sliding_window: int | None = Field(default=None, ge=1)
    num_sliding_layers: int = Field(default=0, ge=0)

    @property
    def kind(self) -> str:
        """The attention kind, inferred from the head counts when not given."""
        if self.attention is not None:
            return self.attention
        return "mha" if self.num_key_value_heads == self.num_attention_heads else "gqa"

    @model_validator(mode="after")
    def _attention(self) -> DenseConfig:
        H, KV = self.num_attention_heads, self.num_key_value_heads
        if self.kind == "mla":
            for name in MLA_FIELDS:
                if getattr(self, name) is None:
                    raise FieldError(name, None, "required when attention is 'mla'")
        elif H % KV:
            raise FieldError("num_key_value_heads", KV, f"must divide num_attention_heads ({H})")
        if self.kind == "mha" and KV != H:
            raise FieldError(
                "num_key_value_heads", KV, f"must equal num_attention_heads ({H}) for mha"
            )
        if self.num_sliding_layers and self.sliding_window is None:
            raise FieldError("sliding_window", None, "required when num_sliding_layers > 0")
        return self


class ModelConfig(Frozen):
    hidden_size: int = Field(ge=1)
    moe_intermediate_size: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    num_moe_layers: int = Field(ge=1)
    num_shared_experts: int = Field(default=0, ge=0)
    shared_expert_intermediate_size: int | None = Field(default=None, ge=1)
    dtype: str = "bf16"
    # fused-MoE kernel recipe on a measured profile: fp8_block = DeepSeek-style 128-block
    # fp8 scales (their own fit); None = the fastest measured recipe of the dtype
    expert_recipe: Literal["fp8_block"] | None = None
    dispatch_dtype: str | None = None  # None = dtype; fp8 for DeepEP-style dispatch
    combine_dtype: str | None = None  # None = dtype
    dense: DenseConfig | None = None
    vocab_size: int | None = Field(default=None, ge=1)  # None: no embedding / LM head
    tie_word_embeddings: bool = False
    mtp_num_layers: int = Field(default=0, ge=0)  # HF num_nextn_predict_layers (DeepSeek-V3: 1)
    moe_layer_freq: int = Field(default=1, ge=1)  # every n-th layer after the dense ones is MoE
    router_bias: bool = False  # router Linear has a bias (GPT-OSS)
    expert_bias: bool = False  # expert FFN Linears have biases (GPT-OSS)
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)

    @field_validator("dtype", "dispatch_dtype", "combine_dtype")
    @classmethod
    def _dtypes(cls, value: str | None) -> str | None:
        return None if value is None else check_dtype("", value)

    @model_validator(mode="after")
    def _k_le_e(self) -> ModelConfig:
        if self.expert_recipe is not None and self.dtype != "fp8":
            raise FieldError("expert_recipe", self.expert_recipe, "needs dtype fp8")
        if self.top_k > self.num_experts:
            raise FieldError("top_k", self.top_k, f"must be <= num_experts ({self.num_experts})")
        return self


PP_SCHEDULES = ("1f1b", "interleaved", "dualpipe", "dualpipev", "zb_h1")


class ParallelConfig(Frozen):
    """Megatron-Core parallel sizes with MoE Parallel Folding.

    Attention (and dense) layers map the GPUs as ``tp x cp x dp x pp``, MoE
    layers as ``etp x ep x edp x pp`` over the same GPUs (arXiv 2504.14960).
    ``dp`` and ``edp`` are derived from the cluster size; ``dp`` may be given
    and is then checked. ``sp``: sequence parallel (Megatron requires it for MoE
    with ``tp > 1``): each TP rank holds and routes its own share of the tokens,
    and TP's collectives are all-gather + reduce-scatter instead of all-reduce.
    """

    tp: int = Field(default=1, ge=1)
    sp: bool = True
    cp: int = Field(default=1, ge=1)
    dp: int | None = Field(default=None, ge=1)
    ep: int = Field(default=1, ge=1)
    etp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    # pipeline schedule (moesim.simulate.schedules); vpp = model chunks per pipeline rank
    pp_schedule: Literal["1f1b", "interleaved", "dualpipe", "dualpipev", "zb_h1"] = "1f1b"
    vpp: int = Field(default=1, ge=1)
    # layers (dense + MoE) of the first / last virtual stage; None = an even split
    # (Megatron-Core's decoder_first/last_pipeline_num_layers)
    pp_first_stage_layers: int | None = Field(default=None, ge=0)
    pp_last_stage_layers: int | None = Field(default=None, ge=0)

    def attention_dp(self, gpus: int) -> int:
        """Data-parallel size of the attention layers on ``gpus`` GPUs."""
        return gpus // (self.tp * self.cp * self.pp)

    def expert_dp(self, gpus: int) -> int:
        """Data-parallel size (``edp``) of the MoE layers on ``gpus`` GPUs."""
        return gpus // (self.etp * self.ep * self.pp)


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
    """A GPU whose compute takes ``compute_slowdown`` times the profile's (< 1: faster,
    e.g. a host measured faster than when it was calibrated)."""

    gpu: int = Field(ge=0)
    compute_slowdown: float = Field(default=1.0, gt=0.0)


RecomputeModule = Literal["core_attn", "layernorm", "moe_act", "shared_experts", "moe"]


def _core_attn() -> list[RecomputeModule]:
    return ["core_attn"]  # Megatron's default for --recompute-granularity selective


class WorkloadConfig(Frozen):
    """What one step runs.

    ``tokens_per_gpu``: tokens each GPU holds and routes per micro-batch (with
    ``tp``/``cp`` > 1 a TP x CP group holds ``tp * cp`` times as many of one
    sequence batch, as Megatron's sequence-parallel shards). ``recompute_granularity``
    follows Megatron: ``full`` re-runs each layer's forward (all-to-alls
    included) in its backward; ``selective`` re-runs ``recompute_modules``.
    ``optimizer_bytes_per_param``: HBM bytes the optimizer step reads and writes
    per local parameter (Adam with fp32 master weights, moments and gradients:
    read 16, write 14).
    """

    mode: Literal["training", "prefill", "decode"] = "training"
    tokens_per_gpu: int = Field(default=8192, ge=1)  # per micro-batch
    micro_batches: int = Field(default=1, ge=1)
    overlap_micro_batches: bool = False  # overlap one micro-batch's a2a with another's compute
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    stragglers: list[Straggler] = Field(default_factory=list)
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    recompute_modules: list[RecomputeModule] = Field(default_factory=_core_attn)
    optimizer_bytes_per_param: float = Field(default=30.0, ge=0)
    seed: int = 0


class TrainingConfig(Frozen):
    """Gradient synchronisation and communication overheads (Megatron-Core names).

    ``comm_sm_fraction``: share of a GPU's SMs a communication kernel occupies while
    it runs; compute overlapping it runs ``1 / (1 - fraction)`` slower (DeepSeek-V3
    report, arXiv:2412.19437 sec. 3.2.2: 20 of 132 SMs for DeepEP; 0 = free comm).
    """

    distributed_optimizer: bool = True  # ZeRO-1: reduce-scatter grads, all-gather params
    overlap_grad_reduce: bool = True  # reduce-scatter buckets during the last backward
    overlap_param_gather: bool = True  # all-gather buckets under the next forward
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    bucket_size_params: int | None = Field(default=None, ge=1)  # None: max(40M, 1M * dp)
    comm_sm_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)


DISPATCHERS = ("alltoall", "allgather", "hierarchical", "low_latency")


class MemoryConfig(Frozen):
    """What a GPU keeps besides the work: state dtypes, sharding, reserve (recompute is
    ``workload.recompute_granularity`` / ``recompute_modules``).

    Defaults follow Megatron-Core mixed precision: bf16 weights (``param_dtype``
    null = ``model.dtype``), fp32 main gradients, fp32 master weights and Adam
    moments; ``training.distributed_optimizer`` shards master weights and moments
    over the data-parallel group (DP x CP for non-expert, expert-DP for expert
    weights); ``parallel.pp_schedule`` sets the micro-batches in flight.
    """

    reserve_GiB: float = Field(default=0.0, ge=0)  # allocator / framework / NCCL reserve
    flash_attention: bool = True  # fused attention keeps no s x s scores (as core_attn recompute)
    optimizer: Literal["adam", "sgd"] = "adam"
    param_dtype: str | None = None  # None = model.dtype
    grad_dtype: str = "fp32"
    optimizer_dtype: str = "fp32"  # master weights (and moments unless moments_dtype)
    moments_dtype: str | None = None  # None = optimizer_dtype; DeepSeek-V3 keeps AdamW's in bf16
    kv_cache_dtype: str | None = None  # None = model.dtype
    dropout: bool = False  # Megatron-style dropout masks (Korthikanti et al.)
    fused_activation: bool = True  # fused SwiGLU saves 3F per row; unfused (torch eager) 4F

    @field_validator(
        "param_dtype", "grad_dtype", "optimizer_dtype", "moments_dtype", "kv_cache_dtype"
    )
    @classmethod
    def _dtypes(cls, value: str | None) -> str | None:
        return None if value is None else check_dtype("", value)


class Scenario(Frozen):
    name: str
    hardware: str = "h100-sxm"  # a name in hardware_profiles/ or a path
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    model: ModelConfig
    router: RouterConfig = Field(default_factory=RouterConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    dispatcher: Literal["alltoall", "allgather", "hierarchical", "low_latency"] = "alltoall"
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)  # expert -> GPU

    @model_validator(mode="after")
    def _cross(self) -> Scenario:
        m, p = self.model, self.parallel
        if m.num_experts % p.ep:
            raise FieldError(
                "parallel.ep", p.ep, f"must divide model.num_experts ({m.num_experts})"
            )
        self._check_folding()
        self._check_shards()
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

    def _check_folding(self) -> None:
        """MoE Parallel Folding: both mappings must tile the same GPUs."""
        p, n = self.parallel, self.cluster.num_gpus
        where = f"cluster GPUs ({self.cluster.nodes}x{self.cluster.gpus_per_node} = {n})"
        attn = p.tp * p.cp * p.pp
        if p.dp is not None and attn * p.dp != n:
            raise FieldError(
                "parallel",
                dict(p),
                f"attention layers: tp*cp*dp*pp = {attn * p.dp} must equal {where}; "
                "leave dp out to derive it",
            )
        if n % attn:
            raise FieldError(
                "parallel", dict(p), f"attention layers: tp*cp*pp = {attn} must divide {where}"
            )
        moe = p.etp * p.ep * p.pp
        if n % moe:
            raise FieldError(
                "parallel",
                dict(p),
                f"MoE layers: etp*ep*edp*pp must equal {where}, but etp*ep*pp = {moe} "
                "does not divide it",
            )
        if p.tp > 1 and not p.sp:
            raise FieldError(
                "parallel.sp", p.sp, "must be true with tp > 1 (Megatron-Core MoE requires it)"
            )

    def _check_shards(self) -> None:
        """Each split dimension must divide what it splits."""
        m, p = self.model, self.parallel
        checks = [("parallel.etp", p.etp, "model.moe_intermediate_size", m.moe_intermediate_size)]
        if m.dense is not None:
            heads = m.dense.num_attention_heads
            groups = heads if m.dense.kind == "mla" else m.dense.num_key_value_heads
            checks += [
                ("parallel.tp", p.tp, "model.dense.num_attention_heads", heads),
                ("parallel.tp", p.tp, "model.dense.num_key_value_heads", groups),
                ("parallel.cp", p.cp, "model.dense.seq_length", m.dense.seq_length),
            ]
        for field, size, what, value in checks:
            if value % size:
                raise FieldError(field, size, f"must divide {what} ({value})")

    @property
    def num_layers(self) -> int:
        """Decoder layers of the main model (MTP modules not included)."""
        dense = self.model.dense.num_dense_layers if self.model.dense else 0
        return dense + self.model.num_moe_layers * self.model.moe_layer_freq

    def router_spec(self) -> RouterSpec:
        """The kernel-level router spec: this scenario's router plus ``model.top_k``."""
        return RouterSpec(**dict(self.router), top_k=self.model.top_k)

    @property
    def dispatch_dtype(self) -> str:
        return self.model.dispatch_dtype or self.model.dtype

    @property
    def combine_dtype(self) -> str:
        return self.model.combine_dtype or self.model.dtype
