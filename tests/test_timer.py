"""The timer: sane statistics on a known sleep and a known copy, exact percentiles."""

from __future__ import annotations

import time

import pytest
import torch

from moesim.measure.timer import CPU_MAX_BUDGETS, Timing, time_fn


def test_sleep_is_timed_within_its_duration() -> None:
    t = time_fn(lambda: time.sleep(0.004), budget_s=0.05, warmup_s=0.0)
    assert 0.004 <= t.median_s < 0.02
    assert t.p20_s <= t.median_s <= t.p80_s
    assert t.n_samples >= 4 and len(t.samples_s) == t.n_samples
    assert t.method == "blocks"
    # one 4 ms call per block (a block lasts about CPU_BLOCK_S); never past the budgets
    assert sum(t.samples_s) <= CPU_MAX_BUDGETS * 0.05 + 0.02


def test_fast_calls_are_timed_in_blocks_as_per_call_means() -> None:
    """A call of well under a microsecond: blocks of many calls (sized from the warm-up,
    here its one call) keep the clock read out of the samples, each sample one call's
    mean, and the timing stops within its budgets."""
    calls: list[int] = []
    t = time_fn(lambda: calls.append(1), budget_s=0.01, warmup_s=0.0)
    timed = len(calls) - 1  # the warm-up's one call
    assert timed % t.n_samples == 0
    per_block = timed // t.n_samples
    assert per_block >= 100
    assert t.median_s < 5e-6
    assert sum(t.samples_s) * per_block <= CPU_MAX_BUDGETS * 0.01 + 2e-3


def test_known_copy_gives_a_plausible_bandwidth() -> None:
    src = torch.ones(4 * 2**20)  # 16 MiB
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), budget_s=0.05, warmup_s=0.01, threads=1)
    gbps = 2 * src.numel() * 4 / t.median_s / 1e9
    assert 0.2 < gbps < 1000
    assert torch.equal(dst, src)
    assert t.threads == 1


def test_more_work_takes_longer() -> None:
    small, big = torch.ones(2**16), torch.ones(2**22)
    t_small = time_fn(lambda: small.mul(2.0), budget_s=0.03, warmup_s=0.0, threads=1)
    t_big = time_fn(lambda: big.mul(2.0), budget_s=0.03, warmup_s=0.0, threads=1)
    assert t_big.median_s > 4 * t_small.median_s


def test_flushed_loop_keeps_one_sample_per_call() -> None:
    calls = []
    t = time_fn(lambda: calls.append(1), budget_s=1e-4, warmup_s=0.0, flush_cache=True)
    assert t.method == "perf_counter+flush"
    assert t.n_samples >= 3
    assert len(calls) == t.n_samples + 1  # plus the warm-up call


def test_thread_count_is_fixed_then_restored() -> None:
    before = torch.get_num_threads()
    seen = []
    t = time_fn(lambda: seen.append(torch.get_num_threads()), budget_s=0.01, threads=1)
    assert set(seen) == {1} and t.threads == 1
    assert torch.get_num_threads() == before


def test_percentiles_of_known_samples() -> None:
    t = Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0], threads=1, method="x")
    assert (t.median_s, t.p20_s, t.p80_s) == (3.0, 1.8, 4.2)
    with pytest.raises(ValueError, match="no timing samples"):
        Timing.from_samples([], threads=1, method="x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"budget_s": 0}, "budget_s"), ({"device": "tpu"}, "allowed: cpu, cuda")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        time_fn(lambda: None, **kwargs)


@pytest.mark.gpu
def test_cuda_events_time_a_known_copy() -> None:
    src = torch.ones(64 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    for flush in (False, True):
        t = time_fn(lambda: dst.copy_(src), device="cuda", budget_s=0.05, flush_cache=flush)
        gbps = 2 * src.numel() * 4 / t.median_s / 1e9
        assert 50 < gbps < 10_000 and t.n_samples >= 5


def test_prime_runs_untimed_before_every_flushed_sample() -> None:
    calls = []

    def prime() -> None:
        calls.append(1)
        time.sleep(2e-3)  # would dominate the samples if it were timed

    t = time_fn(lambda: None, budget_s=1e-3, warmup_s=0.0, flush_cache=True, prime=prime)
    assert t.method == "perf_counter+flush+prime"
    assert len(calls) == len(t.samples_s) >= 3
    assert t.median_s < 1e-3  # the 2 ms prime is not in the samples


def test_cpu_clock_leaves_out_time_off_the_core() -> None:
    """A sleeping call takes wall time but (almost) no CPU time; a busy one takes both."""
    wall = time_fn(lambda: time.sleep(0.004), budget_s=0.03, warmup_s=0.0, threads=1)
    cpu = time_fn(lambda: time.sleep(0.004), budget_s=0.03, warmup_s=0.0, threads=1, clock="cpu")
    assert wall.median_s >= 0.004 and cpu.median_s < 0.001
    assert cpu.method == "blocks+thread_time"
    x = torch.ones(2**20)
    busy_wall = time_fn(lambda: x.mul(2.0), budget_s=0.03, warmup_s=0.01, threads=1)
    busy_cpu = time_fn(lambda: x.mul(2.0), budget_s=0.03, warmup_s=0.01, threads=1, clock="cpu")
    assert 0.3 < busy_cpu.median_s / busy_wall.median_s < 3.0
    flushed = time_fn(
        lambda: time.sleep(0.002), budget_s=0.01, threads=1, flush_cache=True, clock="cpu"
    )
    assert flushed.median_s < 0.001 and flushed.method == "perf_counter+flush+thread_time"


def test_cpu_clock_needs_one_thread_and_a_known_name() -> None:
    with pytest.raises(ValueError, match="threads = 1"):
        time_fn(lambda: None, budget_s=0.01, threads=2, clock="cpu")
    with pytest.raises(ValueError, match="allowed: wall, cpu"):
        time_fn(lambda: None, budget_s=0.01, clock="tsc")
