"""Gating suite: the router GEMM plus every router kind of :data:`moesim.kernels.gating.ROUTERS`.

Timed: ``route(router_logits(x_TD, W_DE, spec), spec, bias_E)``. Bytes and FLOPs
from :func:`moesim.costs.work.gate_bytes` / ``gate_flops``; memory-bound, so the
row is compared with the copy ceiling. ``sigmoid_topk.grouped``
(:data:`moesim.config.router.GROUPED_SIGMOID`) is DeepSeek-V3's router: sigmoid
scores, a selection-only correction bias, group-limited top-k (``n_group`` =
min(8, E / 2) groups, the best half of them searched: V3's 8 and 4 at E = 256)
and ``routed_scaling_factor`` 2.5; shapes whose groups cannot reach k experts
are skipped.
"""

from __future__ import annotations

import itertools
import math

import torch

from moesim.config.router import GROUPED_SIGMOID, TOP1_KINDS, RouterSpec
from moesim.costs import work
from moesim.kernels.gating import ROUTERS, route, router_logits
from moesim.measure.grids import Grid
from moesim.measure.suites.common import BenchContext, Case, Row, randn, timed_row

_TOP1 = TOP1_KINDS  # one source: moesim/config/router.py


#: DeepSeek-V3's router options besides the groups (config.json of deepseek-ai/DeepSeek-V3)
_V3_SCALING = 2.5


def router_spec(kind: str, K: int, E: int) -> RouterSpec | None:
    """The spec a kind is benchmarked with: k = 1 for top-1 kinds, k = E for soft.

    None where the kind cannot route this shape (grouped routing with too few
    experts per group or groups too small to reach k experts).
    """
    if kind == GROUPED_SIGMOID:
        groups = min(8, E // 2)
        if groups < 2 or E % groups or (groups // 2) * (E // groups) < K:
            return None
        return RouterSpec(
            kind="sigmoid_topk",
            top_k=K,
            normalize=True,
            n_group=groups,
            topk_group=groups // 2,
            routed_scaling_factor=_V3_SCALING,
        )
    top_k = 1 if kind in _TOP1 else E if kind == "soft" else K
    return RouterSpec(kind=kind, top_k=top_k)


def cases(grid: Grid, dtypes: list[str], ctx: BenchContext) -> list[Case]:
    kinds = grid.get("routers") or list(ROUTERS)
    out = []
    for dtype, kind, T, D, E, K in itertools.product(
        dtypes, kinds, grid["T"], grid["D"], grid["E"], grid["K"]
    ):
        spec = router_spec(kind, K, E) if K <= E else None
        if spec is not None:
            out.append(Case("gating", kind, dtype=dtype, T=T, D=D, E=E, K=spec.top_k))
    return out


def measure(case: Case, ctx: BenchContext) -> Row:
    spec = router_spec(case.op, case.K, case.E)
    assert spec is not None  # cases() made only routable shapes
    x_TD = randn((case.T, case.D), case, ctx, salt=10)
    w_DE = randn((case.D, case.E), case, ctx, salt=11, scale=1 / math.sqrt(case.D))
    # the selection-only correction bias (DeepSeek-V3's e_score_correction_bias)
    bias_E = randn((case.E,), case, ctx, salt=12, scale=0.01) if spec.n_group else None
    noise = (
        torch.Generator(device=ctx.device).manual_seed(ctx.seed)
        if case.op == "noisy_topk"
        else None
    )

    def gate() -> object:
        return route(router_logits(x_TD, w_DE, spec), spec, bias_E, generator=noise)

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
