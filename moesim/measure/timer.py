"""One timing function for CPU and CUDA: warm-up, raw samples, median with p20/p80.

* CPU: blocks of calls, each sample a block's per-call mean, the stopping rule of
  ``torch.utils.benchmark.Timer.adaptive_autorange`` (at least the budget and
  four blocks, then until the samples' IQR / median is under 0.1, at most
  :data:`CPU_MAX_BUDGETS` budgets), with a fixed torch thread count. The block size comes from the
  warm-up's calls (a block lasts about :data:`CPU_BLOCK_S`, so the clock read is
  1e-4 of it) instead of torch's own estimate, which runs up to eleven more calls
  of every case (a quarter of a quick bench here); with
  ``flush_cache`` a hand loop that overwrites a buffer larger than the last-level
  cache before every call instead. ``clock="cpu"`` (one thread only) reads the
  calling thread's CPU time instead of the wall clock: on a host shared with
  other processes the time slices the OS gives them are left out, so a kernel
  is timed as it runs on a core of its own (cache and memory-bandwidth
  contention still count, as they should).
* CUDA: ``triton.testing.do_bench`` when triton is installed and a flush is
  wanted; otherwise CUDA events recorded around every call, with the L2 cache
  overwritten between calls and a single synchronisation after the loop.

Every path first warms up for a time budget (at least one call).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: bytes overwritten between calls to evict caches (CPU LLCs and GPU L2s are smaller)
FLUSH_BYTES = 256 * 2**20
CPU_FLUSH_BYTES = 64 * 2**20
MAX_CUDA_SAMPLES = 2000
#: a flushed CPU timing also stops once flushes and calls together took this many budgets
CPU_FLUSH_WALL_BUDGETS = 4.0
_cpu_flush_default = [False]
#: what a CPU timing reads: the wall clock, or the calling thread's CPU time
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_CLOCK_TAG = {time.perf_counter: "", time.thread_time: "+thread_time"}


@contextlib.contextmanager
def cpu_flush_by_default(on: bool = True) -> Iterator[None]:
    """Within the block, CPU :func:`time_fn` calls with ``flush_cache=None`` flush caches.

    For measuring kernels as a real layer runs them: once per step on data that the
    other phases have evicted, not in a hot loop. Explicit ``flush_cache`` wins.
    """
    previous, _cpu_flush_default[0] = _cpu_flush_default[0], on
    try:
        yield
    finally:
        _cpu_flush_default[0] = previous


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and 20th/80th percentiles over ``samples_s``."""

    median_s: float
    p20_s: float
    p80_s: float
    samples_s: list[float] = field(repr=False)
    threads: int
    method: str

    @property
    def n_samples(self) -> int:
        return len(self.samples_s)

    @classmethod
    def from_samples(cls, samples_s: list[float], threads: int, method: str) -> Timing:
        """Summarise raw per-call samples (seconds); at least one sample."""
        arr = np.asarray(samples_s, dtype=np.float64)
        if arr.size == 0:
            raise ValueError("no timing samples")
        p20, med, p80 = np.percentile(arr, [20, 50, 80])
        return cls(float(med), float(p20), float(p80), [float(s) for s in arr], threads, method)


