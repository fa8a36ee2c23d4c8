"""All-to-all suite: real ``torch.distributed.all_to_all_single`` across local ranks.

All cases run inside one :func:`moesim.measure.distributed.launch` (gloo on CPU,
NCCL on CUDA). Every rank sends ``msg_bytes`` per call: split evenly over the
ranks, or unevenly by Zipf(1) with rank 0 the hottest receiver. Before timing,
each case is checked once with an int64 pattern that encodes (source,
destination, position), so wrong data fail the case instead of being timed.

Timing follows nccl-tests: a fixed number of iterations agreed by all ranks;
each sample is the slowest rank's time (all-reduce MAX; on CPU from the last
rank's start to the last rank's end); algbw = msg_bytes /
time, busbw = algbw · (n - 1) / n. Gloo ranks run with the cores kept awake
(:func:`moesim.measure.ep_probe.keep_cores_awake`): on a virtual machine a rank
waiting for data otherwise pays its halted vCPU's wake-up, milliseconds at times.
On CPU each timed call follows a few milliseconds of compute on every rank
(:class:`moesim.measure.ep_probe.ComputeGap`), as an MoE layer's all-to-alls follow
its gate and its experts: back to back after a barrier, gloo runs about twice as fast.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from moesim.measure.distributed import launch
from moesim.measure.ep_probe import GAP_S, ComputeGap, keep_cores_awake, pin_rank, usable_cores
from moesim.measure.grids import Grid
from moesim.measure.loads import even_splits, uneven_splits
from moesim.measure.suites.common import (
    TORCH_DTYPES,
    BenchContext,
    Case,
    Row,
    failed_row,
    timed_row,
)
from moesim.measure.timer import Timing

UNEVEN_SKEW = 1.0
MIN_ITERS, MAX_ITERS, WARMUP_ITERS = 6, 200, 3
#: passes over all cases that share each case's timed iterations
PASSES = 3


def cases(grid: Grid, dtypes: list[str], ctx: BenchContext) -> list[Case]:
    out = []
    for dtype, msg, split in itertools.product(dtypes, grid["msg_bytes"], grid["split"]):
        elem = Case("alltoall", "alltoall", dtype=dtype).elem_bytes
        # whole elements, a multiple of the world so even splits are exact
        elements = max(ctx.world, int(msg // elem) // ctx.world * ctx.world)
        out.append(
            Case(
                "alltoall",
                "alltoall",
                strategy=backend(ctx),
                dtype=dtype,
                split=split,
                world=ctx.world,
                msg_bytes=int(elements * elem),
            )
        )
    return out


def backend(ctx: BenchContext) -> str:
    return "nccl" if ctx.device.startswith("cuda") else "gloo"


def splits(case: Case) -> list[list[int]]:
    """``S[src][dst]`` elements for this case."""
    elements = int(case.msg_bytes // case.elem_bytes)
    if case.split == "even":
        return even_splits(elements, case.world)
    return uneven_splits(elements, case.world, UNEVEN_SKEW)


def measure_many(cases_: list[Case], ctx: BenchContext) -> list[Row]:
    """Measure every case in one launch of ``ctx.world`` ranks; rows in case order."""
    if not cases_:
        return []
    with keep_cores_awake(enabled=backend(ctx) == "gloo"):
        per_rank = launch(
            _rank_main,
            ctx.world,
            args=(cases_, ctx),
            backend=backend(ctx),
            timeout_s=ctx.timeout_s,
            threads_per_rank=1,
        )
    samples = per_rank[0]
    return [_row(case, ctx, s) for case, s in zip(cases_, samples, strict=True)]


def _row(case: Case, ctx: BenchContext, samples: list[float] | None) -> Row:
    if samples is None:  # some rank had no room for its buffers
        return failed_row(case, ctx, "oom")
    timing = Timing.from_samples(samples, threads=1, method=f"{backend(ctx)} all_to_all_single")
    row = timed_row(case, ctx, timing, bytes_=float(case.msg_bytes))
    algbw = case.msg_bytes / timing.median_s / 1e9
    row.update(algbw_GBps=algbw, busbw_GBps=algbw * (case.world - 1) / case.world)
    return row


# ---------------------------------------------------------------- on every rank


def _rank_main(cases_: list[Case], ctx: BenchContext) -> list[list[float] | None]:
    """Runs on each rank: verify then time every case; per-case samples (max over ranks),
    None for a case that some rank has no memory for (all ranks agree, so none waits).

    The timed iterations of all cases are interleaved over :data:`PASSES` passes, so
    a slow drift of the machine (other tenants, clocks) spreads over every message
    size instead of bending the measured curve where it happened to fall. CPU ranks
    are pinned as the EP layer's are (rank r on core ``r % cores``,
    :func:`~moesim.measure.ep_probe.pin_rank`): unpinned, the OS at times stacks two
    ranks on one core and a woken rank waits a scheduler slice (milliseconds).
    """
    device = _rank_device(ctx)
    if device.type == "cpu":
        usable_cores()  # remember the cores this rank may use before narrowing it to one
        pin_rank(dist.get_rank())
    iters: list[int | None] = []
    for case in cases_:
        if not _all_ranks_fit(case, ctx, device):
            iters.append(None)
            continue
        check_exchange(splits(case), device)
        iters.append(_agree_iterations(_caller(case, device), ctx, device))
    out: list[list[float] | None] = [None if n is None else [] for n in iters]
    for _ in range(PASSES):
        for case, n, samples in zip(cases_, iters, out, strict=True):
            if n is not None and samples is not None:
                samples += _time_calls(_caller(case, device), -(-n // PASSES), device)
    return out


def _all_ranks_fit(case: Case, ctx: BenchContext, device: torch.device) -> bool:
    """Whether every rank has room for the check's int64 buffers (the larger phase)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    S = splits(case)
    need = 8.0 * (sum(S[rank]) + 2 * sum(S[src][rank] for src in range(world)))
    room = torch.cuda.mem_get_info()[0] * 0.9 if device.type == "cuda" else ctx.mem_limit_bytes
    fits = torch.tensor([1 if need <= room else 0], device=device)
    dist.all_reduce(fits, op=dist.ReduceOp.MIN)
    return bool(fits.item())


