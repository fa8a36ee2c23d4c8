"""The metrics a comparison shows, and flattening a simulate result into one row."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Unit = Literal["tokens_per_s", "seconds", "fraction", "ratio", "bytes", "tflops", "GiB"]


@dataclass(frozen=True)
class Metric:
    """A ``SimResult.to_dict()`` key, how to show it and which direction is better."""

    key: str
    title: str
    unit: Unit
    higher_is_better: bool


#: the comparison columns, in order (keys of ``SimResult.to_dict()``)
METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("throughput_tokens_per_s", "throughput", "tokens_per_s", True),
        Metric("step_time_s", "step time", "seconds", False),
        Metric("model_tflops_per_gpu", "model FLOPs", "tflops", True),
        Metric("mfu", "MFU", "fraction", True),
        Metric("alltoall_fraction", "all-to-all", "fraction", False),
        Metric("dispatch_time_s", "dispatch", "seconds", False),
        Metric("combine_time_s", "combine", "seconds", False),
        Metric("drop_fraction", "dropped", "fraction", False),
        Metric("load_imbalance", "expert imb.", "ratio", False),
        Metric("gpu_load_imbalance", "GPU imb.", "ratio", False),
        Metric("memory_peak_GiB", "peak mem.", "GiB", False),
    )
}
#: extra per-run numbers that may be plotted but are not table columns
EXTRA_METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("dispatch_bytes_per_gpu", "dispatch bytes/GPU", "bytes", False),
        Metric("memory_headroom_GiB", "HBM headroom", "GiB", True),
        Metric("oom", "P(some GPU exceeds HBM)", "fraction", False),
        # routed-expert weights one GPU holds (details.placement): what redundant copies cost
        Metric("expert_weight_bytes_per_gpu", "expert weights/GPU", "bytes", False),
    )
}
PHASE_PREFIX = "phase_"
#: ``result["dynamics"]["summary"][x]`` flattens to ``dyn_x``
DYNAMICS_PREFIX = "dyn_"
#: the comparison columns when the runs simulate many steps (``--steps`` / dynamics.steps)
DYNAMICS_METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("dyn_mean_step_time_s", "mean step", "seconds", False),
        Metric("dyn_extra_fraction_vs_balanced", "vs balanced", "fraction", False),
        Metric("dyn_mean_drop_fraction", "dropped", "fraction", False),
        Metric("dyn_mean_expert_imbalance", "expert imb.", "ratio", False),
        Metric("dyn_final_expert_imbalance", "last imb.", "ratio", False),
        Metric("dyn_mean_gpu_imbalance", "GPU imb.", "ratio", False),
        Metric("dyn_time_to_target_s", "to target", "seconds", False),
    )
}


def metric(key: str) -> Metric:
    """The :class:`Metric` for ``key``, including ``phase_<name>_s`` columns."""
    if key in METRICS:
        return METRICS[key]
    if key in EXTRA_METRICS:
        return EXTRA_METRICS[key]
    if key in DYNAMICS_METRICS:
        return DYNAMICS_METRICS[key]
    if key.startswith(PHASE_PREFIX) and key.endswith("_s"):
        name = key[len(PHASE_PREFIX) : -2]
        return Metric(key, f"{name} time", "seconds", False)
    return Metric(key, key, "ratio", False)


def plottable_metrics() -> list[str]:
    return [*METRICS, *EXTRA_METRICS, *DYNAMICS_METRICS]


def flatten(result: Mapping[str, Any]) -> dict[str, Any]:
    """The numeric scalars of a result, with ``phases_s[x]`` as ``phase_x_s``."""
    row: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            row[key] = float(value) if isinstance(value, float) else value
    for name, value in (result.get("phases_s") or {}).items():
        if isinstance(value, (int, float)):
            row[f"{PHASE_PREFIX}{name}_s"] = float(value)
    row.update(memory_columns(result))
    row.update(_placement_and_dynamics(result))
    return row


def memory_columns(result: Mapping[str, Any]) -> dict[str, float]:
    """``memory_peak_GiB``, ``memory_headroom_GiB`` and ``oom`` (1.0 when a GPU exceeds HBM;
    its mean over seeds is the probability that some GPU runs out of memory)."""
    mem = result.get("memory") or {}
    if "peak_GiB" not in mem:
        return {}
    return {
        "memory_peak_GiB": float(mem["peak_GiB"]),
        "memory_headroom_GiB": float(mem["headroom_GiB"]),
        "oom": 0.0 if result.get("fits", True) else 1.0,
    }


def _placement_and_dynamics(result: Mapping[str, Any]) -> dict[str, float]:
    """Expert weights per GPU (placement) and ``dyn_*`` summary columns (dynamics)."""
    row: dict[str, float] = {}
    placement = (result.get("details") or {}).get("placement") or {}
    if "expert_weight_bytes_per_gpu" in placement:
        row["expert_weight_bytes_per_gpu"] = float(placement["expert_weight_bytes_per_gpu"])
    summary = (result.get("dynamics") or {}).get("summary") or {}
    for name, value in summary.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[f"{DYNAMICS_PREFIX}{name}"] = float(value)
    return row


def table_metrics(results: list[Mapping[str, Any]]) -> list[str]:
    """Comparison columns: the dynamics ones when any run simulated many steps."""
    placed = any(
        ((r.get("details") or {}).get("placement") or {}).get("kind", "contiguous") != "contiguous"
        for r in results
    )
    extra = ["dispatch_bytes_per_gpu", "expert_weight_bytes_per_gpu"] if placed else []
    if any(r.get("dynamics") for r in results):
        return ["step_time_s", *DYNAMICS_METRICS, *extra]
    return [*METRICS, *extra]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