def time_fn(
    fn: Callable[[], Any],
    *,
    device: str = "cpu",
    budget_s: float = 0.2,
    warmup_s: float = 0.05,
    flush_cache: bool | None = None,
    threads: int | None = None,
    prime: Callable[[], Any] | None = None,
    clock: str = "wall",
) -> Timing:
    """Time ``fn()`` (no arguments) on ``device`` ("cpu" or "cuda") for about ``budget_s``.

    ``threads`` fixes torch's intra-op thread count for the measurement (default:
    the current count), recorded in the result. ``flush_cache`` defaults to
    True on CUDA and False on CPU (CPU suites use sizes beyond the caches where
    bandwidth matters; :func:`cpu_flush_by_default` makes it True on CPU).
    ``prime``, run untimed after each flush, leaves ``fn``'s input in the caches
    as the op before it in a layer does (the router reads the rows ``permute``
    then gathers; the combine writes the rows ``unpermute`` reads).
    ``clock``: ``"wall"`` or ``"cpu"`` (this thread's CPU time; CPU device with
    ``threads == 1`` only, since other threads' work would be missed).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock = {clock!r}: allowed: {', '.join(CLOCKS)}")
    if budget_s <= 0 or warmup_s < 0:
        raise ValueError(f"budget_s must be > 0 and warmup_s >= 0, got {budget_s}, {warmup_s}")
    threads = threads or torch.get_num_threads()
    if device.startswith("cuda"):
        flush = True if flush_cache is None else flush_cache
        return _time_cuda(fn, budget_s, warmup_s, flush, threads, prime)
    if device != "cpu":
        raise ValueError(f"device = {device!r}: allowed: cpu, cuda")
    if flush_cache is None:
        flush_cache = _cpu_flush_default[0]
    if clock == "cpu" and threads != 1:
        raise ValueError(f"clock = 'cpu' needs threads = 1 (got {threads})")
    now = CLOCKS[clock]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        calls, spent = _warm_up(fn, warmup_s, sync=None)
        if flush_cache:
            return _time_cpu_flushed(fn, budget_s, threads, prime, now)
        return _time_cpu(fn, budget_s, threads, now, spent / calls)
    finally:
        torch.set_num_threads(previous)


def _warm_up(
    fn: Callable[[], Any], warmup_s: float, sync: Callable[[], None] | None
) -> tuple[int, float]:
    """Call ``fn`` until ``warmup_s`` has passed (at least once); return the call
    count and the wall seconds they took."""
    start = time.perf_counter()
    calls = 0
    while calls == 0 or time.perf_counter() - start < warmup_s:
        fn()
        if sync is not None:
            sync()
        calls += 1
    return calls, time.perf_counter() - start


#: a CPU block (calls timed together) lasts about this long
CPU_BLOCK_S = 1e-3
#: a CPU timing stops, after its budget, once IQR / median of its samples is below this
CPU_IQR_THRESHOLD = 0.1
CPU_MAX_BUDGETS = 2.0


def _time_cpu(
    fn: Callable[[], Any],
    budget_s: float,
    threads: int,
    now: Callable[[], float],
    per_call_s: float,
) -> Timing:
    number = max(1, math.ceil(CPU_BLOCK_S / max(per_call_s, 1e-9)))
    samples: list[float] = []
    total = 0.0
    gc_was_on = gc.isenabled()
    gc.disable()  # as timeit does
    try:
        while total < CPU_MAX_BUDGETS * budget_s:
            start = now()
            for _ in range(number):
                fn()
            block = now() - start
            samples.append(max(block, 1e-9) / number)
            total += block
            if len(samples) > 3 and total >= budget_s and _tight(samples):
                break
    finally:
        if gc_was_on:
            gc.enable()
    return Timing.from_samples(samples, threads, "blocks" + _CLOCK_TAG[now])


def _tight(samples: list[float]) -> bool:
    """IQR / median under :data:`CPU_IQR_THRESHOLD` (``Measurement.meets_confidence``)."""
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return bool((q3 - q1) / med < CPU_IQR_THRESHOLD)


def _time_cpu_flushed(
    fn: Callable[[], Any],
    budget_s: float,
    threads: int,
    prime: Callable[[], Any] | None,
    now: Callable[[], float] = time.perf_counter,
) -> Timing:
    scratch = torch.empty(CPU_FLUSH_BYTES // 4, dtype=torch.float32)
    samples: list[float] = []
    spent = 0.0
    wall_end = time.perf_counter() + CPU_FLUSH_WALL_BUDGETS * budget_s
    while len(samples) < 3 or (spent < budget_s and time.perf_counter() < wall_end):
        scratch.fill_(len(samples))
        if prime is not None:
            prime()
        start = now()
        fn()
        samples.append(now() - start)
        spent += samples[-1]
    method = "perf_counter+flush" + ("+prime" if prime is not None else "") + _CLOCK_TAG[now]
    return Timing.from_samples(samples, threads, method)


# ------------------------------------------------------------------------- CUDA


def _time_cuda(
    fn: Callable[[], Any],
    budget_s: float,
    warmup_s: float,
    flush: bool,
    threads: int,
    prime: Callable[[], Any] | None = None,
) -> Timing:
    _warm_up(fn, warmup_s, sync=torch.cuda.synchronize)
    if flush and prime is None:  # do_bench cannot run anything between flush and call
        samples = _triton_samples(fn, budget_s, warmup_s)
        if samples is not None:
            return Timing.from_samples(samples, threads, "triton.do_bench")
    samples = _event_samples(fn, budget_s, flush, prime if flush else None)
    return Timing.from_samples(samples, threads, "cuda-events")


def _triton_samples(fn: Callable[[], Any], budget_s: float, warmup_s: float) -> list[float] | None:
    """Per-call seconds from ``triton.testing.do_bench``, or None without a usable triton."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    try:
        ms = do_bench(
            fn,
            warmup=max(1, int(warmup_s * 1e3)),
            rep=max(1, int(budget_s * 1e3)),
            return_mode="all",
        )
    except TypeError:  # an old triton without return_mode
        return None
    return [float(t) / 1e3 for t in ms]


def _event_samples(
    fn: Callable[[], Any], budget_s: float, flush: bool, prime: Callable[[], Any] | None = None
) -> list[float]:
    """CUDA events around each call, cache overwritten (then primed) before each; one sync."""
    scratch = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush else None
    per_call = _estimate_cuda_call(fn)
    if scratch is not None:  # the flush is not timed but does take budget
        per_call += _estimate_cuda_call(scratch.zero_)
    if prime is not None:
        per_call += _estimate_cuda_call(prime)
    reps = int(min(MAX_CUDA_SAMPLES, max(5, budget_s / max(per_call, 1e-7))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        if scratch is not None:
            scratch.zero_()
        if prime is not None:
            prime()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]


def _estimate_cuda_call(fn: Callable[[], Any], calls: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / calls
