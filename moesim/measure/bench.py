"""Run benchmark suites over their grids and write one tidy results file.

``run_bench(["gating", "experts"], device="cpu", quick=True)`` measures every
case of the chosen suites (the roofline suite always runs first: its copy
bandwidth and GEMM throughput are the ceilings every row's ``pct_of_ceiling``
is computed against), checkpoints the file after every suite, and writes it
with ``complete: true`` at the end. Ctrl-C writes the rows measured so far
(``complete: false``) and raises :class:`BenchInterrupted` carrying the path.
A case that runs out of memory becomes a row with status ``oom``; any other
failure of one case a row with status ``error: ...``; the run goes on. The
metadata carries the ceilings and the headline figures of
:mod:`moesim.measure.targets`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moesim.errors import UserError
from moesim.io import provenance
from moesim.measure.ceilings import apply_ceilings
from moesim.measure.distributed import under_torchrun
from moesim.measure.grids import SUITES as SUITE_ORDER
from moesim.measure.grids import Grid, check_grids, resolve_grids
from moesim.measure.host import cpu_times, steal_since
from moesim.measure.results import results_path, to_frame, write_results
from moesim.measure.suites import SUITES, BenchContext, Case, Row, Suite
from moesim.measure.suites.common import TORCH_DTYPES, device_name, failed_row, is_oom
from moesim.measure.targets import target_figures

#: ``progress(total, description)`` -> context manager yielding ``advance(n=1, description=None)``
Progress = Callable[[int, str], AbstractContextManager[Callable[..., None]]]

QUICK_BUDGET_S, QUICK_WARMUP_S = 0.05, 0.01
#: passes over each kernel suite's cases, quick and full grids (the budget is split
#: over them, the fastest kept); a pass costs each case's set-up again (quick: +50 %)
QUICK_PASSES, FULL_PASSES = 1, 2
FULL_BUDGET_S, FULL_WARMUP_S = 0.25, 0.05


class BenchInterrupted(KeyboardInterrupt):
    """The run was interrupted; ``path`` holds the rows measured so far (complete: false)."""

    def __init__(self, path: Path, rows: int) -> None:
        super().__init__(f"interrupted; kept {rows} rows in {path}")
        self.path = path
        self.rows = rows


def run_bench(
    suites: Sequence[str],
    *,
    device: str = "cpu",
    dtype: str | Sequence[str] = "fp32",
    quick: bool = False,
    out_dir: str | Path = "results",
    progress: Progress | None = None,
    grids: dict[str, Grid] | None = None,
    world: int | None = None,
    threads: int | None = None,
    budget_s: float | None = None,
    seed: int = 0,
    csv: bool = False,
) -> Path:
    """Measure ``suites`` on ``device`` in each dtype; return the parquet path written.

    ``grids`` overrides axes of the default grids (see :mod:`moesim.measure.grids`);
    ``world`` is the all-to-all rank count (default 2 on CPU, the GPU count on
    CUDA); ``threads`` torch's intra-op threads (default 1 on CPU, see
    :func:`default_threads`);
    ``budget_s`` the timing budget per case. ``csv`` also writes a CSV copy.
    Raises :class:`UserError` for bad arguments.
    """
    names = check_suites(suites)
    dtypes = check_dtypes(dtype)
    ctx = make_context(device, quick, world, threads, budget_s, seed)
    overrides = check_grids(grids or {})
    plan = make_plan(names, dtypes, ctx, resolve_grids(names, ctx.device, quick, overrides))
    path = results_path(out_dir, ctx.device)
    meta = _meta(ctx, names, dtypes, quick, plan)
    passes = QUICK_PASSES if quick else FULL_PASSES
    meta["passes"] = passes
    runner = _Runner(plan, ctx, path, meta, csv, passes)
    return runner.run(progress if progress and is_writer() else _no_progress)


# ------------------------------------------------------------------ checking


def check_suites(suites: Sequence[str]) -> list[str]:
    """Known suite names in run order, roofline first (added: its ceilings are needed)."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise UserError(f"--suite = {','.join(suites)}: allowed: {', '.join(SUITE_ORDER)}")
    return [s for s in SUITE_ORDER if s in suites or s == "roofline"]


