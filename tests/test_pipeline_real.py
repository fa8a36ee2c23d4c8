"""The real 1F1B pipeline (gloo ranks) and ``moesim validate --pipeline``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from moesim.config.loader import load_hardware
from moesim.costs.model import CostModel
from moesim.measure.loads import zipf_counts
from moesim.measure.pipeline import (
    PARTS,
    PipeMismatch,
    PipeRankResult,
    StepLog,
    check_against_reference,
    one_f_one_b,
    reference,
    run_pipeline,
    step_parts,
)
from moesim.simulate import simulate
from moesim.simulate.dense import dense_costs
from moesim.validation import pipeline as pv

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "results/reference/epyc-2core/validation/cpu-ep2-calibrated.yaml"


def test_one_f_one_b_order_by_hand() -> None:
    assert one_f_one_b(2, 0, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert one_f_one_b(2, 1, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert one_f_one_b(3, 0, 1) == [("F", 0), ("B", 0)]


@pytest.mark.parametrize("wait_sends", [True, False])
def test_pipeline_equals_one_process_and_a_wrong_gradient_is_caught(wait_sends: bool) -> None:
    """pp 2 x dp 2 on gloo, tied embeddings: losses and all-reduced gradients (data-parallel
    and embedding group) equal the one-process model."""
    case = replace(pv.tiny_case(), wait_sends=wait_sends)
    m = run_pipeline(case, steps=1, warmup=0, timeout_s=120)
    assert m.max_rel_error < 1e-4
    for rank in m.per_rank_s:  # every part was seen, and they add up to the step
        assert rank["forward"] > 0 and rank["backward"] > 0 and rank["grad_sync"] > 0
        assert sum(rank[p] for p in PARTS) == pytest.approx(rank["step"], rel=1e-6)
    # the reference is not trivially equal to anything: a gradient off by 1e-3 fails
    ref = reference(case)
    fake = [
        PipeRankResult(r, r % 2, r // 2, [], ref.losses[r // 2], list(ref.grads[r % 2]))
        for r in range(case.world)
    ]
    assert check_against_reference(case, fake) == 0.0
    fake[1].grads[0] = fake[1].grads[0] * (1 + 1e-3)
    with pytest.raises(PipeMismatch, match="rank 1"):
        check_against_reference(case, fake)


def _log(events: list[tuple[str, int, float, float]], start: float, end: float) -> StepLog:
    return StepLog(events=events, start=start, end=end)


def test_step_parts_by_hand() -> None:
    """Stage 0 computes F0 [0,2], sends at 2; stage 1 waits from 0, gets it at 3, ..."""
    r0 = _log([("F", 0, 0.0, 2.0), ("send_F", 0, 2.0, 2.0),
               ("recv_B", 0, 2.0, 9.0), ("B", 0, 9.0, 12.0), ("sync", -1, 12.0, 13.0)],
              0.0, 13.0)  # fmt: skip
    r1 = _log([("recv_F", 0, 0.0, 3.0), ("F", 0, 3.0, 5.0), ("B", 0, 5.0, 8.0),
               ("send_B", 0, 8.0, 8.0), ("sync", -1, 8.0, 8.5)], 0.0, 8.5)  # fmt: skip
    p0, p1 = step_parts([r0, r1])
    # rank 0: the gradient was sent at 8, arrived at 9: 1 s exposed; waiting 2..8 is bubble
    assert p0 == pytest.approx(
        {"forward": 2, "backward": 3, "sends": 1, "grad_sync": 1, "bubble": 6, "step": 13}
    )
    # rank 1: the activation was sent at 2, arrived at 3; 0..2 and 8.5..13 are bubble
    assert p1 == pytest.approx(
        {"forward": 2, "backward": 3, "sends": 1, "grad_sync": 0.5, "bubble": 6.5, "step": 13}
    )


def test_gradient_sync_runs_from_the_last_replica_s_arrival() -> None:
    """pp 2 x dp 2: rank 0 (stage 0, replica 0) reaches the all-reduce at 10, rank 2
    (stage 0, replica 1) at 12, both leave at 13: 1 s of sync each, rank 0 waited 2 s
    for rank 2's backward (bubble). Stage 1 (ranks 1, 3) arrives together."""

    def log(sync_at: float) -> StepLog:
        return _log([("B", 0, 0.0, sync_at), ("sync", -1, sync_at, 13.0)], 0.0, 13.0)

    parts = step_parts([log(10.0), log(12.5), log(12.0), log(12.5)], stages=2)
    assert [p["grad_sync"] for p in parts] == pytest.approx([1.0, 0.5, 1.0, 0.5])
    assert parts[0]["bubble"] == pytest.approx(2.0) and parts[2]["bubble"] == 0.0
    assert all(sum(p[k] for k in PARTS) == pytest.approx(p["step"]) for p in parts)


