"""Predicted vs measured: the real EP layer on this machine against the simulator.

For each :class:`~moesim.measure.ep_layer.EPCase` the layer runs on N local ranks
and the same configuration is simulated as a scenario of one node with N
"GPUs" (EP = N, the case's hidden / FFN / E / k / tokens per GPU, fp32, one MoE
layer, forward only). The routing the simulator sees is the routing the layer
measured (its expert ids, written as a trace), so the comparison tests the cost
model and the engine, not the load model. The hardware is a calibrated profile
of this machine: one given by the user, or one fitted here from a bench of the
kernels the layer runs (and of ``all_to_all_single`` at world N).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moesim.config.hardware import Curve, GemmFit, HardwareProfile, MemoryOpFit
from moesim.config.scenario import Scenario
from moesim.errors import UserError
from moesim.measure.ep_layer import PHASES, EPCase, EPMeasurement, run_ep_cases
from moesim.measure.ep_probe import CoRun

SPLITS = ["even", "uneven"]


# -- which configurations ------------------------------------------------------------


def default_cases(seed: int = 0) -> list[EPCase]:
    """A spread of E, k, tokens per rank, skew and capacity factor (hidden 256, FFN 512)."""
    base = EPCase(num_experts=8, top_k=2, tokens=1024, hidden=256, ffn=512, seed=seed)
    return [
        base,
        replace(base, tokens=512),
        replace(base, tokens=2048),
        replace(base, top_k=1),
        replace(base, num_experts=16, top_k=4),
        replace(base, skew=1.0),
        replace(base, num_experts=16, skew=1.2, capacity_factor=1.25),
        replace(base, skew=0.5, capacity_factor=1.0),
    ]


def tiny_cases(seed: int = 0) -> list[EPCase]:
    """Two small cases for tests and smoke runs (a second each on 2 ranks)."""
    base = EPCase(num_experts=4, top_k=2, tokens=128, hidden=64, ffn=128, seed=seed)
    return [base, replace(base, skew=1.0, capacity_factor=1.0)]


def check_world(world: int, cases: list[EPCase]) -> None:
    """Raise :class:`UserError` unless ``world`` >= 1 divides every case's experts."""
    bad = sorted({c.num_experts for c in cases if world < 1 or c.num_experts % world})
    if world < 1 or bad:
        raise UserError(
            f"--ep-world = {world}: must be >= 1 and divide the experts of every case "
            f"(E = {', '.join(map(str, bad)) or 'any'})"
        )


# -- calibration on this machine -------------------------------------------------------


