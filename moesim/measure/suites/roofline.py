"""Roofline suite: the device's own memory-copy bandwidth and dense GEMM throughput.

``copy``: ``dst.copy_(src)`` of ``copy_MiB`` buffers; bytes = read + write.
``gemm``: ``C = A @ B`` with square M = N = K; FLOPs = 2·M³, bytes = 3·M²·b.
The best of each in a run is the ceiling every other row is compared with.
``loss`` (only where the grid names ``loss_T`` and ``loss_V``): the LM head's
cross-entropy forward over ``T x V`` logits (the vocabulary in the ``D`` column);
bytes = two passes over the logits, as :func:`moesim.model.ops.loss_bytes` prices it.
On a CPU its ``exp`` makes it slower than a copy of those bytes (measured here:
1024 x 2048 fp32, 3.7 ms, against about 1.6 ms at the copy rate).
"""

from __future__ import annotations

import itertools

import torch

from moesim.measure.grids import Grid
from moesim.measure.suites.common import BenchContext, Case, Row, randn, timed_row


def cases(grid: Grid, dtypes: list[str], ctx: BenchContext) -> list[Case]:
    """Copies in the first dtype (bandwidth does not depend on it), GEMMs in every dtype."""
    out = []
    for mib in grid["copy_MiB"]:
        elements = int(mib * 2**20 / Case("roofline", "copy", dtype=dtypes[0]).elem_bytes)
        out.append(Case("roofline", "copy", dtype=dtypes[0], T=elements))
    for dtype, m in itertools.product(dtypes, grid["gemm"]):
        out.append(Case("roofline", "gemm", dtype=dtype, T=m, D=m, F=m))
    for T, V in itertools.product(grid.get("loss_T", []), grid.get("loss_V", [])):
        out.append(Case("roofline", "loss", dtype=dtypes[0], T=T, D=V))
    return out


def measure(case: Case, ctx: BenchContext) -> Row:
    if case.op == "copy":
        return _copy(case, ctx)
    if case.op == "loss":
        return _loss(case, ctx)
    return _gemm(case, ctx)


def _loss(case: Case, ctx: BenchContext) -> Row:
    logits_TV = randn((case.T, case.D), case, ctx, salt=5)
    g = torch.Generator(device="cpu").manual_seed(case.T * 31 + case.D)
    targets_T = torch.randint(case.D, (case.T,), generator=g).to(ctx.device)
    timing = ctx.time(lambda: torch.nn.functional.cross_entropy(logits_TV, targets_T))
    nbytes = 2.0 * case.T * case.D * case.elem_bytes
    return timed_row(case, ctx, timing, bytes_=nbytes, ceiling="copy")


def _copy(case: Case, ctx: BenchContext) -> Row:
    # a copy's time does not depend on the values: a fill writes the pages as fast as
    # memory takes them, a normal draw of the larger buffers took seconds here
    src = torch.full((case.T,), 1.0, dtype=case.torch_dtype, device=ctx.device)
    dst = torch.empty_like(src)
    # buffers are larger than the caches that matter; a flush would only add noise
    timing = ctx.time(lambda: dst.copy_(src), flush_cache=False)
    return timed_row(case, ctx, timing, bytes_=2.0 * case.T * case.elem_bytes, ceiling="copy")


def _gemm(case: Case, ctx: BenchContext) -> Row:
    m = case.T
    a = randn((m, m), case, ctx, salt=2)
    b = randn((m, m), case, ctx, salt=3)
    c = torch.empty_like(a)
    timing = ctx.time(lambda: torch.mm(a, b, out=c))
    flops = 2.0 * m**3
    return timed_row(
        case, ctx, timing, flops=flops, bytes_=3.0 * m * m * case.elem_bytes, ceiling="gemm"
    )
