"""Predicted vs measured peak memory of the real MoE layer on this CPU.

Each :class:`~moesim.measure.memory.MemCase` runs forward + backward under the
profiler (:func:`~moesim.measure.memory.measure_layer_peak`), and the same
layer is simulated: one "GPU", one fp32 MoE layer, training, the measured
routing as a trace (so the loads are the layer's), unfused SwiGLU (torch eager
keeps act(gate) for the product: ``4F`` per row). The prediction is the memory
model's parameters, gradients, MoE rows, expert intermediates, router
probabilities and backward working set, plus the layer's input and output
(``2 T D``), which a model would count as its neighbours' activations. There is
no optimizer in the measured step, so its state is left out.

Known bias: the model keeps every gradient buffer for the whole step (Megatron's
persistent grad buffer); eager autograd allocates each ``.grad`` when it is
computed, so at the measured peak some do not exist yet, and the prediction
is high by up to the size of the gradients still to come.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.config.loader import load_hardware
from moesim.config.scenario import Scenario
from moesim.measure.memory import MemCase, MemMeasurement, measure_layer_peak
from moesim.simulate import simulate
from moesim.simulate.memory import GiB
from moesim.validation.ep import measured_model

#: parts of the memory model the measured layer holds (no optimizer, no reserve)
LAYER_PARTS = ("params", "grads", "moe_tokens", "moe_expert_act", "transient", "dispatcher")
TOLERANCE = 0.15


def default_cases() -> list[MemCase]:
    """Activation- and weight-heavy shapes, a skewed router and a capacity-limited one."""
    base = MemCase(tokens=2048, hidden=256, ffn=512, num_experts=8, top_k=2)
    return [
        base,
        MemCase(tokens=4096, hidden=256, ffn=512, num_experts=8, top_k=2),
        MemCase(tokens=2048, hidden=256, ffn=512, num_experts=16, top_k=4),
        MemCase(tokens=1024, hidden=512, ffn=1024, num_experts=8, top_k=2),
        MemCase(tokens=2048, hidden=256, ffn=512, num_experts=8, top_k=2, skew=2.0),
        MemCase(
            tokens=2048, hidden=256, ffn=512, num_experts=8, top_k=2, capacity_factor=1.0, skew=2.0
        ),
    ]


def tiny_cases() -> list[MemCase]:
    """Two small shapes for tests and smoke runs (well under a second each)."""
    return [
        MemCase(tokens=512, hidden=64, ffn=128, num_experts=4, top_k=2),
        MemCase(
            tokens=512, hidden=64, ffn=128, num_experts=4, top_k=2, capacity_factor=1.0, skew=2.0
        ),
    ]


def layer_scenario(case: MemCase, trace: Path) -> Scenario:
    """The measured layer as a scenario: one GPU, one MoE layer, fp32, the routing as a trace."""
    return Scenario.model_validate(
        {
            "name": f"memory-{case.label()}",
            "hardware": "cpu-local",
            "cluster": {"nodes": 1, "gpus_per_node": 1},
            "model": measured_model(case.hidden, case.ffn, case.num_experts, case.top_k),
            "router": {"kind": "softmax_topk", "capacity_factor": case.capacity_factor},
            "parallel": {"ep": 1},
            "workload": {
                "mode": "training",
                "tokens_per_gpu": case.tokens,
                "routing": {"distribution": "trace", "trace": str(trace)},
            },
            "memory": {"fused_activation": False, "param_dtype": "fp32", "grad_dtype": "fp32"},
        }
    )


def predict_layer_peak(case: MemCase, expert_ids_TK: np.ndarray) -> dict[str, float]:
    """Predicted bytes by part (and ``total``) of the measured layer, from the memory model."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "ids.npy"
        np.save(trace, expert_ids_TK.astype(np.int64))
        scn = layer_scenario(case, trace)
        res = simulate(scn, load_hardware(scn.hardware))
    parts = {p: res.memory["parts_GiB"][p] * GiB for p in LAYER_PARTS}
    parts["layer_input_output"] = 2.0 * case.tokens * case.hidden * 4
    parts["total"] = sum(parts.values())
    parts["kept_rows_predicted"] = res.memory["recv_rows_peak"]
    return parts


@dataclass(frozen=True)
class MemoryValidation:
    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        errs = [abs(r["error"]) for r in self.rows]
        return {
            "cases": self.rows,
            "median_abs_error": float(np.median(errs)),
            "max_abs_error": float(max(errs)),
            "tolerance": TOLERANCE,
            "method": "torch.profiler profile_memory=True: running sum of allocator events",
        }


def validate_memory(
    cases: list[MemCase], progress: Any = None, device: str = "cpu"
) -> MemoryValidation:
    """Measure (on ``device``) and predict every case; ``error`` = predicted / measured - 1."""
    rows = []
    for case in cases:
        meas: MemMeasurement = measure_layer_peak(case, device)
        pred = predict_layer_peak(case, meas.expert_ids_TK)
        rows.append(
            {
                "label": case.label(),
                "measured_bytes": meas.peak_bytes,
                "predicted_bytes": pred["total"],
                "error": pred["total"] / meas.peak_bytes - 1.0,
                "kept_rows": meas.kept_rows,
                "predicted_rows": pred["kept_rows_predicted"],
                "parts_bytes": {
                    k: v for k, v in pred.items() if k not in ("total", "kept_rows_predicted")
                },
                **meas.to_dict(),
            }
        )
        if progress is not None:
            progress()
    return MemoryValidation(rows)
