"""``simulate()``: scenario + hardware profile -> :class:`SimResult`."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from moesim.config.hardware import HardwareProfile
from moesim.config.scenario import Scenario
from moesim.costs.model import CostModel
from moesim.errors import ConfigError
from moesim.io import provenance
from moesim.model import FORMULA, model_flops_per_token
from moesim.phases import LAYER_PHASES
from moesim.simulate.budget import check_budget
from moesim.simulate.dense import optimizer_s
from moesim.simulate.engine import THREADS, EngineResult, Recorder, run_engine
from moesim.simulate.gradsync import GradSync
from moesim.simulate.memory import MemoryReport, memory_report
from moesim.simulate.plan import StepPlan, build_plan
from moesim.simulate.program import BWD, KINDS, Program
from moesim.simulate.program import PHASES as PHASES_INFO
from moesim.simulate.ranges import out_of_range
from moesim.simulate.result import PHASES, SimResult
from moesim.simulate.schedules import Layout, Pipeline, layout_for, moe_layers_per_rank
from moesim.simulate.topology import build_topology

#: gradient and parameter collectives summed into ``phases_s["grad_sync"]``
SYNC_PHASES = tuple(n for n, (g, _) in PHASES_INFO.items() if g in ("dp", "edp"))


def simulate(
    scenario: Scenario,
    hw: HardwareProfile,
    *,
    seed: int | None = None,
    trace: bool = False,
    trace_gpus: int = 16,
    traffic: bool = False,
) -> SimResult:
    """Predict one step of ``scenario`` on ``hw`` (see :mod:`moesim.simulate`).

    ``seed`` None uses ``scenario.workload.seed``. ``trace`` records Chrome
    trace events of replica 0 of every pipeline rank (the first ``trace_gpus``
    GPUs of each such EP group). ``traffic`` fills :attr:`SimResult.traffic`
    (see :func:`traffic_of`).
    """
    seed = scenario.workload.seed if seed is None else int(seed)
    if seed < 0:
        raise ConfigError("must be >= 0 (seeds numpy's generator)", field="seed", value=seed)
    # one BLAS thread: the plan's products are small, and threads that spin beside the
    # engine cost more than they save (2048 GPUs here: 13.4 CPU s with 2, 8.6 with 1)
    with threadpool_limits(limits=1, user_api="blas"):
        return _simulate(scenario, hw, seed, trace, trace_gpus, traffic)


def _simulate(
    scenario: Scenario, hw: HardwareProfile, seed: int, trace: bool, trace_gpus: int, traffic: bool
) -> SimResult:
    check_budget(scenario)  # refuse, with the estimate, what would not finish or fit
    plan, pipe, layout = _plan(scenario, hw, seed)
    topo = plan.topo
    prog = Program(plan, pipe, layout)
    grad = GradSync(scenario, plan, pipe, prog) if plan.training else None
    prog.grad = grad
    # the trace shows replica 0 of every pipeline rank
    traced = frozenset(range(0, topo.num_groups, plan.groups_per_stage)) if trace else frozenset()
    rec = Recorder(traced=traced, trace_gpus=trace_gpus)
    if plan.ahead is not None:
        plan.ahead.start()
    try:
        eng = run_engine(plan, prog, grad, rec)
    finally:
        plan.close()
    res = _result(scenario, hw, seed, plan, pipe, eng, trace)
    if traffic:
        res.traffic = traffic_of(plan, eng)
    if scenario.workload.routing.dynamics.steps > 0:
        from moesim.simulate.dynamics import run_dynamics

        res.dynamics = run_dynamics(scenario, hw, topo, plan, res.step_time_s, seed)
    return res


def _plan(scn: Scenario, hw: HardwareProfile, seed: int) -> tuple[StepPlan, Pipeline, Layout]:
    """The step plan, the pipeline and its layer layout (what the engine and memory read)."""
    topo = build_topology(scn, hw)
    pipe, layout = layout_for(scn)
    return build_plan(scn, hw, topo, seed, moe_layers_per_rank(pipe, layout)), pipe, layout


def memory_estimate(scenario: Scenario, hw: HardwareProfile) -> MemoryReport:
    """The per-GPU memory of ``scenario`` without running the engine.

    Memory reads the MoE rows of the (layer, micro-batch) pairs the engine priced;
    here micro-batch 0 of every layer is priced and stands for the others (each
    unpriced pair takes its layer's mean, :func:`~moesim.simulate.memory.priced_rows`).
    Used to rule out layouts that cannot fit before simulating them.
    """
    plan, _, _ = _plan(scenario, hw, scenario.workload.seed)
    for layer in range(plan.work.layers):
        plan.work.get(layer, 0)
    return memory_report(scenario, hw, plan)


def traffic_of(plan: StepPlan, eng: EngineResult) -> dict[str, Any]:
    """Where the bytes go: one dispatch's GPU x GPU matrix and each link's utilisation.

    ``dispatch_bytes``: bytes EP group 0's rank ``s`` sends rank ``d`` in the first
    MoE layer's forward dispatch of micro-batch 0 (rows per (token, expert) copy x
    row bytes; the diagonal stays in memory). ``link_utilization``: per EP group
    and link kind (``LINK_KINDS``), bytes the link carried over the step / (its
    capacity x step time); uplinks of a rail-optimised fabric have no limit (0).
    """
    from moesim.simulate.plan import _per_rank_XPP
    from moesim.simulate.topology import LINK_KINDS

    topo = plan.topo
    rows = _per_rank_XPP(plan.scn, topo, plan.loads.load(0, 0))[0]
    P, Nd = topo.ep, topo.nodes_per_group
    cap = np.where(np.isfinite(topo.cap_L), topo.cap_L, np.inf)
    util = eng.link_bytes_XL / (cap * max(eng.step_time_s, 1e-300))
    sizes = [P, P, P, P, Nd, Nd]
    edges = np.cumsum([0, *sizes])
    by_kind = {
        k: util[:, a:b].tolist() for k, a, b in zip(LINK_KINDS, edges[:-1], edges[1:], strict=True)
    }
    return {
        "dispatch_bytes": (rows * plan.dispatch_row_bytes).tolist(),
        "dispatch_gpus": topo.group_gpus(0).tolist(),
        "link_utilization": by_kind,
        "link_utilization_max": {
            k: float(np.max(v)) if len(v[0]) else 0.0 for k, v in by_kind.items()
        },
    }


def breakdown(eng: EngineResult, gpu: int | None) -> dict[str, float]:
    """Where the step goes on ``gpu`` (None: mean over GPUs): compute, exposed comm, bubble."""
    pick = (lambda a: float(a.mean())) if gpu is None else (lambda a: float(a[gpu]))
    out = {"compute": pick(eng.busy_G)}
    out.update({f"exposed_{k}": pick(eng.exposed_KG[k]) for k in KINDS})
    out["bubble"] = pick(eng.exposed_KG["bubble"])
    return out


def _result(
    scn: Scenario,
    hw: HardwareProfile,
    seed: int,
    plan: StepPlan,
    pipe: Pipeline,
    eng: EngineResult,
    trace: bool,
) -> SimResult:
    rec = eng.recorder
    optimizer = optimizer_s(scn, CostModel(hw)) if plan.training else 0.0
    step = eng.step_time_s + optimizer
    tokens = tokens_per_step(scn)
    phases = {p: _mean(rec, p) for p in PHASES if p not in ("grad_sync", "optimizer", "head")}
    phases["grad_sync"] = _sync_per_group(rec, plan)
    phases["head"] = _mean(rec, "head")
    phases["optimizer"] = optimizer
    per_gpu = tokens / step / scn.cluster.num_gpus if step > 0 else 0.0
    tflops = per_gpu * model_flops_per_token(scn) / 1e12
    st = plan.stats
    crit = int(np.argmax(eng.busy_G))
    crit_parts = breakdown(eng, crit) | {"optimizer": optimizer}
    util = eng.busy_G / max(step, 1e-300)
    mem = memory_report(scn, hw, plan)
    return SimResult(
        scenario=scn.name,
        hardware=hw.name,
        seed=seed,
        step_time_s=step,
        throughput_tokens_per_s=tokens / step if step > 0 else 0.0,
        dispatch_time_s=phases["dispatch"],
        combine_time_s=phases["combine"],
        alltoall_fraction=crit_parts["exposed_ep"] / step if step > 0 else 0.0,
        dispatch_bytes_per_gpu=float(np.mean(st.sent_rows_per_gpu)) * plan.dispatch_row_bytes,
        drop_fraction=1.0 - st.kept / st.routed if st.routed else 0.0,
        load_imbalance=float(np.mean(st.expert_imbalance)),
        gpu_load_imbalance=float(np.mean(st.gpu_imbalance)),
        model_tflops_per_gpu=tflops,
        mfu=tflops / hw.peak_tflops(scn.model.dtype),
        phases_s=phases,
        backward_phases_s=(
            {p: _mean(rec, p + BWD) for p in (*LAYER_PHASES, "head")} if plan.training else {}
        ),
        layers=_layers(rec, plan),
        gpu_utilization=_utilization(util),
        details=_details(scn, plan, pipe, eng, tokens) | {"out_of_range": out_of_range(scn, hw)},
        step_breakdown_s={
            "critical_gpu": crit_parts,
            "mean": breakdown(eng, None) | {"optimizer": optimizer},
        },
        bubble_fraction=float(eng.exposed_KG["bubble"].mean()) / step if step > 0 else 0.0,
        bytes_per_gpu=_bytes(eng),
        provenance=_provenance(),
        memory=mem.to_dict(scn),
        fits=mem.fits,
        trace_events=_chrome(rec, plan) if trace else None,
        event_log=list(rec.log),
    )


def tokens_per_step(scn: Scenario) -> int:
    """Tokens one step trains on (or one forward serves).

    Every GPU holds ``tokens_per_gpu`` per micro-batch (its sequence-parallel
    shard); the ``pp`` stages of a pipeline hold the same tokens, so
    ``tokens_per_gpu * micro_batches * GPUs / pp``. A TP (or CP) group thus
    holds ``tp * cp`` shards of one batch, and each TP rank routes its own
    shard through the MoE layers (Megatron-Core with sequence parallelism).
    """
    w = scn.workload
    return w.tokens_per_gpu * w.micro_batches * scn.cluster.num_gpus // scn.parallel.pp


def _sync_per_group(rec: Recorder, plan: StepPlan) -> float:
    """Seconds of one group's gradient and parameter collectives in the step (not exposure)."""
    return sum(rec.phase_sum.get(p, 0.0) for p in SYNC_PHASES) / plan.topo.num_groups


