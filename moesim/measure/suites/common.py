"""Shared pieces of the benchmark suites: the run context, a case, and row building.

Every suite turns its grid into :class:`Case` objects and measures each into one
row of :data:`moesim.measure.results.COLUMNS`. Byte and FLOP counts come from
:mod:`moesim.costs.work` so the benchmark, the fits and the simulator agree.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moesim.config.base import DTYPE_BYTES
from moesim.measure.timer import Timing, time_fn

#: dtypes the benchmark can run -> torch dtype
TORCH_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

Row = dict[str, Any]


@dataclass(frozen=True)
class BenchContext:
    """How to measure: device, timing budget per case, threads, seed, memory limit."""

    device: str = "cpu"
    device_name: str = ""
    budget_s: float = 0.2
    warmup_s: float = 0.05
    threads: int = 1
    seed: int = 0
    world: int = 2
    timeout_s: float = 300.0
    mem_limit_bytes: float = 2 * 2**30

    def time(
        self,
        fn: Callable[[], Any],
        flush_cache: bool | None = None,
        prime: Callable[[], Any] | None = None,
    ) -> Timing:
        """Time ``fn`` with this context's device, budget and threads (``prime``: see time_fn).

        Single-threaded CPU kernels are timed on the thread's CPU clock
        (:attr:`clock`), so other processes on a shared host do not stretch them.
        """
        return time_fn(
            fn,
            device=self.device,
            budget_s=self.budget_s,
            warmup_s=self.warmup_s,
            flush_cache=flush_cache,
            threads=self.threads,
            prime=prime,
            clock=self.clock,
        )

    @property
    def clock(self) -> str:
        """``cpu`` (thread CPU time) for one-thread CPU timings, else ``wall``."""
        return "cpu" if self.device == "cpu" and self.threads == 1 else "wall"

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run seed (tensors are made on CPU, then moved)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


@dataclass(frozen=True)
class Case:
    """One point of a suite's grid (what becomes one result row)."""

    suite: str
    op: str
    strategy: str = ""
    dtype: str = "fp32"
    T: int = 0
    D: int = 0
    F: int = 0
    E: int = 0
    K: int = 0
    skew: float = 0.0
    split: str = ""
    world: int = 1
    msg_bytes: int = 0
    extra: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def elem_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def label(self) -> str:
        """Short text for progress bars: ``experts/bmm T=128 E=16 skew=2``."""
        name = f"{self.suite}/{self.op}" + (f"/{self.strategy}" if self.strategy else "")
        dims = [f"{k}={v}" for k, v in (("T", self.T), ("D", self.D), ("E", self.E)) if v]
        if self.skew:
            dims.append(f"skew={self.skew:g}")
        if self.msg_bytes:
            dims.append(f"{self.msg_bytes}B {self.split}")
        return " ".join([name, *dims])

    def base_row(self, ctx: BenchContext) -> Row:
        """The identifying columns of this case's row."""
        row = {k: v for k, v in asdict(self).items() if k != "extra"}
        row.update(device=ctx.device, device_name=ctx.device_name)
        return row


def timed_row(
    case: Case,
    ctx: BenchContext,
    timing: Timing,
    *,
    flops: float = 0.0,
    bytes_: float = 0.0,
    ceiling: str = "",
    tokens_per_expert: Sequence[int] | None = None,
) -> Row:
    """A complete ``ok`` row: timing statistics plus achieved GB/s and TFLOP/s."""
    row = case.base_row(ctx)
    t = timing.median_s
    row.update(
        median_s=t,
        p20_s=timing.p20_s,
        p80_s=timing.p80_s,
        n_samples=timing.n_samples,
        samples_s=timing.samples_s,
        flops=float(flops),
        bytes=float(bytes_),
        achieved_GBps=float(bytes_) / t / 1e9 if bytes_ and t > 0 else float("nan"),
        achieved_TFLOPs=float(flops) / t / 1e12 if flops and t > 0 else float("nan"),
        ceiling=ceiling,
        tokens_per_expert=json.dumps([int(c) for c in tokens_per_expert])
        if tokens_per_expert is not None
        else "",
        status="ok",
    )
    return row


def failed_row(case: Case, ctx: BenchContext, status: str) -> Row:
    """A row for a case that could not be measured (``oom`` or ``error: ...``)."""
    row = case.base_row(ctx)
    row["status"] = status
    return row


def is_oom(err: BaseException) -> bool:
    """True for CUDA and CPU allocation failures."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    if isinstance(err, (oom_type, MemoryError)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text


def device_name(device: str) -> str:
    """Human name of the device: the GPU's name, or the CPU model."""
    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def randn(
    shape: Sequence[int], case: Case, ctx: BenchContext, salt: int, scale: float = 1.0
) -> torch.Tensor:
    """Seeded normal tensor in the case's dtype, drawn on the context's device (GPU-sized
    inputs are not built on the host)."""
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed * 1_000_003 + salt)
    t = torch.randn(tuple(shape), generator=gen, device=ctx.device, dtype=case.torch_dtype)
    return t.mul_(scale) if scale != 1.0 else t


def synchronize(ctx: BenchContext) -> None:
    if ctx.device.startswith("cuda"):
        torch.cuda.synchronize()
