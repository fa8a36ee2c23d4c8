"""``simulate()``: scenario + hardware profile -> :class:`SimResult`."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from moesim.config.hardware import HardwareProfile
from moesim.config.scenario import Scenario
from moesim.errors import ConfigError
from moesim.io import provenance
from moesim.phases import BACKWARD_PHASES, LAYER_PHASES
from moesim.simulate.budget import check_budget
from moesim.simulate.engine import THREADS, EngineResult, Recorder, run_engine
from moesim.simulate.plan import StepPlan, build_plan
from moesim.simulate.result import PHASES, SimResult
from moesim.simulate.topology import build_topology


def simulate(
    scenario: Scenario,
    hw: HardwareProfile,
    *,
    seed: int | None = None,
    trace: bool = False,
    trace_gpus: int = 16,
) -> SimResult:
    """Predict one step of ``scenario`` on ``hw`` (see :mod:`moesim.simulate`).

    ``seed`` None uses ``scenario.workload.seed``. ``trace`` records Chrome
    trace events of the first EP group's first ``trace_gpus`` GPUs.
    """
    seed = scenario.workload.seed if seed is None else int(seed)
    if seed < 0:
        raise ConfigError("must be >= 0 (seeds numpy's generator)", field="seed", value=seed)
    check_budget(scenario)  # refuse, with the estimate, what would not finish or fit
    topo = build_topology(scenario, hw)
    plan = build_plan(scenario, hw, topo, seed)
    rec = Recorder(trace_groups=1 if trace else 0, trace_gpus=trace_gpus)
    eng = run_engine(plan, rec)
    return _result(scenario, hw, seed, plan, eng, trace)


def _result(
    scn: Scenario, hw: HardwareProfile, seed: int, plan: StepPlan, eng: EngineResult, trace: bool
) -> SimResult:
    rec = eng.recorder
    stage = eng.stage_time_s * plan.bubble
    step = stage + plan.grad_allreduce_s
    tokens = scn.workload.tokens_per_gpu * plan.micro_batches * scn.parallel.ep * scn.parallel.dp
    phases = {p: _mean(rec, p) for p in PHASES}
    phases["grad_allreduce"] = plan.grad_allreduce_s
    st = plan.stats
    last = int(np.argmax(eng.group_finish_X))
    gpus = plan.topo.group_gpus(last)
    exposed = eng.group_finish_X[last] - float(eng.busy_G[gpus].max())
    util = eng.busy_G / max(eng.stage_time_s, 1e-300)
    return SimResult(
        scenario=scn.name,
        hardware=hw.name,
        seed=seed,
        step_time_s=step,
        throughput_tokens_per_s=tokens / step if step > 0 else 0.0,
        dispatch_time_s=phases["dispatch"],
        combine_time_s=phases["combine"],
        alltoall_fraction=max(0.0, exposed) * plan.bubble / step if step > 0 else 0.0,
        dispatch_bytes_per_gpu=float(np.mean(st.sent_rows_per_gpu)) * plan.dispatch_row_bytes,
        drop_fraction=1.0 - st.kept / st.routed if st.routed else 0.0,
        load_imbalance=float(np.mean(st.expert_imbalance)),
        gpu_load_imbalance=float(np.mean(st.gpu_imbalance)),
        phases_s=phases,
        backward_phases_s={p.removesuffix("_bwd"): _mean(rec, p) for p in BACKWARD_PHASES}
        if plan.training
        else {},
        layers=_layers(rec, plan),
        gpu_utilization=_utilization(util),
        details=_details(scn, plan, eng, stage, tokens),
        provenance=_provenance(),
        trace_events=_chrome(rec, plan) if trace else None,
        event_log=list(rec.log),
    )


def _mean(rec: Recorder, phase: str) -> float:
    n = rec.phase_n.get(phase, 0)
    return rec.phase_sum.get(phase, 0.0) / n if n else 0.0


def _layers(rec: Recorder, plan: StepPlan) -> list[dict[str, float]]:
    """Mean forward seconds per phase of every MoE layer (over micro-batches and groups)."""
    per = plan.micro_batches * plan.topo.num_groups
    rows = []
    for i in range(plan.layers):
        row: dict[str, float] = {"layer": float(i)}
        for name in LAYER_PHASES:
            arr = rec.layer_sum.get(name)
            row[name] = float(arr[i]) / per if arr is not None else 0.0
        row["expert_imbalance"] = plan.stats.layer_expert_imbalance_mean(i, plan.micro_batches)
        rows.append(row)
    return rows


def _utilization(util_G: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mean": float(util_G.mean()),
        "min": float(util_G.min()),
        "max": float(util_G.max()),
    }
    if len(util_G) <= 256:
        out["per_gpu"] = [float(u) for u in util_G]
    return out


def _details(
    scn: Scenario, plan: StepPlan, eng: EngineResult, stage: float, tokens: int
) -> dict[str, Any]:
    return {
        "mode": scn.workload.mode,
        "dispatcher": scn.dispatcher,
        "num_gpus": plan.topo.num_gpus,
        "ep_groups": plan.topo.num_groups,
        "moe_layers_per_stage": plan.layers,
        "micro_batches": plan.micro_batches,
        "tokens_per_step": tokens,
        "stage_time_s": stage,
        "pipeline_bubble": plan.bubble,
        "capacity_per_expert": plan.capacity,
        "dispatch_dtype": scn.dispatch_dtype,
        "combine_dtype": scn.combine_dtype,
        "alltoall_s_per_step": float(eng.comm_X[int(np.argmax(eng.group_finish_X))]),
        # part of every forward dispatch (mean over groups): the per-expert count exchange
        "split_exchange_s": float(plan.split_exchange_X.mean()),
        # part of the experts phase (mean over GPUs, layers and micro-batches, forward)
        "regroup_s": float(np.mean([w.regroup_s_G.mean() for ws in plan.work for w in ws])),
        "sim_events": eng.events,
        "compute_s": dict(plan.compute_s),
    }


def _provenance() -> dict[str, Any]:
    """moesim/commit/versions; the creation time is left out so output is reproducible."""
    return dict(_cached_provenance())


@functools.lru_cache(maxsize=1)
def _cached_provenance() -> dict[str, Any]:
    """Asked once per process: it runs git, which costs more than simulating 64 GPUs."""
    info = provenance()
    info.pop("created", None)
    return info


def _chrome(rec: Recorder, plan: StepPlan) -> list[dict[str, Any]]:
    """Metadata naming each GPU (process) and its streams (threads), then the spans."""
    meta: list[dict[str, Any]] = []
    for gpu in plan.topo.group_gpus(0)[: rec.trace_gpus]:
        pid = int(gpu)
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"GPU {pid}"}})
        for tid, name in THREADS.items():
            args = {"name": name}
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": args})
    return meta + rec.events
