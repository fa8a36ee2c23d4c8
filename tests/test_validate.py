"""``moesim validate``: the EP-layer comparison and the published-figures table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moesim.cli import main
from moesim.config.loader import load_hardware
from moesim.measure.ep_layer import PHASES, EPCase, EPMeasurement
from moesim.validation import ep
from moesim.validation.published import (
    METRICS,
    expected_rdma_nodes,
    load_published,
    model_flops_per_token,
)

REPO = Path(__file__).resolve().parents[1]


def test_validate_tiny_ep_run_prints_the_json_contract(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bench + calibrate here, run the real layer on 2 gloo ranks, simulate, compare."""
    argv = ["validate", "--ep-world", "2", "--tiny", "--steps", "2", "--warmup", "1"]
    assert main([*argv, "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"cases", "median_abs_error", "max_abs_error"}
    assert len(out["cases"]) == len(ep.tiny_cases())
    for case in out["cases"]:
        assert case["world"] == 2 and case["measured_s"] > 0 and case["predicted_s"] > 0
        want = (case["predicted_s"] - case["measured_s"]) / case["measured_s"]
        assert case["error"] == pytest.approx(want)
        assert set(case["phases"]) == set(PHASES)
    errs = sorted(abs(c["error"]) for c in out["cases"])
    assert out["max_abs_error"] == pytest.approx(errs[-1])
    assert out["median_abs_error"] == pytest.approx(sum(errs) / len(errs))
    saved = list(tmp_path.glob("ep-world2-*.json"))
    assert len(saved) == 1 and "context" in json.loads(saved[0].read_text())
    profile = tmp_path / "cpu-ep2-calibrated.yaml"
    assert load_hardware(str(profile)).calibration is not None


def test_compare_reads_phases_and_end_to_end_off_the_simulation() -> None:
    case = EPCase(num_experts=4, top_k=2, tokens=8, hidden=4, ffn=8)
    ids = torch.zeros(2, 8, 2, dtype=torch.long)
    m = EPMeasurement(
        case, 2, "gloo", dict.fromkeys(PHASES, 1e-3), 8e-3, [8e-3], 0.0, ids,
        torch.ones_like(ids, dtype=torch.bool), [32, 0],
    )  # fmt: skip
    sim = {"phases_s": dict.fromkeys(PHASES, 1.5e-3) | {"dense": 5.0}, "drop_fraction": 0.0}
    row = ep.compare(m, sim)
    assert row["predicted_s"] == pytest.approx(9e-3)  # the six MoE phases, not "dense"
    assert row["error"] == pytest.approx(9e-3 / 8e-3 - 1)
    assert row["phases"]["experts"]["error"] == pytest.approx(0.5)


def test_scenario_for_a_measured_case_matches_it(tmp_path: Path) -> None:
    case = EPCase(num_experts=8, top_k=2, tokens=64, hidden=16, ffn=32, capacity_factor=1.25)
    scn = ep.scenario_for(case, 4, tmp_path / "t.npy", slowdown=2.0)
    assert (scn.cluster.num_gpus, scn.parallel.ep, scn.model.num_experts) == (4, 4, 8)
    assert scn.router.capacity_factor == 1.25 and scn.router.normalize
    assert scn.workload.routing.distribution == "trace" and scn.model.dtype == "fp32"
    # a co-run factor of 2 (say 4 ranks on 2 cores): every rank computes at half speed
    assert [s.compute_slowdown for s in scn.workload.stragglers] == [2.0] * 4
    assert ep.scenario_for(case, 2, tmp_path / "t.npy").workload.stragglers == []


@pytest.mark.parametrize(
    ("rows", "cores", "want"),
    [
        ([100, 100, 100, 100], 2, 2.0),  # balanced, 4 ranks on 2 cores: half a core each
        ([300, 50, 50, 0], 2, 350 / 300),  # rank 0 shares core 0 with rank 2 (50 rows)
        ([200, 100, 100, 100], 2, 1.5),  # ranks 0 and 2 on core 0: 200 + 100 row-times
        ([300, 0, 0, 300], 2, 1.0),  # the busy ranks are pinned to different cores
        ([100, 100, 100, 100], 4, 1.0),  # a core per rank
        ([100, 100], 2, 1.0),  # a core per rank
    ],
)
def test_compute_slowdown_is_per_core_sharing(rows: list[int], cores: int, want: float) -> None:
    case = EPCase(num_experts=4, top_k=1, tokens=8, hidden=4, ffn=8)
    ids = torch.zeros(len(rows), 8, 1, dtype=torch.long)
    m = EPMeasurement(
        case, len(rows), "gloo", dict.fromkeys(PHASES, 1e-3), 1e-2, [1e-2], 0.0, ids,
        torch.ones_like(ids, dtype=torch.bool), rows,
    )  # fmt: skip
    assert ep.compute_slowdown(m, cores, 1.0) == pytest.approx(want)
    assert ep.compute_slowdown(m, cores, 1.1) == pytest.approx(1.1 * want)


def test_bad_world_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--ep-world", "3", "--tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ep-world = 3" in err and "\n" not in err
    assert main(["validate", "--ep-world", "x"]) == 2


def test_published_table_is_cited_and_loads() -> None:
    table = load_published()
    ids = [r.id for r in table.rows]
    assert len(ids) == len(set(ids)) >= 15
    for row in table.rows:
        assert row.url.startswith("https://") and row.source and row.note
        assert row.metric in METRICS


def test_expected_rdma_nodes_by_hand() -> None:
    """DeepEP counts the own node: 2 nodes, both picked, top-8 of 256, each node is
    missed w.p. C(128,8)/C(256,8); EP64 picks 4 of 8 nodes, top-8 of their 128 experts."""
    rows = {r.id: r for r in load_published().rows}
    ep16 = rows["deepep-normal-internode-ep16-dispatch"].scenario
    want16 = 2 * (1 - math.comb(128, 8) / math.comb(256, 8))
    assert expected_rdma_nodes(ep16) == pytest.approx(want16)
    ep64 = rows["deepep-normal-internode-ep64-dispatch"].scenario
    want64 = 4 * (1 - math.comb(96, 8) / math.comb(128, 8))
    assert expected_rdma_nodes(ep64) == pytest.approx(want64)
    intranode = rows["deepep-normal-intranode-ep8-dispatch"].scenario
    assert expected_rdma_nodes(intranode) == 0.0


def test_model_flops_per_token_of_mixtral() -> None:
    """Mixtral 8x7B: about 6 x 12.9 B active parameters plus attention, ~79 GFLOP/token."""
    row = next(r for r in load_published().rows if "mixtral" in r.id)
    assert model_flops_per_token(row.scenario) == pytest.approx(7.9e10, rel=0.02)


def test_validate_published_prints_every_row(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="400")
    cmd = [sys.executable, "-m", "moesim", "validate", "--published", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    for row in load_published().rows:
        assert row.id in done.stdout
    report = json.loads(next(tmp_path.glob("published-*.json")).read_text())
    assert len(report["rows"]) == len(load_published().rows)
    assert all(math.isfinite(r["predicted"]) and r["predicted"] > 0 for r in report["rows"])
    assert "within 20 %" in done.stdout


def test_kernel_benchmark_metrics_leave_out_the_split_exchange() -> None:
    """nccl-tests and DeepEP time the transfer alone: the exchange prefix is taken off.

    2 x 8 H100, 32768 tokens x top-1 x 4096 bf16 = S = 256 MiB per rank; half of it
    crosses the NIC. With 3 ms of dispatch of which 1 ms exchange, the NIC moved
    S/2 in 2 ms; busbw = S / 2 ms * 15/16.
    """
    rows = {r.id: r for r in load_published().rows}
    scn = rows["nccl-alltoall-2x8xh100-nic"].scenario
    res = {"dispatch_time_s": 3e-3, "details": {"split_exchange_s": 1e-3}}
    S = 32768 * 4096 * 2
    assert METRICS["alltoall_nic_GBps"](scn, res) == pytest.approx(S / 2 / 2e-3 / 1e9)
    assert METRICS["alltoall_busbw_GBps"](scn, res) == pytest.approx(S / 2e-3 * 15 / 16 / 1e9)
    assert METRICS["dispatch_us"](scn, res) == pytest.approx(2000.0)
    one_node = rows["nccl-alltoall-8xh100-busbw"].scenario
    with pytest.raises(Exception, match="at least 2 nodes"):
        METRICS["alltoall_nic_GBps"](one_node, res)


def test_bench_grid_covers_the_split_size_exchange() -> None:
    """E = 8 and 16 experts: the count exchange sends 64 and 128 B per rank; both are benched."""
    sizes = ep.bench_grids(ep.default_cases(), 2)["alltoall"]["msg_bytes"]
    assert sizes[:2] == [64, 128] and sizes == sorted(sizes)


def test_cpu_flush_by_default_flushes_inside_the_block_only() -> None:
    from moesim.measure.timer import cpu_flush_by_default, time_fn

    def fn() -> None:
        return None

    with cpu_flush_by_default():
        inside = time_fn(fn, budget_s=1e-4, warmup_s=0.0)
        explicit = time_fn(fn, budget_s=1e-4, warmup_s=0.0, flush_cache=False)
    after = time_fn(fn, budget_s=1e-4, warmup_s=0.0)
    assert inside.method == "perf_counter+flush"
    assert explicit.method != "perf_counter+flush" and after.method != "perf_counter+flush"


_FAULTS = """
import resource, sys, torch
from moesim.measure.ep_probe import keep_freed_memory
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    assert keep_freed_memory()


def step(i):
    held = [torch.zeros(2**20 + 1024 * (i % 3)) for _ in range(8)]  # 8 x 4 MiB
    for t in held:
        t[:5].add_(1)
    del held
    torch.zeros(2**19)[:5].add_(1)


for i in range(3):
    step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10):
    step(i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_reuses_pages_step_after_step() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")

    def faults(mode: str) -> int:
        cmd = [sys.executable, "-c", _FAULTS, mode]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    # A step holds 32 MiB (8,192 pages) at once and frees it. With glibc's defaults
    # the freed heap top exceeds the dynamic trim threshold and goes back to the OS:
    # at least one step in ten (seen: 8,208 or 81,192 faults) faults it in anew.
    # Kept memory is reused warm; only a stray few hundred faults may remain.
    default, kept = faults("default"), faults("keep")
    assert default > 4096
    assert kept < 2048


def test_folding_rows_cite_the_paper_and_state_their_flop_formula() -> None:
    from moesim.model import FORMULA
    from moesim.validation.published import predict_row

    rows = [r for r in load_published().rows if "2504.14960" in r.url]
    assert {r.scenario.model.hidden_size for r in rows} == {6144, 3584}  # 8x22B, 57B-A14B
    assert {r.published for r in rows} == {49.3, 46.3, 39.0, 35.3}  # the paper's Table 1
    for row in rows:
        assert row.metric == "mfu_percent" and "Table 1" in row.source and row.search is not None
        assert row.search.global_batch == 256 and row.scenario.router.capacity_factor == 1.0
    result = predict_row(rows[0]).to_dict()
    assert result["flop_formula"] == FORMULA
    assert 0 < result["predicted"] < 100
    assert result["layout"].startswith("attn tp") and result["search"] is None
