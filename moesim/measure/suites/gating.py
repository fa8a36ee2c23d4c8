"""Gating suite: the router GEMM plus every router kind of :data:`moesim.kernels.gating.ROUTERS`.

Timed: ``route(router_logits(x_TD, W_DE, spec), spec)``. Bytes and FLOPs from
:func:`moesim.costs.work.gate_bytes` / ``gate_flops``; memory-bound, so the row
is compared with the copy ceiling.
"""

from __future__ import annotations

import itertools
import math

import torch

from moesim.config.router import TOP1_KINDS, RouterSpec
from moesim.costs import work
from moesim.kernels.gating import ROUTERS, route, router_logits
from moesim.measure.grids import Grid
from moesim.measure.suites.common import BenchContext, Case, Row, randn, timed_row

_TOP1 = TOP1_KINDS  # one source: moesim/config/router.py


def router_spec(kind: str, K: int, E: int) -> RouterSpec:
    """The spec a kind is benchmarked with: k = 1 for top-1 kinds, k = E for soft."""
    top_k = 1 if kind in _TOP1 else E if kind == "soft" else K
    return RouterSpec(kind=kind, top_k=top_k)


def cases(grid: Grid, dtypes: list[str], ctx: BenchContext) -> list[Case]:
    kinds = grid.get("routers") or list(ROUTERS)
    out = []
    for dtype, kind, T, D, E, K in itertools.product(
        dtypes, kinds, grid["T"], grid["D"], grid["E"], grid["K"]
    ):
        if K > E:
            continue
        k = router_spec(kind, K, E).top_k
        out.append(Case("gating", kind, dtype=dtype, T=T, D=D, E=E, K=k))
    return out


def measure(case: Case, ctx: BenchContext) -> Row:
    spec = router_spec(case.op, case.K, case.E)
    x_TD = randn((case.T, case.D), case, ctx, salt=10)
    w_DE = randn((case.D, case.E), case, ctx, salt=11, scale=1 / math.sqrt(case.D))
    noise = (
        torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        if case.op == "noisy_topk"
        else None
    )

    def gate() -> object:
        return route(router_logits(x_TD, w_DE, spec), spec, generator=noise)

    timing = ctx.time(gate)
    b = case.elem_bytes
    return timed_row(
        case,
        ctx,
        timing,
        flops=float(work.gate_flops(case.T, case.D, case.E)),
        bytes_=float(work.gate_bytes(case.T, case.D, case.E, case.K, b)),
        ceiling="copy",
    )
