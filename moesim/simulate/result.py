"""SimResult: what one simulation predicts, JSON-ready (ARCHITECTURE.md headline keys)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moesim.phases import STEP_PHASES

#: phases reported in ``phases_s`` (mean critical-path seconds per MoE layer forward)
PHASES = STEP_PHASES


@dataclass
class SimResult:
    """Predictions for one scenario on one hardware profile with one seed.

    ``phases_s``: mean seconds per MoE layer forward on the critical path (the
    slowest GPU of the group for compute, the whole collective for all-to-all),
    averaged over layers, micro-batches and EP groups; ``grad_sync`` is the
    summed durations of one group's gradient reduce-scatters and parameter
    all-gathers in the step (overlapped or not, concurrent ones each counted; 0
    for inference); what of it the step waits for is ``exposed_dp``.
    ``optimizer``: the optimizer step after it; ``head``: per micro-batch
    (embedding, LM head, loss). ``model_tflops_per_gpu``: model FLOPs
    (:data:`moesim.model.FORMULA`) per second per GPU; ``mfu``: that over the
    dtype's dense peak (Megatron / MaxText).
    ``step_breakdown_s``: where the step goes, on the critical GPU (most compute)
    and as the mean over GPUs: ``compute`` + ``exposed_{ep,tp,cp,dp,pp}`` + ``bubble``
    (+ ``optimizer``) = ``step_time_s``. ``bubble_fraction``: mean bubble / step.
    ``bytes_per_gpu``: bytes one GPU sends in the step on ``scaleup`` and
    ``network``, and ``by_kind``. ``alltoall_fraction``: exposed EP all-to-all
    on the critical GPU / step.
    ``layers``: the same per layer. ``dynamics``: with
    ``workload.routing.dynamics.steps > 0``, a per-step ``series`` and its
    ``summary`` (:func:`moesim.simulate.dynamics.run_dynamics`).
    ``trace_events``: Chrome trace events when simulated with ``trace=True``
    (not part of :meth:`to_dict`).
    """

    scenario: str
    hardware: str
    seed: int
    step_time_s: float
    throughput_tokens_per_s: float
    dispatch_time_s: float
    combine_time_s: float
    alltoall_fraction: float
    dispatch_bytes_per_gpu: float
    drop_fraction: float
    load_imbalance: float
    gpu_load_imbalance: float
    model_tflops_per_gpu: float
    mfu: float
    phases_s: dict[str, float]
    backward_phases_s: dict[str, float]
    layers: list[dict[str, float]]
    gpu_utilization: dict[str, Any]
    details: dict[str, Any]
    provenance: dict[str, Any]
    memory: dict[str, Any] = field(default_factory=dict)  # per-GPU peak, see simulate.memory
    fits: bool = True  # the peak GPU's memory <= its HBM
    step_breakdown_s: dict[str, dict[str, float]] = field(default_factory=dict)
    bubble_fraction: float = 0.0
    bytes_per_gpu: dict[str, Any] = field(default_factory=dict)
    traffic: dict[str, Any] | None = field(default=None, repr=False)
    dynamics: dict[str, Any] | None = None  # {"summary", "series"} over steps (--steps N)
    trace_events: list[dict[str, Any]] | None = field(default=None, repr=False)
    event_log: list[tuple[str, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; same scenario and seed give identical output on one commit."""
        keys = [
            "scenario", "hardware", "seed", "step_time_s", "throughput_tokens_per_s",
            "dispatch_time_s", "combine_time_s", "alltoall_fraction", "dispatch_bytes_per_gpu",
            "drop_fraction", "load_imbalance", "gpu_load_imbalance", "model_tflops_per_gpu",
            "mfu", "phases_s",
            "backward_phases_s", "layers", "gpu_utilization", "details", "provenance",
            "step_breakdown_s", "bubble_fraction", "bytes_per_gpu", "memory", "fits",
        ]  # fmt: skip
        out = {k: getattr(self, k) for k in keys}
        if self.traffic is not None:
            out["traffic"] = self.traffic
        if self.dynamics is not None:
            out["dynamics"] = self.dynamics
        return out