def check_dtypes(dtype: str | Sequence[str]) -> list[str]:
    dtypes = [d.strip() for d in dtype.split(",")] if isinstance(dtype, str) else list(dtype)
    bad = [d for d in dtypes if d not in TORCH_DTYPES]
    if bad or not dtypes:
        raise UserError(f"--dtype = {','.join(dtypes)}: allowed: {', '.join(TORCH_DTYPES)}")
    return list(dict.fromkeys(dtypes))


def make_context(
    device: str,
    quick: bool,
    world: int | None,
    threads: int | None,
    budget_s: float | None,
    seed: int,
) -> BenchContext:
    """Validate the device and sizes; build the measurement context."""
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device = {device!r}: allowed: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device = 'cuda': no CUDA device is available (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu"
        )
    world = _world(device, world)
    if threads is not None and threads < 1:
        raise UserError(f"--threads = {threads}: must be >= 1")
    if budget_s is not None and budget_s <= 0:
        raise UserError(f"budget_s = {budget_s}: must be > 0")
    return BenchContext(
        device=device,
        device_name=device_name(device),
        budget_s=budget_s or (QUICK_BUDGET_S if quick else FULL_BUDGET_S),
        warmup_s=QUICK_WARMUP_S if quick else FULL_WARMUP_S,
        threads=threads or default_threads(device),
        seed=seed,
        world=world,
        mem_limit_bytes=_memory_limit(device),
    )


def default_threads(device: str) -> int:
    """1 on CPU: with more, a loaded or shared machine stalls every parallel region for a
    scheduler slice and timings jump 10-100x; torch's own count on CUDA (host side only)."""
    return 1 if device == "cpu" else torch.get_num_threads()


def _world(device: str, world: int | None) -> int:
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    if world is None:
        return max(1, torch.cuda.device_count()) if device == "cuda" else 2
    if world < 1:
        raise UserError(f"--world = {world}: must be >= 1")
    if device == "cuda" and world > torch.cuda.device_count():
        raise UserError(f"--world = {world}: only {torch.cuda.device_count()} GPU(s) here")
    return world


