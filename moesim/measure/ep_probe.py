"""How much slower a rank computes when N ranks share this host (the co-run factor).

Local ranks are processes on one machine: they share its cores, caches, memory
bandwidth and clock boost, which single-process kernel benchmarks do not see.
The factor has two parts:

* time sharing: with more ranks than usable cores each rank gets
  ``cores / N`` of a core, so ``max(1, N / cores)``;
* interference, per kind of phase: one SwiGLU expert FFN (compute-bound: the
  experts phase) and one row gather of a buffer beyond the per-core caches
  (memory-bound: gate, permute, unpermute, regroup), each with 1 torch thread,
  are timed on each rank alone, the others waiting, then on all ranks at once.
  The ratio of the median *thread CPU times* is the cache / memory-bandwidth /
  clock penalty of running together. CPU time (not wall time) leaves out the
  time the OS gave to other processes, so other users of the machine do not
  leak into the factors.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moesim.measure.distributed import launch


@dataclass(frozen=True)
class CoRun:
    """Median CPU seconds of the probe alone and with every rank running it."""

    world: int
    cores: int
    solo_s: float
    together_s: float
    memory_solo_s: float = 1.0  # the memory-bound probe (row gather), alone and together
    memory_together_s: float = 1.0

    @property
    def interference(self) -> float:
        """Compute (expert FFN) slowdown of running together, >= 1."""
        return max(1.0, self.together_s / self.solo_s)

    @property
    def memory_interference(self) -> float:
        """Memory-bound (row gather) slowdown of running together, >= 1."""
        return max(1.0, self.memory_together_s / self.memory_solo_s)

    @property
    def factor(self) -> float:
        """Compute slowdown of one rank: time sharing x interference (>= 1)."""
        return max(1.0, self.world / self.cores) * self.interference


def _ffn(x_MD: torch.Tensor, w1_DF: torch.Tensor, w3_DF: torch.Tensor, w2_FD: torch.Tensor) -> None:
    h = torch.nn.functional.silu(x_MD @ w1_DF) * (x_MD @ w3_DF)
    h @ w2_FD


def _timed(fn: Callable[[], None], reps: int) -> list[float]:
    """Thread CPU seconds of each of ``reps`` calls."""
    out = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        out.append(time.thread_time() - t0)
    return out


#: rows of the memory-bound probe's source buffer (x hidden fp32: 16 MiB at hidden 256)
GATHER_ROWS = 16384
Samples = tuple[list[float], list[float]]


def _probe_rank(rows: int, hidden: int, ffn: int, reps: int) -> tuple[Samples, Samples]:
    """On every rank, for the FFN and the gather: solo samples (taking turns), then all running."""
    torch.set_num_threads(1)
    rank = dist.get_rank()
    pin_rank(rank)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows, hidden, generator=g)
    w1, w3 = torch.randn(hidden, ffn, generator=g), torch.randn(hidden, ffn, generator=g)
    w2 = torch.randn(ffn, hidden, generator=g)
    src_RD = torch.randn(GATHER_ROWS, hidden, generator=g)
    idx_R = torch.randperm(GATHER_ROWS, generator=g)

    def ffn_call() -> None:
        _ffn(x, w1, w3, w2)

    def gather_call() -> None:
        src_RD.index_select(0, idx_R)  # what permute / unpermute do to the token rows

    return _solo_and_together(ffn_call, reps), _solo_and_together(gather_call, 4 * reps)


def _solo_and_together(fn: Callable[[], None], reps: int) -> Samples:
    rank, world = dist.get_rank(), dist.get_world_size()
    _timed(fn, max(2, reps // 2))  # warm up: allocator, page faults and caches settle first
    solo: list[float] = []
    for turn in range(world):
        dist.barrier()
        if rank == turn:
            solo = _timed(fn, reps)
    dist.barrier()
    together = _timed(fn, reps)
    dist.barrier()
    return solo, together


def co_run_factor(
    world: int, *, rows: int = 2048, hidden: int = 256, ffn: int = 512, reps: int = 8,
    timeout_s: float = 120.0,
) -> CoRun:  # fmt: skip
    """Launch ``world`` local ranks; measure the co-run slowdown of an FFN and of a gather."""
    per_rank = launch(_probe_rank, world, args=(rows, hidden, ffn, reps), timeout_s=timeout_s)

    def median(probe: int, part: int) -> float:
        return float(torch.tensor([s for r in per_rank for s in r[probe][part]]).median())

    return CoRun(world, usable_cores(), median(0, 0), median(0, 1), median(1, 0), median(1, 1))


#: seconds of compute before each timed gloo call (see :class:`ComputeGap`)
GAP_S = 0.003
#: bytes the gap sweeps (past this host's per-core caches)
GAP_SWEEP_BYTES = 8 * 2**20


class ComputeGap:
    """Compute until ``seconds`` after the call: sweep a buffer past the caches, then
    small matmuls, as a layer computes between its collectives.

    A gloo call timed right after a barrier finds its threads awake and its code,
    sockets and buffers in the caches; an MoE layer's all-to-all, a pipeline's send
    or a gradient all-reduce comes after milliseconds of compute instead, and costs
    more than twice as much on this host (measured: a 64-byte all-to-all of 2 pinned
    ranks, median 0.14 ms after a barrier, 0.37 ms after 3 ms of compute, with a tail
    past 1.5 ms). Every rank starts its gap as it leaves the same barrier and ends it
    at the same deadline, so the ranks still reach the call together.

    ``ranks_per_core`` > 1 (ranks sharing a core): each computes its share of the
    gap (thread CPU time) and goes on, so the ranks of a core reach the call one after
    the other, as their passes end (time such calls from the last rank's arrival).
    """

    def __init__(
        self, seconds: float = GAP_S, sweep_bytes: int = GAP_SWEEP_BYTES, ranks_per_core: int = 1
    ) -> None:
        self.seconds, self.shared = seconds, ranks_per_core > 1
        self.cpu_s = seconds / ranks_per_core if self.shared else seconds
        self.scratch = torch.zeros(max(sweep_bytes // 4, 1))
        self.a_MM = torch.randn(128, 128)

    def __call__(self) -> None:
        if self.seconds <= 0:
            return
        deadline, c0 = time.perf_counter() + self.seconds, time.thread_time()
        self.scratch.add_(1.0)
        while time.thread_time() - c0 < self.cpu_s and time.perf_counter() < deadline:
            self.a_MM @ self.a_MM


@functools.cache
def _start_cpus() -> tuple[int, ...]:
    """The cores this process could use when it started (before :func:`pin_rank`)."""
    if not hasattr(os, "sched_getaffinity"):  # pragma: no cover - not Linux
        return tuple(range(os.cpu_count() or 1))
    return tuple(sorted(os.sched_getaffinity(0)))


def pin_rank(rank: int) -> None:
    """Pin this process to one usable core, rank ``r`` on the ``r``-th (round robin).

    Without it the OS may stack local ranks on one core while another is busy with
    an unrelated process; pinned, ranks spread evenly (two per core for 4 ranks on 2).
    """
    cpus = _start_cpus()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpus[rank % len(cpus)]})


def usable_cores() -> int:
    """CPU cores this process may run on (as it started, before any pinning)."""
    return len(_start_cpus())


#: glibc ``mallopt`` parameters (malloc.h) and the largest mmap threshold it accepts
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20


def keep_freed_memory() -> bool:
    """Make this process's C allocator keep freed memory, as a caching allocator does.

    By default glibc serves large blocks with fresh ``mmap`` pages and gives freed
    memory back to the OS, so a CPU step that allocates its outputs anew pays a
    page fault and a zero-fill per 4 KiB page (``zeros`` of 2 MiB: about 1 ms on
    this host), work the kernels do not do and the production path (the CUDA
    caching allocator, or a benchmark loop that reuses memory) never sees. With
    blocks up to 32 MiB from the heap and no trimming, a step reuses warm pages.
    Call it in every process whose timings are compared (the layer's ranks and
    the calibration bench). Returns False where it is unavailable (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    # INT_MAX: never give the heap's free top back to the OS
    return mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok


#: an idle-priority busy loop pinned to one core; it exits when its parent is gone
_SPINNER = """
import os, sys
parent = int(sys.argv[2])
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
print("ready", flush=True)
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def keep_cores_awake(enabled: bool = True) -> Iterator[int]:
    """Within the block, keep every usable core busy at idle priority (Linux ``SCHED_IDLE``).

    A local rank waiting in a gloo collective sleeps; on a virtual machine its idle
    vCPU halts and waking it again can take milliseconds (measured here: a 64-byte
    all-to-all after 20 ms of compute, p80 3.5 ms; with the cores kept awake, 0.4 ms).
    NCCL ranks spin on their GPUs and never pay that. One spinner process per core,
    at the lowest CPU priority, takes the core only when nothing else wants it (the
    kernel preempts it at once for any normal thread), so a waiting rank wakes as on
    bare metal: the ``idle=poll`` of latency benchmarking, for the duration of a run.
    Yields the number of spinners (0 when not ``enabled``, e.g. for GPU ranks, or
    where ``SCHED_IDLE`` is unavailable).
    """
    if not enabled or not hasattr(os, "SCHED_IDLE") or not hasattr(os, "sched_setaffinity"):
        yield 0
        return
    cmd = [sys.executable, "-c", _SPINNER]
    procs = [
        subprocess.Popen([*cmd, str(cpu), str(os.getpid())], stdout=subprocess.PIPE, text=True)
        for cpu in _start_cpus()
    ]
    try:
        ready = sum(p.stdout is not None and p.stdout.readline().strip() == "ready" for p in procs)
        yield ready
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
