"""The local launcher: results by rank, and failures end the launch fast with one line."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from moesim.errors import UserError
from moesim.measure.distributed import DistributedError, launch


def _rank_info(scale: int) -> tuple[int, int, int, float]:
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), torch.get_num_threads(), scale * t.item()


def _raise_on_rank1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    t = torch.zeros(1)
    dist.all_reduce(t)  # rank 0 blocks here until the launcher stops it
    return 0


def _die_on_rank0() -> int:
    if dist.get_rank() == 0:
        os._exit(7)
    time.sleep(60)
    return 0


def _sleep_forever() -> None:
    time.sleep(60)


def _unpicklable() -> object:
    return lambda: None


def test_launch_gathers_results_by_rank() -> None:
    out = launch(_rank_info, 2, args=(10,), backend="gloo", timeout_s=60)
    assert out == [(0, 2, 1, 30.0), (1, 2, 1, 30.0)]


def test_rank_that_raises_ends_launch_fast_with_one_line() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError) as info:
        launch(_raise_on_rank1, 2, backend="gloo", timeout_s=60)
    msg = str(info.value)
    assert "rank 1" in msg and "ValueError: boom on purpose" in msg and "\n" not in msg
    assert isinstance(info.value, UserError)
    assert time.monotonic() - start < 30


def test_rank_that_dies_is_named() -> None:
    with pytest.raises(DistributedError, match=r"rank 0 of 2 died with exit code 7"):
        launch(_die_on_rank0, 2, backend="gloo", timeout_s=60)


def test_timeout_ends_launch() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError, match="timed out after 3 s"):
        launch(_sleep_forever, 1, backend="gloo", timeout_s=3)
    assert time.monotonic() - start < 20


def test_unpicklable_result_is_reported() -> None:
    with pytest.raises(DistributedError, match="rank 0 of 1 failed"):
        launch(_unpicklable, 1, backend="gloo", timeout_s=60)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 0}, "world_size = 0"),
        ({"world_size": 1, "backend": "mpi"}, "allowed: gloo, nccl"),
        ({"world_size": 1, "timeout_s": 0}, "timeout_s"),
        ({"world_size": 1, "threads_per_rank": 0}, "threads_per_rank"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(DistributedError, match=match):
        launch(_rank_info, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_nccl_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(DistributedError, match="needs CUDA"):
        launch(_rank_info, 1, args=(1,), backend="nccl")


def test_unpicklable_function_is_a_clear_error() -> None:
    with pytest.raises(DistributedError, match="module-level function"):
        launch(lambda: 1, 1, backend="gloo", timeout_s=30)


def _world_and_rank() -> tuple[int, int]:
    return dist.get_world_size(), dist.get_rank()


def test_under_torchrun_this_process_is_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from moesim.measure.distributed import free_port

    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    try:
        with pytest.raises(DistributedError, match="torchrun started 1 ranks; pass 1"):
            launch(_world_and_rank, 2, backend="gloo")
        assert launch(_world_and_rank, 1, backend="gloo") == [(1, 0)]
        with pytest.raises(DistributedError, match="rank 0 raised ValueError: boom"):
            launch(_raise_on_rank1_or_0, 1, backend="gloo")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _raise_on_rank1_or_0() -> None:
    raise ValueError("boom")


def _symptom_first() -> None:
    if dist.get_rank() == 1:
        raise RuntimeError("DistNetworkError: Connection reset by peer")  # arrives first
    time.sleep(0.1)
    raise ValueError("the real cause")


def test_the_root_cause_is_named_not_the_first_symptom() -> None:
    with pytest.raises(DistributedError, match=r"rank 0 of 2 failed: ValueError: the real cause"):
        launch(_symptom_first, 2, backend="gloo", timeout_s=60)
