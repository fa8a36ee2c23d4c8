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
    averaged over layers, micro-batches and EP groups; ``grad_allreduce`` is
    the step's whole gradient all-reduce (0 for inference).
    ``layers``: the same per layer. ``trace_events``: Chrome trace events when
    simulated with ``trace=True`` (not part of :meth:`to_dict`).
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
    phases_s: dict[str, float]
    backward_phases_s: dict[str, float]
    layers: list[dict[str, float]]
    gpu_utilization: dict[str, Any]
    details: dict[str, Any]
    provenance: dict[str, Any]
    trace_events: list[dict[str, Any]] | None = field(default=None, repr=False)
    event_log: list[tuple[str, float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; same scenario and seed give identical output on one commit."""
        keys = [
            "scenario", "hardware", "seed", "step_time_s", "throughput_tokens_per_s",
            "dispatch_time_s", "combine_time_s", "alltoall_fraction", "dispatch_bytes_per_gpu",
            "drop_fraction", "load_imbalance", "gpu_load_imbalance", "phases_s",
            "backward_phases_s", "layers", "gpu_utilization", "details", "provenance",
        ]  # fmt: skip
        return {k: getattr(self, k) for k in keys}
