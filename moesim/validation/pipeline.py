"""Predicted vs measured, by parts: a real 1F1B pipeline here against the simulator.

The pipeline of :mod:`moesim.measure.pipeline` (``stages x dp`` gloo ranks, MoE
layers, tied embeddings, real sends, autograd backward, gradient all-reduces) is
measured, and the same run is simulated as a scenario of one node with
``stages x dp`` "GPUs" (``parallel.pp``, ``pp_schedule: 1f1b``, ``dp``, EP 1, the
same layers, vocabulary, tokens per micro-batch, micro-batches; gradient
all-reduce without the distributed optimizer and without overlap, then the tied
embedding's all-reduce between the first and last stage).

The default run is pp 2 x dp 1 with tied embeddings: on this 2-core machine a
core per rank (more ranks than cores time-share them, and how their passes then
interleave is the host's scheduler, not the pipeline; see
:func:`compute_slowdown`), and its gradient all-reduce is the embedding group's,
as Megatron runs it without data parallelism. The hardware is a profile of this
machine calibrated here:

- the layer's kernels, benched and fitted as ``moesim calibrate`` does
  (:func:`moesim.validation.ep.calibrate_here`), with the LM head's cross-entropy
  at the run's logits (:func:`bench_extra`: the ``loss`` family; on a CPU its
  ``exp`` is not a copy of its bytes);
- the backward / forward factors of the expert GEMMs and of the memory-bound ops
  (:func:`moesim.measure.pipeline.backward_ratios`, ``calibration.backward``);
- the gloo costs, measured on the run's own ranks pinned as the run pins them
  (:func:`moesim.measure.pipeline.measure_comm`: every replica's stage pairs
  ping-pong at once, every stage's data-parallel group all-reduces at once): the
  point-to-point ``latency + bytes / bandwidth`` becomes the profile's scale-up
  link, the all-reduce's size regimes (on the data-parallel groups, or with dp 1
  the embedding groups) its ``all_reduce.<n>`` collective (the simulator prices a
  gradient group of ``n`` inside a node with it); each fitted on
  half of the sizes, its error on the other half reported (held out). The
  pipeline runs no all-to-all (EP 1).

Local ranks share the cores: with ``pin_rank`` the replicas of a stage share a
core when there are fewer cores than ranks, so every simulated GPU computes
``co-run interference / core share`` slower (:func:`compute_slowdown`): the
interference from :class:`moesim.measure.ep_probe.CoRun`, measured before the
run, the core share (thread CPU time over wall time of the passes) measured in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.calibrate.gpu_forms import MIN_SIZES, fit_regimes
from moesim.config.hardware import BackwardFit, CommFit, CommRegime, Curve, HardwareProfile
from moesim.config.scenario import Scenario
from moesim.costs.tables import curve_s
from moesim.measure.pipeline import PARTS, PipeCase, PipeMeasurement
from moesim.phases import LAYER_PHASES
from moesim.validation.ep import measured_model, rel_error, spread

#: measured part -> the simulator's per-GPU breakdown key (mean over GPUs)
PART_KEYS = {"sends": "exposed_pp", "bubble": "bubble", "grad_sync": "exposed_dp"}
#: relative timing noise of the gloo collectives here (a regime is added only past it)
COMM_NOISE = 0.05


#: the default run's tied vocabulary: its LM head and loss are about a quarter of the
#: last stage's compute, its gradient (1 MiB fp32) the embedding group's all-reduce
DEFAULT_VOCAB = 2048


def default_case(seed: int = 0) -> PipeCase:
    """pp 2 x dp 1, tied embeddings, two MoE layers per stage, 6 micro-batches of 1024
    tokens: the token counts where the kernels' calibration (on evicted caches) is
    validated by the EP layer (512-2048 per rank); at 256 tokens a stage's kernels
    run partly from the caches its last pass left, 10-26 % faster than benched."""
    return PipeCase(dp=1, micro_batches=6, tokens=1024, vocab=DEFAULT_VOCAB, seed=seed)


def tiny_case(seed: int = 0) -> PipeCase:
    """A small pipeline for tests and smoke runs (about a second): pp 2 x dp 2, tied
    embeddings, so both gradient groups run."""
    return PipeCase(
        layers_per_stage=1, micro_batches=3, tokens=64, hidden=32, ffn=64, num_experts=4,
        vocab=128, seed=seed,
    )  # fmt: skip


# -- calibration on this machine ---------------------------------------------------------


def bench_extra(case: PipeCase) -> dict[str, dict[str, list[int]]]:
    """The LM head's cross-entropy around the run's shape (with tied embeddings)."""
    if not case.vocab:
        return {}
    T = case.tokens
    return {"roofline": {"loss_T": [T // 2, T, 2 * T], "loss_V": [case.vocab]}}


def comm_sizes(case: PipeCase) -> list[int]:
    """Message sizes from a quarter of an activation to past the largest gradient bucket."""
    act = case.tokens * case.hidden * 4
    grads = case.layers_per_stage * case.num_experts * 3 * case.hidden * case.ffn * 4
    grads = max(grads, case.vocab * case.hidden * 4)
    lo, hi = int(np.log2(max(act // 4, 1024))), int(np.ceil(np.log2(grads * 2)))
    return [2**p for p in range(lo, hi + 1)]


def fit_p2p(comm: dict[str, Any]) -> dict[str, Any]:
    """Fits on every other size, errors on the rest (held out), of both measured costs.

    - point-to-point: least-squares ``t = latency + bytes / bw`` (the link the
      pipeline's sends take);
    - all-reduce: size regimes ``latency_r + bytes / GBps_r`` as for NCCL tables
      (:func:`moesim.calibrate.gpu_forms.fit_regimes`), the collective the
      simulator prices each data-parallel group's gradient sync with.
    """
    b = np.asarray(comm["bytes"], dtype=np.float64)
    t = np.asarray(comm["p2p_s"], dtype=np.float64)
    fit_idx, held = np.arange(0, len(b), 2), np.arange(1, len(b), 2)
    lat, inv_bw = _line(b[fit_idx], t[fit_idx])
    held_err = (lat + b[held] * inv_bw - t[held]) / t[held]
    out: dict[str, Any] = {
        "latency_s": lat,
        "bandwidth_Bps": 1.0 / inv_bw,
        "held_out_bytes": b[held].tolist(),
        "held_out_error": held_err.tolist(),
        "held_out_median_abs_error": float(np.median(np.abs(held_err))) if len(held) else 0.0,
    }
    ar = np.asarray(comm.get("allreduce_s", []), dtype=np.float64)
    if len(ar) == len(b) and len(b) >= 2:
        fit = _allreduce_fit(b[fit_idx], ar[fit_idx])
        err = (curve_s(fit, b[held]) - ar[held]) / ar[held]
        out |= {
            "allreduce_fit": fit.model_dump(),
            "allreduce_error": err.tolist(),
            "allreduce_median_abs_error": float(np.median(np.abs(err))) if len(held) else 0.0,
        }
    return out


def _allreduce_fit(b: np.ndarray, t: np.ndarray) -> CommFit:
    """Size regimes where there are sizes enough for them, else one line."""
    if len(b) >= MIN_SIZES:
        return fit_regimes(b, t, COMM_NOISE)
    lat, inv_bw = _line(b, t)
    regime = CommRegime(latency_us=lat * 1e6, GBps=1.0 / inv_bw / 1e9)
    return CommFit(latency_us=regime.latency_us, bandwidth_GBps=Curve(x=[1.0], y=[regime.GBps]),
                   regimes=[regime])  # fmt: skip


def _line(b: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """``t = lat + b * inv_bw`` minimising relative errors, ``lat >= 0``."""
    w = 1.0 / t
    A = np.stack([np.ones(len(b)), b], axis=1) * w[:, None]
    (lat, inv_bw), *_ = np.linalg.lstsq(A, t * w, rcond=None)
    if lat < 0:  # through the origin instead
        lat, inv_bw = 0.0, float(np.sum(w * w * b * t) / np.sum(w * w * b * b))
    return float(lat), max(float(inv_bw), 1e-15)


def with_measured(
    hw: HardwareProfile, p2p: dict[str, Any], ratios: dict[str, float], world: int, dp: int = 1
) -> HardwareProfile:
    """``hw`` with the p2p fit as its scale-up link, the all-reduce fit (if measured) as
    its ``all_reduce.<dp>`` collective, the measured backward factors and at least
    ``world`` GPUs per node."""
    assert hw.calibration is not None
    link = CommFit(
        latency_us=p2p["latency_s"] * 1e6,
        bandwidth_GBps=Curve(x=[1.0], y=[p2p["bandwidth_Bps"] / 1e9]),
    )
    collectives = dict(hw.calibration.collectives)
    group = int(p2p.get("measured", {}).get("allreduce_group", dp))
    if "allreduce_fit" in p2p and group > 1:
        collectives[f"all_reduce.{group}"] = CommFit.model_validate(p2p["allreduce_fit"])
    back = BackwardFit(
        gemm=ratios["gemm"], memory=ratios["memory"],
        source="moesim.measure.pipeline.backward_ratios (thread CPU time, this machine)",
    )  # fmt: skip
    cal = hw.calibration.model_copy(
        update={
            "alltoall": {**hw.calibration.alltoall, "scaleup": link},
            "backward": back,
            "collectives": collectives,
        }
    )
    node = hw.node.model_copy(update={"gpus_per_node": max(hw.node.gpus_per_node, world)})
    return hw.model_copy(update={"calibration": cal, "node": node})


# -- simulating the run --------------------------------------------------------------------


def scenario_for(case: PipeCase, slowdown: float = 1.0) -> Scenario:
    """The measured pipeline as a one-node training scenario."""
    stragglers = [{"gpu": g, "compute_slowdown": slowdown} for g in range(case.world)]
    c = case.layer_case(0)
    model = measured_model(
        case.hidden, case.ffn, case.num_experts, case.top_k,
        layers=case.stages * case.layers_per_stage,
    )  # fmt: skip
    if case.vocab:
        model |= {"vocab_size": case.vocab, "tie_word_embeddings": True}
    return Scenario.model_validate(
        {
            "name": f"pipeline {case.label()}",
            "hardware": "calibrated",
            "cluster": {"nodes": 1, "gpus_per_node": case.world},
            "model": model,
            "router": c.router_spec().model_dump(exclude={"top_k"}),
            "parallel": {"ep": 1, "dp": case.dp, "pp": case.stages, "pp_schedule": "1f1b"},
            "dispatcher": "alltoall",
            "training": {
                "distributed_optimizer": False,
                "overlap_grad_reduce": False,
                "overlap_param_gather": False,
            },
            "workload": {
                "mode": "training",
                "tokens_per_gpu": case.tokens,
                "micro_batches": case.micro_batches,
                "optimizer_bytes_per_param": 0,  # the measured steps update no weights
                "routing": {"distribution": "uniform"},
                "stragglers": stragglers if slowdown != 1.0 else [],
                "seed": case.seed,
            },
        }
    )


def predict(case: PipeCase, hw: HardwareProfile, slowdown: float) -> dict[str, float]:
    """Predicted parts (mean over GPUs), forward / backward split from the phase tables."""
    from moesim.simulate import simulate

    res = simulate(scenario_for(case, slowdown), hw)
    mean = res.step_breakdown_s["mean"]
    passes = case.layers_per_stage * case.micro_batches
    fwd = passes * sum(res.phases_s[k] for k in LAYER_PHASES)  # per layer: not head, sync
    fwd += case.micro_batches * res.phases_s.get("head", 0.0) / case.stages  # the last stage's
    fwd = min(fwd, mean["compute"])
    out = {"forward": fwd, "backward": mean["compute"] - fwd}
    out |= {p: float(mean[k]) for p, k in PART_KEYS.items()}
    return out | {"step": float(res.step_time_s)}


# -- comparing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PipeValidation:
    case: PipeCase
    measured: PipeMeasurement
    predicted: dict[str, float]
    p2p: dict[str, Any]
    backward: dict[str, float]
    slowdown: float
    profile: str
    expected_slowdown: float = 1.0  # on an idle host (ranks per core x co-run)
    host_drift: float = 1.0  # expert GEMMs re-timed between the steps / calibrated price
    interference: float = 1.0  # co-run slowdown of the expert GEMMs, in the run's window

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` contract: per part measured / predicted / error, the median."""
        m = self.measured
        measured = m.parts_s | {"step": m.step_s}
        parts = {
            p: {
                "measured_s": measured[p],
                "predicted_s": self.predicted[p],
                "error": rel_error(self.predicted[p], measured[p]),
            }
            for p in (*PARTS, "step")
        }
        errs = [abs(parts[p]["error"]) for p in PARTS]
        c = self.case
        return {
            "case": {
                "stages": c.stages, "dp": c.dp, "layers_per_stage": c.layers_per_stage,
                "micro_batches": c.micro_batches, "tokens": c.tokens, "hidden": c.hidden,
                "ffn": c.ffn, "num_experts": c.num_experts, "top_k": c.top_k,
                "schedule": "1f1b", "world": c.world,
            },
            "parts": parts,
            "median_abs_error": float(np.median(errs)),
            "max_abs_error": float(np.max(errs)),
            "max_rel_error_vs_reference": m.max_rel_error,
            "cpu_share": m.cpu_share,
            "disturbed_steps": m.disturbed_steps,
            "per_rank_s": m.per_rank_s,
            "step_samples_s": m.step_samples_s,
            "p2p_fit": self.p2p,
            "backward_factors": self.backward,
            "compute_slowdown": self.slowdown,
            "expected_slowdown": self.expected_slowdown,
            "host_drift": self.host_drift,
            "interference": self.interference,
            "probe_s": m.probe_s,
            "profile": self.profile,
        }  # fmt: skip


def validate_pipeline(
    case: PipeCase,
    hw: HardwareProfile,
    *,
    profile: str,
    steps: int = 8,
    warmup: int = 2,
    timeout_s: float = 300.0,
) -> PipeValidation:
    """Measure the comm fit, backward factors and co-run factor, run the pipeline (its
    ranks re-time the layer's expert GEMMs between steps: :func:`host_drift`), predict."""
    from moesim.measure.distributed import launch
    from moesim.measure.ep_probe import co_run_factor, keep_cores_awake
    from moesim.measure.pipeline import backward_ratios, check_case, measure_comm, run_pipeline

    check_case(case)
    with keep_cores_awake():
        comm = measure_comm(case, comm_sizes(case))
        ratios = launch(backward_ratios, 1, args=(case,), backend="gloo")[0]
        probe = co_run_factor(case.world)
        measured = run_pipeline(case, steps=steps, warmup=warmup, timeout_s=timeout_s)
    drift = host_drift(case, hw, measured.probe_s)
    interference = in_run_interference(measured.probe_s)
    if interference is None:  # no probe: the co-run factor measured before the run
        interference = probe.interference
    p2p = fit_p2p(comm) | {"measured": comm}
    slowdown = compute_slowdown(interference, measured.cpu_share) * drift
    hw = with_measured(hw, p2p, ratios, case.world, case.dp)
    predicted = predict(case, hw, slowdown)
    return PipeValidation(
        case, measured, predicted, p2p, ratios, slowdown, profile,
        expected_slowdown=probe.factor, host_drift=drift, interference=interference,
    )  # fmt: skip


def median_over_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs (:meth:`PipeValidation.to_dict` each, every one measured and
    predicted from its own window) as one: per part the median over repeats of the
    measured and of the predicted seconds, their error, and the spread of the
    measurements (``(max - min) / median``), as ``validate``'s EP cases take their
    repeats; the fits and factors shown are the last repeat's; ``per_repeat`` keeps
    each repeat's parts and median |error|."""
    if len(runs) == 1:
        return runs[0] | {"repeats": 1}
    parts = {}
    for p in (*PARTS, "step"):
        meas = float(np.median([r["parts"][p]["measured_s"] for r in runs]))
        pred = float(np.median([r["parts"][p]["predicted_s"] for r in runs]))
        parts[p] = {"measured_s": meas, "predicted_s": pred, "error": rel_error(pred, meas),
                    "spread": spread([r["parts"][p]["measured_s"] for r in runs])}  # fmt: skip
    errs = [abs(parts[p]["error"]) for p in PARTS]
    per_repeat = [{"median_abs_error": r["median_abs_error"], "parts": r["parts"]} for r in runs]
    return runs[-1] | {
        "parts": parts,
        "median_abs_error": float(np.median(errs)),
        "max_abs_error": float(np.max(errs)),
        "repeats": len(runs),
        "per_repeat": per_repeat,
    }


# -- the host's speed at the run against the calibration's -------------------------------


def in_run_interference(probe_s: list[dict[str, float]]) -> float | None:
    """Co-run slowdown of the layer's expert GEMMs in the run's window: all ranks at once
    over each alone, on warm caches (:class:`moesim.measure.pipeline.HostProbe`), the
    geometric mean over ranks, at least 1 (None with no probe)."""
    r = [p["together"] / p["solo"] for p in probe_s if p.get("solo", 0) > 0 and "together" in p]
    return max(1.0, float(np.exp(np.mean(np.log(r))))) if r else None


def host_drift(case: PipeCase, hw: HardwareProfile, probe_s: list[dict[str, float]]) -> float:
    """How much slower this host computes during the run than its calibration says: the
    geometric mean over ranks of the in-run expert GEMMs
    (:class:`moesim.measure.pipeline.HostProbe`, timed between the steps) over the
    calibrated profile's price of the same call (1 with no probe). The VM here changes
    speed by 10-30 % within a minute (a run's steps: 600-830 ms from one run to the
    next, the calibration tens of seconds before): an input about the host, as the
    co-run factor is, not a part the simulator predicts."""
    from moesim.costs.model import CostModel
    from moesim.measure.loads import zipf_counts

    got = [p["flushed"] for p in probe_s if p.get("flushed", 0) > 0]
    if not got:
        return 1.0
    counts = zipf_counts(case.tokens * case.top_k, case.num_experts, 0.0)
    tpe = np.asarray([counts], dtype=np.float64)
    priced = float(CostModel(hw).experts_s(tpe, case.hidden, case.ffn, "fp32")[0])
    return float(np.exp(np.mean(np.log(np.asarray(got) / priced))))


def compute_slowdown(interference: float, cpu_share: float) -> float:
    """How much slower each rank computes than the single-process calibration bench.

    ``interference / cpu_share``: the co-run penalty (caches, memory bandwidth) over
    the share of a core the ranks' passes got during the run (thread CPU time / wall
    time of the passes, measured). This is an input about the host, not a part the
    simulator predicts: with more ranks than cores, how often two replicas of a stage
    compute at once on their shared core depends on how their passes drift apart,
    which no deterministic schedule model gives (measured here, 4 ranks on 2 cores:
    a share of about 0.6, not the 0.5 of replicas always computing together, which
    :attr:`moesim.measure.ep_probe.CoRun.factor` assumes and the result keeps as
    ``expected_slowdown``). With a core per rank the share is about 1 and this is the
    co-run penalty alone. Never below ``interference``.
    """
    return max(interference, interference / max(cpu_share, 1e-3))
