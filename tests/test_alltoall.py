"""All-to-all with 2 gloo ranks: the received data are right, and the rows follow nccl-tests."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moesim.measure.distributed import launch
from moesim.measure.suites import alltoall
from moesim.measure.suites.common import BenchContext, Case


def _exchange(S: list[list[int]], cases: list[Case], ctx: BenchContext) -> tuple[list[int], list]:
    """Each rank sends ``S[rank][dst]`` copies of ``100·rank + dst`` and keeps what arrived;
    then runs the suite's own per-rank loop (check + timing) over ``cases``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.cat([torch.full((S[rank][d],), 100.0 * rank + d) for d in range(world)])
    recv = torch.empty(sum(S[s][rank] for s in range(world)))
    dist.all_to_all_single(recv, send, [S[s][rank] for s in range(world)], S[rank])
    return [int(v) for v in recv.tolist()], alltoall._rank_main(cases, ctx)


CTX = BenchContext(budget_s=0.01, world=2, timeout_s=60)
GRID = {"msg_bytes": [4096, 65536], "split": ["even", "uneven"]}


def test_two_gloo_ranks_receive_the_right_data_and_rows_follow_nccl_tests() -> None:
    S = [[1, 3], [2, 1]]  # rank 0 sends 1 to itself and 3 to rank 1; rank 1 sends 2 and 1
    cases = alltoall.cases(GRID, ["fp32"], CTX)
    assert [(c.msg_bytes, c.split) for c in cases] == [
        (4096, "even"),
        (4096, "uneven"),
        (65536, "even"),
        (65536, "uneven"),
    ]
    (got0, samples), (got1, samples1) = launch(_exchange, 2, args=(S, cases, CTX), timeout_s=60)
    assert got0 == [0, 100, 100]  # 1 from itself, 2 from rank 1
    assert got1 == [1, 1, 1, 101]  # 3 from rank 0, 1 from itself
    assert samples == samples1  # both ranks hold the slowest rank's times
    for case, s in zip(cases, samples, strict=True):
        row = alltoall._row(case, CTX, s)
        assert row["status"] == "ok" and row["world"] == 2 and row["strategy"] == "gloo"
        assert row["msg_bytes"] == case.msg_bytes == row["bytes"]
        assert row["n_samples"] >= alltoall.MIN_ITERS
        assert row["algbw_GBps"] == pytest.approx(case.msg_bytes / row["median_s"] / 1e9)
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] / 2)


def _corrupt_check() -> None:
    # ranks disagree on the splits -> wrong data or a size error: the check must fail
    S = [[2, 2], [2, 2]] if dist.get_rank() == 0 else [[1, 3], [1, 3]]
    alltoall.check_exchange(S, torch.device("cpu"))


def test_check_exchange_detects_wrong_data() -> None:
    with pytest.raises(Exception, match="rank"):
        launch(_corrupt_check, 2, backend="gloo", timeout_s=60)


def test_uneven_split_makes_rank0_the_hot_receiver() -> None:
    case = Case("alltoall", "alltoall", dtype="fp32", split="uneven", world=4, msg_bytes=4 * 1100)
    S = alltoall.splits(case)
    received = [sum(S[s][d] for s in range(4)) for d in range(4)]
    assert all(sum(row) == 1100 for row in S)
    assert received[0] == max(received) and received[0] > received[3]


def test_odd_message_size_is_rounded_to_whole_elements_per_rank() -> None:
    ctx = BenchContext(world=3)
    (case,) = alltoall.cases({"msg_bytes": [1000], "split": ["even"]}, ["fp32"], ctx)
    assert case.msg_bytes == 996  # 249 fp32 elements, a multiple of 3


def test_case_too_big_for_one_rank_is_oom_and_the_rest_run() -> None:
    ctx = BenchContext(budget_s=0.005, world=2, timeout_s=60, mem_limit_bytes=100_000)
    cases = alltoall.cases({"msg_bytes": [1024, 10**6], "split": ["uneven"]}, ["fp32"], ctx)
    small, big = alltoall.measure_many(cases, ctx)
    assert small["status"] == "ok" and big["status"] == "oom"
