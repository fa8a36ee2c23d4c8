"""Which phases of a scenario fall outside the range a calibrated profile was measured over.

:func:`out_of_range` returns one item per (phase, axis) beyond the measured
``[lo, hi]`` of the family that prices the phase, with the factor beyond the
edge; the simulate table marks those phases and ``details.out_of_range`` lists
them. Spec profiles and locally calibrated profiles without recorded ranges
give an empty list (nothing was measured, or nothing recorded).
"""

from __future__ import annotations

from typing import Any

from moesim.config.hardware import HardwareProfile
from moesim.config.scenario import Scenario
from moesim.costs import CostModel
from moesim.costs.model import deepep_bytes
from moesim.model import ops

#: dispatcher -> the DeepEP mode pricing it (others: the NCCL all-to-all)
DEEPEP_MODE = {"low_latency": "ll", "hierarchical": "normal"}


def out_of_range(scn: Scenario, hw: HardwareProfile) -> list[dict[str, Any]]:
    """``[{"phase", "family", "axis", "value", "lo", "hi", "factor"}]`` for ``scn`` on ``hw``."""
    if hw.calibration is None or not hw.calibration.ranges:
        return []
    cm = CostModel(hw)
    m, par = scn.model, scn.parallel
    T, D, E, K, ep = scn.workload.tokens_per_gpu, m.hidden_size, m.num_experts, m.top_k, par.ep
    out: list[dict[str, Any]] = []

    def add(phase: str, family: str, **values: float) -> None:
        out.extend({"phase": phase, **o} for o in cm.out_of_range(family, **values))

    add("gate", "gemm.bf16", m=T, n=E, k=D)
    table = f"gemm.{m.dtype}"
    if table in hw.calibration.ranges:  # the dense GEMMs priced by shape (simulate/dense.py)
        shapes = ops.attention_gemms(m.dense, D) if m.dense is not None else []
        for phase, gemms in (("dense", shapes), ("head", ops.lm_head_gemms(m))):
            for g in gemms:
                mq, nq, kq = ops.sharded(g, T, par.tp)
                add(phase, table, m=mq, n=nq, k=kq)
    call = ops.attention_call(m, T, par.tp, par.cp)
    mla = m.dense is not None and m.dense.kind == "mla"
    core_dt = "bf16" if m.dtype == "fp8" else m.dtype  # as simulate/dense.py prices it
    key = f"attention.{'mla.' if mla else ''}{core_dt}"
    if call is not None and scn.workload.mode != "decode" and key in hw.calibration.ranges:
        tokens, heads = call.batch * call.seq, call.heads
        add("dense", key, tokens=tokens, seq=call.seq, heads=heads, head_dim=call.d_qk)
    per_expert = T * ep * K / E
    own = f"experts.{m.expert_recipe or m.dtype}"
    fam = next((f for f in hw.calibration.ranges if f == own), None)
    if fam is None:
        fam = next((f for f in hw.calibration.ranges if f.startswith("experts.")), None)
    if fam is not None:
        add(
            "experts",
            fam,
            tokens_per_expert=per_expert,
            hidden=D,
            intermediate=m.moe_intermediate_size,
            local_experts=E / ep,
        )
    mode = DEEPEP_MODE.get(scn.dispatcher)
    for phase in ("dispatch", "combine"):
        if mode is not None:
            nbytes = float(deepep_bytes(phase, T, D, K, ep, E, mode))
            add(phase, f"deepep.{mode}.{phase}", tokens=T, hidden=D, gpus=ep, bytes=nbytes)
        else:
            nbytes = float(deepep_bytes(phase, T, D, K, ep)) * ep / max(ep - 1, 1)
            add(phase, "collective.alltoall", bytes=nbytes, gpus=ep)
    return out


def marks(items: list[dict[str, Any]]) -> dict[str, str]:
    """Phase -> ``"axis 3.2x above"`` notes, for the simulate table."""
    notes: dict[str, list[str]] = {}
    for o in items:
        side = "above" if o["value"] > o["hi"] else "below"
        notes.setdefault(o["phase"], []).append(f"{o['axis']} {o['factor']:.2g}x {side}")
    return {k: ", ".join(v) for k, v in notes.items()}
