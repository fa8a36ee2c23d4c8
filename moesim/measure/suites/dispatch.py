"""Dispatch suite: permute and unpermute, timed separately, for every strategy.

Strategies: every entry of :data:`moesim.kernels.dispatch.DISPATCH_STRATEGIES`
(dropless) plus ``sort_padded`` (``sort`` into a capacity buffer with
``capacity_factor`` 1.25 and ``pad_to_capacity``, Megatron-Core's padded
layout). Loads are balanced (skew 0) or Zipf-skewed: a real softmax top-k
router runs on logits built by :func:`moesim.measure.loads.skewed_logits_TE`.
"""

from __future__ import annotations

import itertools
from typing import Any

from moesim.config.router import RouterSpec
from moesim.costs import work
from moesim.kernels.dispatch import DISPATCH_STRATEGIES, permute, unpermute
from moesim.kernels.gating import Routing, route
from moesim.measure.grids import Grid, check_names
from moesim.measure.loads import skewed_logits_TE
from moesim.measure.suites.common import BenchContext, Case, Row, failed_row, randn, timed_row

PADDED = "sort_padded"
PADDED_CAPACITY_FACTOR = 1.25


def strategies() -> list[str]:
    return [*DISPATCH_STRATEGIES, PADDED]


def cases(grid: Grid, dtypes: list[str], ctx: BenchContext) -> list[Case]:
    names = grid.get("strategies") or strategies()
    check_names("dispatch.strategies", names, strategies())
    out = []
    for dtype, name, T, D, E, K, skew, op in itertools.product(
        dtypes,
        names,
        grid["T"],
        grid["D"],
        grid["E"],
        grid["K"],
        grid["skew"],
        ("permute", "unpermute"),
    ):
        if K <= E:
            out.append(
                Case("dispatch", op, strategy=name, dtype=dtype, T=T, D=D, E=E, K=K, skew=skew)
            )
    return out


def skewed_routing(case: Case, ctx: BenchContext, padded: bool = False) -> Routing:
    """A softmax top-k routing of ``case.T`` tokens whose load follows Zipf(``case.skew``)."""
    extra: dict[str, Any] = {}
    if padded:
        extra = {"capacity_factor": PADDED_CAPACITY_FACTOR, "pad_to_capacity": True}
    spec = RouterSpec(kind="softmax_topk", top_k=case.K, **extra)
    logits = skewed_logits_TE(case.T, case.E, case.skew, ctx.generator(20), device=ctx.device)
    return route(logits, spec)


def einsum_bytes(case: Case, routing: Routing) -> float:
    """Working set of the einsum strategy: [T, E, C] dispatch + combine masks, [E, C, D] buffer."""
    C = int(routing.tokens_per_expert().max()) if case.T else 0
    return case.T * case.E * C * (case.elem_bytes + 4.0) + case.E * C * case.D * case.elem_bytes


def measure(case: Case, ctx: BenchContext) -> Row:
    padded = case.strategy == PADDED
    strategy = "sort" if padded else case.strategy
    routing = skewed_routing(case, ctx, padded)
    if strategy == "einsum" and einsum_bytes(case, routing) > ctx.mem_limit_bytes:
        return failed_row(case, ctx, "oom")  # would not fit in the bench's memory limit
    x_TD = randn((case.T, case.D), case, ctx, salt=21)
    x_ND, _, state = permute(x_TD, routing, strategy=strategy, num_experts=case.E)
    b = case.elem_bytes
    if case.op == "permute":
        timing = ctx.time(lambda: permute(x_TD, routing, strategy=strategy, num_experts=case.E))
        nbytes = work.permute_bytes(case.T, case.D, case.K, b)
    else:
        timing = ctx.time(lambda: unpermute(x_ND, state, strategy=strategy))
        nbytes = work.unpermute_bytes(case.T, case.D, case.K, b)
    loads = routing.tokens_per_expert().tolist()
    return timed_row(
        case, ctx, timing, bytes_=float(nbytes), ceiling="copy", tokens_per_expert=loads
    )
