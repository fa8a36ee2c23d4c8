"""Hardware profiles: GPU, scale-up (NVLink) and scale-out (NIC) tiers.

Units live in key names (``hbm_GBps``, ``latency_us``). Bandwidths are per GPU
and per direction. A spec profile gives peaks and achievable efficiencies; a
calibrated profile adds a ``calibration`` section of fitted curves (written by
``moesim calibrate``) that the cost model uses instead.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Literal

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from moesim.config.base import FieldError, Frozen, check_dtype

Fraction = float


class Curve(Frozen):
    """``y(x)``: piecewise linear in ``log(x)`` through the points, flat outside them."""

    x: list[float] = Field(min_length=1)
    y: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> Curve:
        if len(self.x) != len(self.y):
            raise FieldError("y", len(self.y), f"must have as many points as x ({len(self.x)})")
        if any(v <= 0 for v in self.x):
            raise FieldError("x", self.x, "all points must be > 0")
        if any(b <= a for a, b in zip(self.x, self.x[1:], strict=False)):
            raise FieldError("x", self.x, "must be strictly increasing")
        if any(v <= 0 for v in self.y):
            raise FieldError("y", self.y, "all values must be > 0")
        return self


class GemmShapeSpec(Frozen):
    """Spec-model GEMM shape efficiency (profiles without measurements, e.g. MI300X).

    A GEMM ``m x n x k`` runs as ``ceil(m/tile_m) * ceil(n/tile_n)`` output tiles
    in waves over ``compute_units``; the padded tiles and the last partial wave
    do no useful work, so the large-GEMM efficiency is multiplied by
    ``(m n / (tiles * tile_m tile_n)) * (waves / ceil(waves))``. A small GEMM
    is then bound by its bytes (roofline), as the measured tables show.
    """

    tile_m: int = Field(default=128, ge=1)
    tile_n: int = Field(default=128, ge=1)
    compute_units: int = Field(ge=1)


class GPUSpec(Frozen):
    name: str
    peak_tflops: dict[str, float]  # dense, per dtype
    hbm_GBps: float = Field(gt=0)
    hbm_GiB: float = Field(gt=0)
    gemm_efficiency: Fraction = Field(gt=0, le=1)  # large GEMM, fraction of dense peak
    memory_efficiency: Fraction = Field(gt=0, le=1)  # streaming copy, fraction of hbm_GBps
    kernel_launch_us: float = Field(ge=0)
    gemm_shape: GemmShapeSpec | None = None  # shape-dependent spec GEMM efficiency
    sms: int | None = Field(default=None, ge=1)  # streaming multiprocessors (DeepEP SM terms)

    @field_validator("peak_tflops")
    @classmethod
    def _peaks(cls, value: dict[str, float]) -> dict[str, float]:
        for dtype, tflops in value.items():
            check_dtype(dtype, dtype)
            if not tflops > 0:
                raise FieldError(dtype, tflops, "peak TFLOP/s must be > 0")
        if not value:
            raise FieldError("", value, "at least one dtype is required")
        return value


class ScaleUp(Frozen):
    """Intra-node fabric (NVLink + NVSwitch): non-blocking, per GPU per direction."""

    link_GBps: float = Field(gt=0)
    latency_us: float = Field(ge=0)
    efficiency: Fraction = Field(gt=0, le=1)


class NodeSpec(Frozen):
    gpus_per_node: int = Field(ge=1)
    scaleup: ScaleUp


class ScaleOut(Frozen):
    """Inter-node network: one NIC tier per GPU, then the fabric."""

    nic_GBps: float = Field(gt=0)
    latency_us: float = Field(ge=0)
    efficiency: Fraction = Field(gt=0, le=1)
    topology: Literal["rail_optimized", "fat_tree"] = "rail_optimized"
    oversubscription: float = Field(default=1.0, ge=1.0)  # fabric uplinks: 2.0 = 2:1


class MemoryOpFit(Frozen):
    """Memory-bound op: ``latency_us + bytes / bandwidth_GBps(bytes) [+ flops / tflops]``.

    ``tflops`` prices the op's GEMM part (the router logits of a gating call) at
    a fitted rate; None when the op has none or the data could not separate it.
    """

    latency_us: float = Field(ge=0)
    bandwidth_GBps: Curve  # x = bytes moved
    tflops: float | None = Field(default=None, gt=0)


class GemmFit(Frozen):
    """Grouped expert GEMM: ``latency_us + sum_e [per_expert_us + flops_e / tflops(flops_e)]``."""

    latency_us: float = Field(ge=0)
    per_expert_us: float = Field(default=0.0, ge=0)
    tflops: Curve  # x = FLOPs of one expert's work in the call (or its tokens, see tflops_by)
    # measured GPU tables: each active expert also streams its weights at weight_GBps,
    # and the rate curve is read at the expert's tokens (``tflops_by: tokens``)
    weight_GBps: float | None = Field(default=None, gt=0)
    # ... or, where measured, at a bandwidth that grows with the weight tiles the call
    # streams in parallel (x = work.expert_weight_tiles summed over active experts)
    weight_GBps_by_tiles: Curve | None = None
    tflops_by: Literal["flops", "tokens"] = "flops"
    scan_ps: float = Field(default=0.0, ge=0)  # ps per (routed row x hidden) the kernel scans
    # ps per activation byte an expert's rows move (work.expert_activation_bytes)
    activation_ps: float = Field(default=0.0, ge=0)


class CommRegime(Frozen):
    """One size regime of a collective (an NCCL protocol): ``latency + bytes / GBps``."""

    upto_bytes: float | None = Field(default=None, gt=0)  # regime ends here (None: no end)
    latency_us: float = Field(ge=0)
    GBps: float = Field(gt=0)


class CommFit(Frozen):
    """Collective on one tier: ``latency_us + bytes / bandwidth_GBps(bytes)`` per rank.

    ``bytes`` is what one rank sends to the other ranks (its own share excluded).
    With ``regimes`` (measured NCCL tables) the time is the regime's own line
    ``latency + bytes / GBps`` for the regime whose range holds ``bytes``; the
    curve then renders those lines for code that reads a bandwidth at a size.
    """

    latency_us: float = Field(ge=0)
    bandwidth_GBps: Curve  # x = bytes a rank sends to other ranks
    regimes: list[CommRegime] = Field(default_factory=list)


class DeepEPFit(CommFit):
    """A DeepEP kernel: the line over bytes moved plus shape terms (all zero by default).

    ``t = latency + per_expert_us E + per_hidden_ns D + B / bw(B)
    + sm_ps T K D / min(E, sms)``, with ``B = bytes (copies + local_copies) / copies``:
    the call's fixed cost grows with the experts (low-latency: per-expert
    counters) and the row width (normal: layout), the normal kernels also move
    ``local_copies`` rows per token through their own buffer, and the
    low-latency kernels run one SM per expert up to ``sms``, each SM copying its
    tokens' rows.
    """

    per_expert_us: float = Field(default=0.0, ge=0)
    per_hidden_ns: float = Field(default=0.0, ge=0)
    local_copies: float = Field(default=0.0, ge=0)
    sm_ps: float = Field(default=0.0, ge=0)  # ps per (token x top-k x hidden) element per SM
    sms: int = Field(default=1, ge=1)


class GemmTable(Frozen):
    """Measured GEMM seconds on a grid: ``log t`` trilinear in ``(log m, log n, log k)``.

    ``latency_us`` is C-ordered ``[m][n][k]``; outside the grid the nearest edge
    is the edge below and linear scaling above (:func:`moesim.costs.tables.table_s`;
    :meth:`moesim.costs.CostModel.out_of_range` says so).
    """

    m: list[int] = Field(min_length=1)
    n: list[int] = Field(min_length=1)
    k: list[int] = Field(min_length=1)
    latency_us: list[float]

    @model_validator(mode="after")
    def _size(self) -> GemmTable:
        want = len(self.m) * len(self.n) * len(self.k)
        if len(self.latency_us) != want:
            raise FieldError("latency_us", len(self.latency_us), f"must have {want} values")
        for axis in ("m", "n", "k"):
            v = getattr(self, axis)
            if any(b <= a for a, b in pairwise(v)) or v[0] <= 0:
                raise FieldError(axis, v, "must be positive and strictly increasing")
        if any(not t > 0 for t in self.latency_us):
            raise FieldError("latency_us", "...", "all values must be > 0")
        return self


class AttentionFit(Frozen):
    """Measured causal attention forward (FMHA) of one kernel: seconds from the shape.

    ``t = latency + bytes_ps x bytes + flops / rate`` with ``flops = b H S^2 (d_qk + d_v)``
    (causal: half of the ``S x S`` scores; ``b`` sequences of ``S`` tokens, ``H`` query
    heads), ``bytes`` = q, k, v in and o out (``b S (H + KV) (d_qk + d_v)`` elements of
    2 bytes) and ``log rate`` (TFLOP/s) bilinear in ``(log S, log d_qk)`` over the grid
    ``tflops[seq][head_dim]`` times ``occupancy`` over the call's query tiles
    ``b H ceil(S / tile)`` (linear in log tiles; 1 at the last knot). Outside the knots
    the nearest edge holds (:meth:`moesim.costs.CostModel.out_of_range` says so).
    """

    latency_us: float = Field(ge=0)
    bytes_ps: float = Field(ge=0)
    tile: int = Field(default=128, gt=0)
    seq: list[float] = Field(min_length=1)
    head_dim: list[float] = Field(min_length=1)
    tflops: list[float]  # C-ordered [seq][head_dim]
    tiles: list[float] = Field(min_length=1)
    occupancy: list[float]

    @model_validator(mode="after")
    def _size(self) -> AttentionFit:
        if len(self.tflops) != len(self.seq) * len(self.head_dim):
            raise FieldError(
                "tflops", len(self.tflops), f"must have {len(self.seq) * len(self.head_dim)} values"
            )
        if len(self.occupancy) != len(self.tiles):
            raise FieldError(
                "occupancy", len(self.occupancy), f"must have {len(self.tiles)} values"
            )
        for axis in ("seq", "head_dim", "tiles"):
            v = getattr(self, axis)
            if any(b <= a for a, b in pairwise(v)) or v[0] <= 0:
                raise FieldError(axis, v, "must be positive and strictly increasing")
        if any(not v > 0 for v in [*self.tflops, *self.occupancy]):
            raise FieldError("tflops", "...", "all rates and occupancies must be > 0")
        return self


class FamilyError(Frozen):
    mape: float = Field(ge=0)
    max_ape: float = Field(ge=0)
    n: int = Field(ge=0)
    # rows a family's stated physical rule flagged (neither fitted nor in mape), and
    # the held-out MAPE over every row, flagged ones included
    flagged: int = Field(default=0, ge=0)
    mape_all: float | None = Field(default=None, ge=0)

    @model_serializer(mode="wrap")
    def _flags_only_when_flagged(self, handler: SerializerFunctionWrapHandler) -> Any:
        """A family without flagged rows is written as before: mape, max_ape, n."""
        out = handler(self)
        if not self.flagged and isinstance(out, dict):
            out.pop("flagged", None)
            out.pop("mape_all", None)
        return out


class CalibrationSource(Frozen):
    """Where a calibration came from: the results files, and the commit they were measured at."""

    results: list[str]
    commit: str | None = None  # commit of the code that took the measurements
    device: str
    torch: str | None = None
    threads: int | None = None
    created: str
    calibrated_commit: str | None = None  # commit of the code that fitted the curves
    quick: bool | None = None  # measured with ``moesim bench --quick``
    measured_by: str | None = None  # imported tables: package, version, frameworks, tables


class BackwardFit(Frozen):
    """Measured backward / forward time of one MoE layer's kernels (autograd, this device).

    ``gemm``: the expert GEMMs' backward (input and weight gradients) over their
    forward; ``memory``: the memory-bound ops' (router, permute, unpermute). Without
    it the simulator takes 2 and 1 (two GEMMs per forward GEMM, one pass per copy).
    """

    gemm: float = Field(default=2.0, gt=0)
    memory: float = Field(default=1.0, gt=0)
    source: str = ""  # what was timed


class Calibration(Frozen):
    """Fitted cost curves. Families missing here fall back to the spec roofline."""

    source: CalibrationSource
    dtype: str = "fp32"  # the dtype the curves were measured in
    # gating, permute, unpermute, copy; "gating.<router kind>" for one router kind
    memory: dict[str, MemoryOpFit] = Field(default_factory=dict)
    gemm: dict[str, GemmFit] = Field(default_factory=dict)  # per dtype
    alltoall: dict[str, CommFit] = Field(default_factory=dict)  # per tier: scaleup, scaleout
    errors: dict[str, FamilyError] = Field(default_factory=dict)
    fallbacks: list[str] = Field(default_factory=list)  # families priced from spec values
    notes: list[str] = Field(default_factory=list)  # e.g. families fitted but not validated
    # dense GEMMs (attention, shared experts) per dtype, from the roofline suite
    dense: dict[str, GemmFit] = Field(default_factory=dict)
    backward: BackwardFit | None = None  # measured backward factors (default 2x / 1x)
    # family -> {strategy: shapes it priced}; a curve prices the fastest measured
    # strategy per shape (what a tuned system runs) unless one was chosen (--strategy)
    strategies: dict[str, dict[str, int]] = Field(default_factory=dict)
    # measured GPU tables (moesim import): GEMM seconds by (m, n, k) per recipe
    # (bf16, fp8, fp8_block), collectives per "<kind>.<gpus>" (x = message bytes),
    # DeepEP per "<mode>.<op>[.<sms>]" (x = bytes a rank sends to other ranks)
    gemm_table: dict[str, GemmTable] = Field(default_factory=dict)
    collectives: dict[str, CommFit] = Field(default_factory=dict)
    deepep: dict[str, DeepEPFit] = Field(default_factory=dict)
    # measured attention core (FMHA forward, causal) per "<dtype>" (GQA/MHA kernel) or
    # "mla.<dtype>" (DeepSeek's context MLA kernel)
    attention: dict[str, AttentionFit] = Field(default_factory=dict)
    # family -> axis -> [lo, hi] measured; predictions outside are flagged
    ranges: dict[str, dict[str, list[float]]] = Field(default_factory=dict)


class HardwareProfile(Frozen):
    name: str
    description: str = ""
    source: str  # where the figures come from
    gpu: GPUSpec
    node: NodeSpec
    scaleout: ScaleOut
    calibration: Calibration | None = None

    def peak_tflops(self, dtype: str) -> float:
        """Dense peak for ``dtype``; fp8 falls back to bf16 where the GPU has none."""
        peaks = self.gpu.peak_tflops
        for name in (dtype, "bf16", "fp16", "fp32"):
            if name in peaks:
                return peaks[name]
        return next(iter(peaks.values()))