def _rank_device(ctx: BenchContext) -> torch.device:
    if ctx.device.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_exchange(S: list[list[int]], device: torch.device) -> None:
    """One all-to-all of an int64 pattern ``src·2^48 + dst·2^32 + i``; raise if anything is off."""
    rank, world = dist.get_rank(), dist.get_world_size()
    send = torch.cat([_pattern(rank, dst, S[rank][dst]) for dst in range(world)]).to(device)
    expect = torch.cat([_pattern(src, rank, S[src][rank]) for src in range(world)]).to(device)
    recv = torch.empty_like(expect)
    dist.all_to_all_single(
        recv,
        send,
        output_split_sizes=[S[src][rank] for src in range(world)],
        input_split_sizes=S[rank],
    )
    if not torch.equal(recv, expect):
        bad = int((recv != expect).sum())
        raise RuntimeError(
            f"all_to_all_single delivered wrong data: {bad} of {recv.numel()} elements"
        )


def _pattern(src: int, dst: int, n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) + (src << 48) + (dst << 32)


def _caller(case: Case, device: torch.device) -> Callable[[], None]:
    """The case's ``all_to_all_single`` on fresh buffers, as a no-argument call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    S = splits(case)
    send = torch.ones(sum(S[rank]), dtype=TORCH_DTYPES[case.dtype], device=device)
    recv = torch.empty(sum(S[src][rank] for src in range(world)), dtype=send.dtype, device=device)
    out_splits = [S[src][rank] for src in range(world)]

    def call() -> None:
        dist.all_to_all_single(recv, send, output_split_sizes=out_splits, input_split_sizes=S[rank])

    return call


def _time_calls(call: Callable[[], None], iters: int, device: torch.device) -> list[float]:
    """Warm up, then ``iters`` timed calls.

    CUDA: each sample is the slowest rank's time. CPU: from the last rank's start to
    the last rank's end (local ranks read one clock), as the simulator times a
    collective from its slowest member's arrival and as the EP layer's all-to-alls
    are timed (:data:`moesim.measure.ep_layer.ARRIVALS`).
    """
    for _ in range(WARMUP_ITERS):
        call()
    if device.type == "cuda":
        worst = torch.tensor(_cuda_samples(call, iters), dtype=torch.float64, device=device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return [float(s) for s in worst.cpu()]
    last_2I = torch.tensor(_cpu_samples(call, iters), dtype=torch.float64).T.contiguous()
    dist.all_reduce(last_2I, op=dist.ReduceOp.MAX)
    return [float(s) for s in last_2I[1] - last_2I[0]]


def _agree_iterations(call: Any, ctx: BenchContext, device: torch.device) -> int:
    """Warm up, estimate the slowest rank's time per call, and agree on an iteration count."""
    for _ in range(WARMUP_ITERS):
        call()
    _sync(device)
    start = time.perf_counter()
    for _ in range(WARMUP_ITERS):
        call()
    _sync(device)
    gap = GAP_S if device.type == "cpu" else 0.0  # each CPU sample also computes a gap
    est = torch.tensor(
        [(time.perf_counter() - start) / WARMUP_ITERS + gap], dtype=torch.float64, device=device
    )
    dist.all_reduce(est, op=dist.ReduceOp.MAX)
    return int(min(MAX_ITERS, max(MIN_ITERS, ctx.budget_s / max(float(est), 1e-7))))


def _cpu_samples(call: Any, iters: int) -> list[tuple[float, float]]:
    """``(start, end)`` of each call, after :data:`~moesim.measure.ep_probe.GAP_S` of
    compute on every rank, as a layer calls it (:class:`~moesim.measure.ep_probe.ComputeGap`)."""
    gap = ComputeGap(ranks_per_core=-(-dist.get_world_size() // usable_cores()))
    samples = []
    for _ in range(iters):
        dist.barrier()  # start together, outside the timed region
        gap()
        start = time.perf_counter()
        call()
        samples.append((start, time.perf_counter()))
    return samples


def _cuda_samples(call: Any, iters: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