def test_embedding_sync_runs_from_the_other_stage_s_arrival() -> None:
    """pp 2 x dp 1, tied embeddings: rank 1 reaches the embedding all-reduce at 8, rank 0
    at 12, both leave at 13: 1 s of sync each, rank 1's wait 8..12 is bubble."""
    r0 = _log([("B", 0, 0.0, 12.0), ("sync", -1, 12.0, 12.0), ("emb_sync", -1, 12.0, 13.0)],
              0.0, 13.0)  # fmt: skip
    r1 = _log([("B", 0, 0.0, 8.0), ("sync", -1, 8.0, 8.0), ("emb_sync", -1, 8.0, 13.0)],
              0.0, 13.0)  # fmt: skip
    p0, p1 = step_parts([r0, r1], stages=2)
    assert p0["grad_sync"] == pytest.approx(1.0) and p1["grad_sync"] == pytest.approx(1.0)
    assert p0["bubble"] == pytest.approx(0.0) and p1["bubble"] == pytest.approx(4.0)


def test_p2p_and_allreduce_fits_recover_their_lines() -> None:
    """p2p ``50 us + b / 2 GB/s``; all-reduce ``30 us + b / 4 GB/s`` below 64 KiB and
    ``200 us + b / 1 GB/s`` above (two regimes, as a protocol switch makes)."""
    b = np.array([2.0**p for p in range(10, 26)])
    lat, bw = 50e-6, 2e9
    ar = np.where(b <= 2**16, 30e-6 + b / 4e9, 200e-6 + b / 1e9)
    fit = pv.fit_p2p({"bytes": b.tolist(), "p2p_s": (lat + b / bw).tolist(),
                      "allreduce_s": ar.tolist()})  # fmt: skip
    assert fit["latency_s"] == pytest.approx(lat, rel=1e-6)
    assert fit["bandwidth_Bps"] == pytest.approx(bw, rel=1e-6)
    assert fit["held_out_median_abs_error"] == pytest.approx(0, abs=1e-9)
    regimes = fit["allreduce_fit"]["regimes"]
    assert [r["GBps"] for r in regimes] == pytest.approx([4.0, 1.0], rel=1e-3)
    assert [r["latency_us"] for r in regimes] == pytest.approx([30.0, 200.0], rel=1e-3)
    assert fit["allreduce_median_abs_error"] == pytest.approx(0, abs=1e-6)
    # the simulator's data-parallel all-reduce is that fit (2 ranks: key all_reduce.2)
    hw = pv.with_measured(load_hardware(str(PROFILE)), fit, {"gemm": 2, "memory": 1}, 4, dp=2)
    assert hw.calibration is not None and "all_reduce.2" in hw.calibration.collectives


def test_measured_backward_factors_scale_the_backward_ops() -> None:
    """With calibration.backward (gemm g, memory m): B experts = g x F, B gate = m x F."""
    hw = load_hardware(str(PROFILE))
    case = pv.tiny_case()
    p2p = {"latency_s": 1e-4, "bandwidth_Bps": 1e9}
    res = {}
    for g, mem in ((2.0, 1.0), (3.0, 0.5)):
        prof = pv.with_measured(hw, p2p, {"gemm": g, "memory": mem}, case.world)
        res[g] = r = simulate(pv.scenario_for(case), prof)
        f, b = r.phases_s, r.backward_phases_s
        assert b["experts"] == pytest.approx(g * f["experts"], rel=1e-9)
        for op in ("gate", "permute", "unpermute"):
            assert b[op] == pytest.approx(mem * f[op], rel=1e-9)
        # the LM head: its GEMMs at g, its cross-entropy and lookup at m
        c = dense_costs(pv.scenario_for(case), CostModel(prof))
        head, mem_s = c["head"], c["head_mem"]
        assert 0 < mem_s < head
        want = (g * (head - mem_s) + mem * mem_s) / head
        assert b["head"] / f["head"] == pytest.approx(want, rel=1e-9)
    # without calibration.backward the factors are 2x / 1x
    prof = pv.with_measured(hw, p2p, {"gemm": 2.0, "memory": 1.0}, case.world)
    assert prof.calibration is not None
    prof = prof.model_copy(
        update={"calibration": prof.calibration.model_copy(update={"backward": None})}
    )
    plain = simulate(pv.scenario_for(case), prof)
    assert plain.step_time_s == pytest.approx(res[2.0].step_time_s, rel=1e-12)
    assert res[3.0].step_time_s > res[2.0].step_time_s