def _memory_limit(device: str) -> float:
    """Bytes one case may use: 70 % of free GPU memory, or min(1 GiB, 10 % of RAM) on CPU
    (a bigger CPU case would also take minutes per call)."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return 0.7 * free
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    return float(min(2**30, 0.1 * ram))


def make_plan(
    names: list[str], dtypes: list[str], ctx: BenchContext, grids: dict[str, Grid]
) -> list[tuple[Suite, list[Case]]]:
    """Every suite with the cases of its grid, in run order."""
    return [(SUITES[n], SUITES[n].cases(grids[n], dtypes, ctx)) for n in names]


def _meta(
    ctx: BenchContext, names: list[str], dtypes: list[str], quick: bool, plan: list[Any]
) -> dict[str, Any]:
    meta = provenance()
    meta.update(
        device=ctx.device,
        device_name=ctx.device_name,
        threads=ctx.threads,
        clock=ctx.clock,  # kernels (not all-to-all) timed on the wall or the thread CPU clock
        torch=torch.__version__,
        cuda=torch.version.cuda,
        suites=names,
        dtypes=dtypes,
        quick=quick,
        budget_s=ctx.budget_s,
        world=ctx.world,
        seed=ctx.seed,
        cases=sum(len(cases) for _, cases in plan),
        complete=False,
    )
    return meta


def is_writer() -> bool:
    """False on torchrun ranks other than 0: they measure but write and show nothing."""
    return not under_torchrun() or os.environ.get("RANK") == "0"


@contextmanager
def _no_progress(total: int, description: str) -> Iterator[Callable[..., None]]:
    yield lambda n=1, description=None: None


# ------------------------------------------------------------------- running


class _Runner:
    """Measures a plan row by row, checkpointing to ``path``."""

    def __init__(
        self,
        plan: list[tuple[Suite, list[Case]]],
        ctx: BenchContext,
        path: Path,
        meta: dict[str, Any],
        csv: bool,
        passes: int = 1,
    ) -> None:
        self.plan, self.ctx, self.path, self.meta, self.csv = plan, ctx, path, meta, csv
        self.passes = passes
        self.rows: list[Row] = []
        self.writer = is_writer()
        self.cpu_before = cpu_times()

    def run(self, progress: Progress) -> Path:
        total = sum(len(c) * (1 if s.measure_many else self.passes) for s, c in self.plan)
        start = time.perf_counter()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.ctx.threads)
        try:
            with progress(total, f"bench {self.ctx.device}") as advance:
                for suite, cases in self.plan:
                    self._run_suite(suite, cases, advance)
                    self._write(complete=False, wall_s=time.perf_counter() - start)
        except KeyboardInterrupt:
            self._write(complete=False, wall_s=time.perf_counter() - start)
            raise BenchInterrupted(self.path, len(self.rows)) from None
        finally:
            torch.set_num_threads(previous_threads)
        return self._write(complete=True, wall_s=time.perf_counter() - start)

    def _run_suite(self, suite: Suite, cases: list[Case], advance: Callable[..., None]) -> None:
        if suite.measure_many is not None:
            if cases:
                advance(
                    0, description=f"{suite.name}: {len(cases)} cases on {self.ctx.world} ranks"
                )
            self.rows.extend(_measure_many(suite, cases, self.ctx))
            advance(len(cases))
            return
        # ``passes`` passes over the suite's cases, each with its share of the budget; a
        # case keeps its fastest pass: a disturbance (a neighbour's burst, a clock
        # dip) that slows one pass of a case whole no longer bends its family's fit
        ctx = replace(self.ctx, budget_s=self.ctx.budget_s / self.passes)
        best: list[Row | None] = [None] * len(cases)
        try:
            for _ in range(self.passes):
                for i, case in enumerate(cases):
                    advance(0, description=case.label())
                    best[i] = _faster(best[i], _measure_one(suite, case, ctx))
                    advance(1)
        finally:  # interrupted too: the cases measured so far are kept
            self.rows.extend(row for row in best if row is not None)

    def _write(self, *, complete: bool, wall_s: float) -> Path:
        ceilings = apply_ceilings(self.rows)
        frame = to_frame(self.rows)
        meta = dict(
            self.meta,
            complete=complete,
            wall_s=round(wall_s, 3),
            ceilings=ceilings,
            targets=target_figures(frame),
            cpu_steal=steal_since(self.cpu_before),  # hypervisor's share
        )
        if self.writer:
            write_results(frame, self.path, meta)
            if self.csv:
                write_results(frame, self.path.with_suffix(".csv"), meta)
        return self.path


def _faster(a: Row | None, b: Row) -> Row:
    """Of two measurements of one case, the measured one with the lower median."""
    if a is None or a.get("status") != "ok":
        return b
    if b.get("status") != "ok":
        return a
    return b if b["median_s"] < a["median_s"] else a


def _measure_one(suite: Suite, case: Case, ctx: BenchContext) -> Row:
    assert suite.measure is not None
    try:
        return suite.measure(case, ctx)
    except Exception as err:  # one bad shape must not end the run
        return failed_row(case, ctx, _status(err, ctx))


def _measure_many(suite: Suite, cases: list[Case], ctx: BenchContext) -> list[Row]:
    assert suite.measure_many is not None
    try:
        return suite.measure_many(cases, ctx)
    except Exception as err:
        status = _status(err, ctx)
        return [failed_row(case, ctx, status) for case in cases]


def _status(err: BaseException, ctx: BenchContext) -> str:
    if is_oom(err):
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
        return "oom"
    text = " ".join(str(err).split())
    return f"error: {type(err).__name__}: {text[:200]}"
