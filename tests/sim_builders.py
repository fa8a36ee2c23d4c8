"""Round-number simulator builders shared by the tests (fixtures in ``conftest.py``).

Every figure round, no latency, no efficiency loss, so simulated times can be
worked out on paper. Tests take them as the ``make_hardware`` / ``make_scenario``
fixtures; module-level helpers that build cases outside a test import
:func:`hardware` and :func:`scenario` from here.
"""

from __future__ import annotations

from typing import Any

from moesim.config import HardwareProfile, Scenario, apply_overrides, validate

#: every figure round, no latency, no efficiency loss: times can be worked out on paper
HW: dict[str, Any] = {
    "name": "test-hw",
    "source": "test",
    "gpu": {
        "name": "test gpu",
        "peak_tflops": {"fp32": 1.0, "bf16": 2.0, "fp8": 4.0},
        "hbm_GBps": 100.0,
        "hbm_GiB": 80.0,
        "gemm_efficiency": 1.0,
        "memory_efficiency": 1.0,
        "kernel_launch_us": 0.0,
    },
    "node": {
        "gpus_per_node": 2,
        "scaleup": {"link_GBps": 100.0, "latency_us": 0.0, "efficiency": 1.0},
    },
    "scaleout": {
        "nic_GBps": 10.0,
        "latency_us": 0.0,
        "efficiency": 1.0,
        "topology": "fat_tree",
        "oversubscription": 1.0,
    },
}

SCENARIO: dict[str, Any] = {
    "name": "test",
    "hardware": "test-hw",
    "cluster": {"nodes": 1, "gpus_per_node": 2},
    "model": {
        "hidden_size": 64,
        "moe_intermediate_size": 128,
        "num_experts": 4,
        "top_k": 1,
        "num_moe_layers": 1,
        "dtype": "fp32",
    },
    "router": {"kind": "softmax_topk"},
    "parallel": {"ep": 2},
    "dispatcher": "alltoall",
    "workload": {"mode": "prefill", "tokens_per_gpu": 8, "routing": {"distribution": "uniform"}},
}


def hardware(*overrides: str, gpus_per_node: int = 2) -> HardwareProfile:
    data = apply_overrides(HW, [f"node.gpus_per_node={gpus_per_node}", *overrides])
    return validate(HardwareProfile, data)


def scenario(*overrides: str, base: dict[str, Any] | None = None) -> Scenario:
    return validate(Scenario, apply_overrides(base or SCENARIO, overrides))


def with_collectives(hw: HardwareProfile, **fits: tuple[float, float]) -> HardwareProfile:
    """``hw`` with measured collectives, ``all_reduce__2=(latency us, GB/s)`` for the
    ``all_reduce.2`` fit (flat lines), as an imported NCCL table gives them."""
    from moesim.config.hardware import Calibration, CalibrationSource, CommFit, Curve

    cal = Calibration(
        source=CalibrationSource(results=[], device="by hand", created="2026-12-02"),
        collectives={
            k.replace("__", "."): CommFit(latency_us=lat, bandwidth_GBps=Curve(x=[1.0], y=[bw]))
            for k, (lat, bw) in fits.items()
        },
    )
    return hw.model_copy(update={"calibration": cal})