def test_validate_pipeline_tiny_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["validate", "--pipeline", "--tiny", "--steps", "2", "--warmup", "0", "--repeats",
            "2", "--profile", str(PROFILE), "--out", str(tmp_path), "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["parts"]) == {*PARTS, "step"}
    for part, row in out["parts"].items():
        assert row["measured_s"] > 0 or part in ("sends", "bubble"), part
        assert row["predicted_s"] >= 0
        if row["measured_s"] > 0:
            want = (row["predicted_s"] - row["measured_s"]) / row["measured_s"]
            assert row["error"] == pytest.approx(want)
    errs = [abs(out["parts"][p]["error"]) for p in PARTS]
    assert out["median_abs_error"] == pytest.approx(float(np.median(errs)))
    assert out["max_rel_error_vs_reference"] < 1e-4
    assert out["case"]["stages"] == 2 and out["case"]["schedule"] == "1f1b"
    assert out["interference"] >= 1.0 and out["host_drift"] > 0
    # two repeats, each measured and predicted; the parts are their medians
    assert out["repeats"] == 2 and len(out["per_repeat"]) == 2
    for part, row in out["parts"].items():
        each = [r["parts"][part]["measured_s"] for r in out["per_repeat"]]
        assert row["measured_s"] == pytest.approx(float(np.median(each)))
    saved = list(tmp_path.glob("pipeline-*.json"))
    assert len(saved) == 1 and "provenance" in json.loads(saved[0].read_text())


def test_host_drift_and_interference_from_the_in_run_probe() -> None:
    """Drift: geometric mean over ranks of probe / calibrated price; interference:
    together / solo, geometric mean, at least 1; no probe: 1 and None."""
    hw = load_hardware(str(PROFILE))
    case = pv.tiny_case()
    counts = np.asarray([zipf_counts(case.tokens * case.top_k, case.num_experts, 0.0)], float)
    priced = float(CostModel(hw).experts_s(counts, case.hidden, case.ffn, "fp32")[0])
    probes = [{"flushed": 2.0 * priced, "solo": 1.0, "together": 1.21},
              {"flushed": 0.5 * priced, "solo": 2.0, "together": 2.0}]  # fmt: skip
    assert pv.host_drift(case, hw, probes) == pytest.approx(1.0)
    assert pv.host_drift(case, hw, probes[:1]) == pytest.approx(2.0)
    assert pv.host_drift(case, hw, []) == 1.0
    assert pv.in_run_interference(probes) == pytest.approx(1.1)
    assert pv.in_run_interference([{"solo": 2.0, "together": 1.0}]) == 1.0
    assert pv.in_run_interference([]) is None


def test_repeats_are_medians_of_each_part_by_hand() -> None:
    """Three repeats of measured 1/2/4 and predicted 2/2/2 s per part: the median
    measured is 2, the predicted 2, the error 0, the spread (4 - 1) / 2; one repeat
    is returned as it is."""

    def run(meas: float, pred: float) -> dict:
        parts = {p: {"measured_s": meas, "predicted_s": pred, "error": pred / meas - 1}
                 for p in (*PARTS, "step")}  # fmt: skip
        return {"parts": parts, "median_abs_error": abs(pred / meas - 1), "p2p_fit": meas}

    runs = [run(1.0, 2.0), run(2.0, 2.0), run(4.0, 2.0)]
    got = pv.median_over_repeats(runs)
    assert got["repeats"] == 3 and got["p2p_fit"] == 4.0  # the last repeat's fits
    for row in got["parts"].values():
        assert row["measured_s"] == 2.0 and row["predicted_s"] == 2.0 and row["error"] == 0.0
        assert row["spread"] == pytest.approx(1.5)
    assert got["median_abs_error"] == 0.0
    assert [r["median_abs_error"] for r in got["per_repeat"]] == [1.0, 0.0, 0.5]
    assert pv.median_over_repeats(runs[:1]) == runs[0] | {"repeats": 1}


def test_validate_pipeline_rejects_an_uncalibrated_profile(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["validate", "--pipeline", "--tiny", "--profile", "cpu-local", "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not a calibrated profile" in err and err.count("\n") == 1


def test_compute_slowdown_from_the_measured_share() -> None:
    """4 ranks on 2 cores in lock-step: share 1/2, slowdown 2 x co-run; replicas that
    interleave get more of their core (share 0.6: 1/0.6 x co-run); a core per rank: co-run."""
    assert pv.compute_slowdown(1.1, 0.5) == pytest.approx(2.2)
    assert pv.compute_slowdown(1.1, 0.6) == pytest.approx(1.1 / 0.6)
    assert pv.compute_slowdown(1.1, 0.25) == pytest.approx(4.4)
    assert pv.compute_slowdown(1.1, 1.0) == pytest.approx(1.1)
    assert pv.compute_slowdown(1.1, 1.2) == pytest.approx(1.1)  # never below co-run


def test_p2p_fit_through_the_origin_when_the_intercept_would_be_negative() -> None:
    b = [1e3, 1e4, 1e5, 1e6]
    comm = {"bytes": b, "p2p_s": [x / 1e9 for x in b], "allreduce_s": [x / 1e9 for x in b]}
    fit = pv.fit_p2p(comm)
    assert fit["latency_s"] >= 0 and fit["bandwidth_Bps"] == pytest.approx(1e9, rel=1e-6)