def _bytes(eng: EngineResult) -> dict[str, Any]:
    """Mean bytes one GPU sends in the step, by tier and by kind."""
    tiers = ("scaleup", "network")
    total = sum(eng.sent_KT.values(), np.zeros(2))
    out: dict[str, Any] = {t: float(v) for t, v in zip(tiers, total, strict=True)}
    out["by_kind"] = {
        k: {t: float(v) for t, v in zip(tiers, eng.sent_KT[k], strict=True)} for k in KINDS
    }
    return out


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
            row[name] = rec.by_layer.get((name, i), 0.0) / per
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
    scn: Scenario, plan: StepPlan, pipe: Pipeline, eng: EngineResult, tokens: int
) -> dict[str, Any]:
    crit = int(np.argmax(eng.busy_G))
    return {
        "mode": scn.workload.mode,
        "dispatcher": scn.dispatcher,
        "num_gpus": plan.topo.num_gpus,
        "ep_groups": plan.topo.num_groups,
        "moe_layers_per_stage": plan.layers,
        "micro_batches": plan.micro_batches,
        "tokens_per_step": tokens,
        "pp_schedule": pipe.name,
        "pp": pipe.ranks,
        "virtual_stages": pipe.stages,
        "critical_gpu": crit,
        "comm_sm_slowdown_s": float(eng.sm_extra_G.mean()),
        "capacity_per_expert": plan.capacity,
        "dispatch_dtype": scn.dispatch_dtype,
        "combine_dtype": scn.combine_dtype,
        "alltoall_s_per_step": float(eng.comm_XK["ep"][crit // plan.topo.ep]),
        # part of every forward dispatch (mean over groups): the per-expert count exchange
        "split_exchange_s": float(plan.split_exchange_X.mean()),
        # part of the experts phase (mean over GPUs, layers and micro-batches, forward)
        "regroup_s": float(np.mean([w.regroup_s_G.mean() for w in plan.work.computed()])),
        "placement": dict(plan.placement),
        "sim_events": eng.events,
        "compute_s": dict(plan.compute_s),
        "model_flops_per_token": model_flops_per_token(scn),
        "flop_formula": FORMULA,
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
    gpus = [g for x in sorted(rec.traced) for g in plan.topo.group_gpus(x)[: rec.trace_gpus]]
    for gpu in gpus:
        pid = int(gpu)
        meta.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"GPU {pid}"}})
        for tid, name in THREADS.items():
            args = {"name": name}
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": args})
    return meta + rec.events