def bench_grids(cases: list[EPCase], world: int) -> dict[str, dict[str, list[Any]]]:
    """Bench grids around the shapes the EP layer runs, with the layer's strategies only.

    The calibration then describes exactly the kernels the layer calls: the
    router and permute / unpermute on T tokens per rank (T/2 .. 2T), the expert
    GEMMs as one rank runs them (about T*k rows over E/world local experts) and
    all-to-all messages from an eighth of the smallest dispatch to past the largest,
    plus the split-size exchange's ``E`` int64 counts per rank, so that the fitted
    all-to-all latency is measured where the exchange runs, not extrapolated.
    """
    Ts = sorted({t for c in cases for t in (c.tokens // 2, c.tokens, 2 * c.tokens)})
    Ds = sorted({c.hidden for c in cases})
    Es = sorted({c.num_experts for c in cases})
    Ks = sorted({c.top_k for c in cases})
    msgs = [c.tokens * c.top_k * c.hidden * 4 for c in cases]
    lo, hi = int(np.log2(max(min(msgs) // 8, 1024))), int(np.ceil(np.log2(max(msgs) * 2)))
    return {
        "gating": {"T": Ts, "D": Ds, "E": Es, "K": Ks, "routers": ["softmax_topk"]},
        "dispatch": {
            "T": Ts, "D": Ds, "E": Es, "K": Ks, "skew": [0.0, 1.0],
            "strategies": [*sorted({c.dispatch for c in cases}), "sort_chunks"],
        },
        "experts": {
            "T": Ts, "D": Ds, "F": sorted({c.ffn for c in cases}),
            "E": sorted({max(1, c.num_experts // world) for c in cases}), "K": Ks,
            "skew": [0.0, 1.2], "strategies": sorted({c.experts for c in cases}),
        },
        "roofline": {"copy_MiB": [4, 16], "gemm": [256, 512]},
        "alltoall": {
            "msg_bytes": sorted({c.num_experts * 8 for c in cases})
            + [2**p for p in range(lo, hi + 2, 2)],
            "split": SPLITS,
        },
    }  # fmt: skip


def calibrate_here(
    cases: list[EPCase],
    world: int,
    *,
    out_dir: Path,
    progress: Any = None,
    extra_grids: dict[str, dict[str, list[Any]]] | None = None,
) -> tuple[HardwareProfile, Path]:
    """Bench the layer's kernels on this device (all-to-all at ``world`` ranks), calibrate.

    ``extra_grids``: more axes per suite (the pipeline's LM-head cross-entropy).

    CPU ranks (gloo) when no GPU is present, else CUDA (NCCL, one GPU per rank).
    On CPU the kernel suites run in a launched rank process pinned to a core, as the
    layer's ranks are: measured here, a flushed gate takes 0.53 ms in this process and
    0.63 ms in a rank. Writes ``<out_dir>/<device>-ep<world>-calibrated.yaml`` next to
    the bench results (one results file for the kernels, one for the all-to-all).
    """
    import torch

    from moesim.calibrate.workflow import calibrate_to
    from moesim.measure.bench import run_bench
    from moesim.measure.distributed import launch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels = ["roofline", "gating", "dispatch", "experts"]
    grids = bench_grids(cases, world)
    for suite, axes in (extra_grids or {}).items():
        grids[suite] = {**grids.get(suite, {}), **axes}
    kw: dict[str, Any] = {"device": device, "out_dir": out_dir, "grids": grids,
                          "world": max(world, 2)}  # fmt: skip
    if device == "cpu":
        # in a rank process, as the layer's kernels run (launched, pinned to a core):
        # the same kernels time 10-20 % faster in this main process here (no progress bar)
        paths = [launch(bench_kernels_in_rank, 1, args=(kernels, kw), timeout_s=1800)[0]]
    else:
        paths = [bench_kernels(kernels, kw, progress)]
    if world > 1:  # the all-to-all suite launches its own ranks (gloo cores kept awake)
        paths.append(run_bench(["alltoall"], quick=True, threads=1, progress=progress, **kw))
    path = out_dir / f"{device}-ep{world}-calibrated.yaml"
    report = calibrate_to(paths, path, name=f"{device}-ep{world}")
    return report.profile, path


def bench_kernels(suites: list[str], kw: dict[str, Any], progress: Any = None) -> Path:
    """The layer's kernel suites, each kernel timed as the layer runs it: on data the
    other phases evicted from the caches (a hot loop under-prices gate / unpermute by
    ~40 %), on reused memory (as the layer's ranks allocate)."""
    from moesim.measure.bench import run_bench
    from moesim.measure.ep_probe import keep_freed_memory
    from moesim.measure.timer import cpu_flush_by_default

    keep_freed_memory()
    with cpu_flush_by_default():
        return run_bench(suites, quick=True, threads=1, progress=progress, **kw)


def bench_kernels_in_rank(suites: list[str], kw: dict[str, Any]) -> Path:
    """:func:`bench_kernels` as the body of a launched rank, pinned as rank 0 is."""
    import torch.distributed as dist

    from moesim.measure.ep_probe import pin_rank

    pin_rank(dist.get_rank())
    return bench_kernels(suites, kw)


# -- simulating a measured case ---------------------------------------------------------


def measured_model(
    hidden: int, ffn: int, experts: int, top_k: int, layers: int = 1
) -> dict[str, Any]:
    """The ``model`` section of a layer measured here: fp32 MoE layers of these shapes.

    One definition for every validation that predicts a real CPU run (EP layer,
    memory, pipeline).
    """
    return {
        "hidden_size": hidden,
        "moe_intermediate_size": ffn,
        "num_experts": experts,
        "top_k": top_k,
        "num_moe_layers": layers,
        "dtype": "fp32",
    }


def scenario_for(case: EPCase, world: int, trace: Path, slowdown: float = 1.0) -> Scenario:
    """The measured configuration as a one-node scenario with ``world`` GPUs.

    ``slowdown`` (>= 1, see :func:`compute_slowdown`): local ranks share the
    machine's cores, caches and memory bandwidth, so they compute slower than the
    single-process benchmark the profile was calibrated from. It is modelled as
    the same compute slowdown on every simulated GPU.
    """
    stragglers = [{"gpu": g, "compute_slowdown": slowdown} for g in range(world)]
    return Scenario.model_validate(
        {
            "name": f"ep-layer {case.label()} x{world}",
            "hardware": "calibrated",
            "cluster": {"nodes": 1, "gpus_per_node": world},
            "model": measured_model(case.hidden, case.ffn, case.num_experts, case.top_k),
            "router": case.router_spec().model_dump(exclude={"top_k"}),
            "parallel": {"ep": world},
            "dispatcher": "alltoall",
            "workload": {
                "mode": "prefill",
                "tokens_per_gpu": case.tokens,
                "routing": {"distribution": "trace", "trace": str(trace)},
                "stragglers": stragglers if slowdown > 1.0 else [],
                "seed": case.seed,
            },
        }
    )


def fit_nodes(hw: HardwareProfile, world: int) -> HardwareProfile:
    """``hw`` with at least ``world`` GPUs per node (local ranks all share one host)."""
    if hw.node.gpus_per_node >= world:
        return hw
    node = hw.node.model_copy(update={"gpus_per_node": world})
    return hw.model_copy(update={"node": node})


def write_trace(m: EPMeasurement, path: Path) -> Path:
    """The measured expert ids ``[ranks * tokens, k]`` (rank r's tokens at rows r*T..)."""
    ids = m.expert_ids_RTK.reshape(-1, m.case.top_k).numpy().astype(np.int64)
    np.save(path, ids)
    return path


def compute_slowdown(m: EPMeasurement, cores: int, interference: float) -> float:
    """How much slower the critical rank computes on this host than alone on a core.

    ``interference`` is the measured co-run penalty (caches, memory bandwidth,
    clock; :func:`moesim.measure.ep_probe.co_run_factor`). With more ranks than
    cores, ranks share cores, and each is pinned (rank r on core ``r % cores``,
    :func:`moesim.measure.ep_probe.pin_rank`), so a rank shares only with the
    ranks on its own core: fairly shared, rank r (W_r rows received) finishes
    after ``W_r + sum over its core-mates m of min(W_r, W_m)`` row-times. The
    slowest of those over the busiest rank's own ``W_max`` is the stretch (a
    skewed load whose busiest rank shares a core with an idle one is barely
    slowed; one sharing with a busy one is). Rows come from the measured routing
    (the same the simulator is given), not from measured times.
    """
    rows = [max(r, 0) for r in m.recv_rows_R]
    n = max(cores, 1)
    finish = [
        w + sum(min(w, v) for j, v in enumerate(rows) if j != r and j % n == r % n)
        for r, w in enumerate(rows)
    ]
    return interference * max(1.0, max(finish) / max(max(rows), 1))


def co_run_profile(hw: HardwareProfile, *, compute: float, memory: float) -> HardwareProfile:
    """``hw`` priced for ranks running together: each phase by its own co-run factor.

    Memory-bound ops (gating, permute, unpermute, regroup, copy) take ``memory``
    times as long (latency x, bandwidth /), the expert GEMMs ``compute`` times;
    the all-to-all fits are measured with the ranks running together already.
    Factors come from :func:`moesim.measure.ep_probe.co_run_factor`.
    """
    cal = hw.calibration
    if cal is None or (compute == 1.0 and memory == 1.0):
        return hw
    memory_fits = {k: _slower_memory(f, memory) for k, f in cal.memory.items()}
    gemm = {k: _slower_gemm(f, compute) for k, f in cal.gemm.items()}
    return hw.model_copy(
        update={"calibration": cal.model_copy(update={"memory": memory_fits, "gemm": gemm})}
    )


def _slower_curve(curve: Curve, f: float) -> Curve:
    return Curve(x=list(curve.x), y=[y / f for y in curve.y])


def _slower_memory(fit: MemoryOpFit, f: float) -> MemoryOpFit:
    return MemoryOpFit(
        latency_us=fit.latency_us * f,
        bandwidth_GBps=_slower_curve(fit.bandwidth_GBps, f),
        tflops=None if fit.tflops is None else fit.tflops / f,
    )


def _slower_gemm(fit: GemmFit, f: float) -> GemmFit:
    return GemmFit(
        latency_us=fit.latency_us * f,
        per_expert_us=fit.per_expert_us * f,
        tflops=_slower_curve(fit.tflops, f),
    )


def predict(m: EPMeasurement, hw: HardwareProfile, trace: Path, slowdown: float) -> dict[str, Any]:
    """Simulate the measured case (its routing written to ``trace``); ``SimResult.to_dict()``."""
    from moesim.simulate import simulate

    write_trace(m, trace)
    scn = scenario_for(m.case, m.world, trace, slowdown)
    return simulate(scn, fit_nodes(hw, m.world)).to_dict()


# -- comparing ------------------------------------------------------------------------------


def rel_error(predicted: float, measured: float) -> float:
    """Signed ``(predicted - measured) / measured``."""
    return (predicted - measured) / measured if measured > 0 else float("inf")


def compare(m: EPMeasurement, sim: dict[str, Any]) -> dict[str, Any]:
    """One JSON case: the configuration, end-to-end and per-phase measured vs predicted."""
    c = m.case
    predicted = float(sum(sim["phases_s"].get(p, 0.0) for p in PHASES))
    phases = {
        p: {
            "measured_s": m.phases_s[p],
            "predicted_s": float(sim["phases_s"].get(p, 0.0)),
            "error": rel_error(float(sim["phases_s"].get(p, 0.0)), m.phases_s[p]),
            "spread": spread(m.repeat_phases_s.get(p, [])),
        }
        for p in PHASES
    }
    return {
        "world": m.world,
        "num_experts": c.num_experts,
        "top_k": c.top_k,
        "tokens_per_rank": c.tokens,
        "hidden": c.hidden,
        "ffn": c.ffn,
        "skew": c.skew,
        "capacity_factor": c.capacity_factor,
        "measured_s": m.step_s,
        "predicted_s": predicted,
        "error": rel_error(predicted, m.step_s),
        "phases": phases,
        # the split-size exchange at the start of dispatch: measured, and the model's part
        "dispatch_counts_s": m.phases_s.get("dispatch_counts", 0.0),
        "dispatch_counts_predicted_s": float(sim.get("details", {}).get("split_exchange_s", 0.0)),
        # the regroup of received rows by local expert, part of the experts phase
        "experts_regroup_s": m.phases_s.get("experts_regroup", 0.0),
        "experts_regroup_predicted_s": float(sim.get("details", {}).get("regroup_s", 0.0)),
        "drop_fraction": float(sim.get("drop_fraction", 0.0)),
        "cpu_share": m.cpu_share,
        "disturbed_steps": m.disturbed_steps,
        "step_samples_s": m.step_samples_s,
        # one end-to-end median per repeat, and their (max - min) / median
        "repeat_step_s": m.repeat_step_s,
        "spread": spread(m.repeat_step_s),
    }


def spread(values: list[float]) -> float:
    """``(max - min) / median`` of repeated measurements (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    return float((max(values) - min(values)) / max(float(np.median(values)), 1e-30))


@dataclass(frozen=True)
class EPValidation:
    world: int
    cases: list[dict[str, Any]]
    profile: str  # where the calibrated profile came from
    interference: float = 1.0  # co-run penalty of the expert GEMMs (see co_run_profile)
    cores_kept_awake: int = 0  # idle-priority spinners while measuring (CPU ranks)
    memory_interference: float = 1.0  # co-run penalty of the memory-bound phases
    repeats: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` contract: cases, median and max absolute end-to-end error.

        Plus ``repeats`` and ``spread``: the median over cases of the end-to-end
        and of each phase's spread over repeats (``(max - min) / median``).
        """
        errs = [abs(c["error"]) for c in self.cases]
        return {
            "cases": self.cases,
            "median_abs_error": float(np.median(errs)),
            "max_abs_error": float(np.max(errs)),
            "repeats": self.repeats,
            "spread": self.spreads(),
        }

    def spreads(self) -> dict[str, float]:
        """Median over cases of the spread over repeats: ``step`` and each phase."""
        out = {"step": float(np.median([c["spread"] for c in self.cases]))}
        for p in PHASES:
            out[p] = float(np.median([c["phases"][p]["spread"] for c in self.cases]))
        return out

    def phase_errors(self) -> dict[str, float]:
        """Median signed error per phase: which phase the model gets wrong, and how."""
        return {p: float(np.median([c["phases"][p]["error"] for c in self.cases])) for p in PHASES}


def validate_ep(
    world: int,
    hw: HardwareProfile,
    cases: list[EPCase],
    *,
    profile: str,
    steps: int = 10,
    warmup: int = 3,
    timeout_s: float = 300.0,
    repeats: int = 3,
) -> EPValidation:
    """Probe the host's co-run factors, measure every case on ``world`` ranks, simulate, compare.

    The cases run ``repeats`` times, interleaved (see :func:`run_ep_cases`), within
    ``timeout_s`` per repeat; the probe runs before and after them and its
    factors come from the mean of the two.
    """
    from moesim.measure.distributed import default_backend
    from moesim.measure.ep_probe import keep_cores_awake

    check_world(world, cases)
    with keep_cores_awake(enabled=default_backend() == "gloo") as spinners:
        before = host_sharing(world)
        measured = run_ep_cases(  # timeout_s is per repeat
            cases, world, steps=steps, warmup=warmup, timeout_s=timeout_s * repeats, repeats=repeats
        )
        after = host_sharing(world)
    probe = _mean_probe(before, after)
    v = predict_all(
        measured,
        hw,
        profile=profile,
        cores=probe.cores,
        interference=probe.interference,
        memory_interference=probe.memory_interference,
    )
    return replace(v, cores_kept_awake=spinners, repeats=repeats)


def host_sharing(world: int) -> CoRun:
    """Co-run probe of ``world`` local CPU ranks (factors and usable cores).

    On GPUs (NCCL) every rank has its own device: no sharing (factors 1, ``world`` cores).
    """
    from moesim.measure.distributed import default_backend
    from moesim.measure.ep_probe import co_run_factor

    if default_backend() != "gloo":
        return CoRun(world, world, 1.0, 1.0)
    return co_run_factor(world)


def _mean_probe(a: CoRun, b: CoRun) -> CoRun:
    """The probe with each median the mean of two runs' (factors then follow)."""
    return CoRun(
        a.world,
        a.cores,
        (a.solo_s + b.solo_s) / 2,
        (a.together_s + b.together_s) / 2,
        (a.memory_solo_s + b.memory_solo_s) / 2,
        (a.memory_together_s + b.memory_together_s) / 2,
    )


def predict_all(
    measured: list[EPMeasurement],
    hw: HardwareProfile,
    *,
    profile: str,
    cores: int,
    interference: float = 1.0,
    memory_interference: float = 1.0,
) -> EPValidation:
    """Simulate every measured case on ``hw`` and compare (all of one world size).

    Sharing is priced per phase: the co-run factors scale the profile's memory-bound
    and GEMM fits (:func:`co_run_profile`); time sharing of cores (more ranks than
    cores) is the per-GPU compute slowdown of :func:`compute_slowdown`.
    """
    rows = []
    priced = co_run_profile(hw, compute=interference, memory=memory_interference)
    with tempfile.TemporaryDirectory(prefix="moesim-ep-") as tmp:
        for i, m in enumerate(measured):
            slow = compute_slowdown(m, cores, 1.0)
            row = compare(m, predict(m, priced, Path(tmp) / f"case{i}.npy", slow))
            rows.append(row | {"compute_slowdown": slow})
    return EPValidation(
        measured[0].world, rows, profile, interference, memory_interference=memory_interference
    )
