"""Dispatch suite: permute and unpermute, timed separately, for every strategy.

Strategies: every entry of :data:`moesim.kernels.dispatch.DISPATCH_STRATEGIES`
(dropless) plus ``sort_padded`` (``sort`` into a capacity buffer with
``capacity_factor`` 1.25 and ``pad_to_capacity``, Megatron-Core's padded
layout) and ``sort_chunks``, whose one op ``regroup`` sorts the ``T*K`` rows a
rank receives from ``world`` sources expert-major and back
(:func:`moesim.kernels.dispatch.sort_chunks`, ``E / world`` local experts).
Loads are balanced (skew 0) or Zipf-skewed: a real softmax top-k router runs on
logits built by :func:`moesim.measure.loads.skewed_logits_TE`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from moesim.config.router import RouterSpec
from moesim.costs import work
from moesim.kernels.dispatch import DISPATCH_STRATEGIES, permute, sort_chunks, unpermute
from moesim.kernels.gating import Routing, route
from moesim.measure.grids import Grid, check_names
from moesim.measure.loads import skewed_logits_TE
from moesim.measure.suites.common import BenchContext, Case, Row, failed_row, randn, timed_row

PADDED = "sort_padded"
PADDED_CAPACITY_FACTOR = 1.25
CHUNKS = "sort_chunks"


def strategies() -> list[str]:
    return [*DISPATCH_STRATEGIES, PADDED, CHUNKS]


def _ops(strategy: str, E: int, world: int) -> tuple[str, ...]:
    if strategy == CHUNKS:  # only where a rank holds more than one expert
        return ("regroup",) if E % world == 0 and E // world > 1 else ()
    return ("permute", "unpermute")


def cases(grid: Grid, dtypes: list[str], ctx: BenchContext) -> list[Case]:
    names = grid.get("strategies") or strategies()
    check_names("dispatch.strategies", names, strategies())
    out = []
    for dtype, name, T, D, E, K, skew in itertools.product(
        dtypes, names, grid["T"], grid["D"], grid["E"], grid["K"], grid["skew"]
    ):
        if K > E:
            continue
        world = ctx.world if name == CHUNKS else 1
        out += [
            Case("dispatch", op, name, dtype, T=T, D=D, E=E, K=K, skew=skew, world=world)
            for op in _ops(name, E, ctx.world)
        ]
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


def touch(*tensors: torch.Tensor) -> Callable[[], None]:
    """Read every tensor once: what the op before leaves in the caches."""

    def prime() -> None:
        for t in tensors:
            t.sum()

    return prime


def measure(case: Case, ctx: BenchContext) -> Row:
    if case.strategy == CHUNKS:
        return _measure_regroup(case, ctx)
    padded = case.strategy == PADDED
    strategy = "sort" if padded else case.strategy
    routing = skewed_routing(case, ctx, padded)
    if strategy == "einsum" and einsum_bytes(case, routing) > ctx.mem_limit_bytes:
        return failed_row(case, ctx, "oom")  # would not fit in the bench's memory limit
    x_TD = randn((case.T, case.D), case, ctx, salt=21)
    x_ND, _, state = permute(x_TD, routing, strategy=strategy, num_experts=case.E)
    b = case.elem_bytes
    # where caches are flushed, each op's input is primed: in a layer the router has
    # just read the rows permute gathers, and the combine just wrote unpermute's rows
    if case.op == "permute":
        timing = ctx.time(
            lambda: permute(x_TD, routing, strategy=strategy, num_experts=case.E),
            prime=touch(x_TD, routing.expert_ids_TK),
        )
        nbytes = work.permute_bytes(case.T, case.D, case.K, b)
    else:
        timing = ctx.time(lambda: unpermute(x_ND, state, strategy=strategy), prime=touch(x_ND))
        nbytes = work.unpermute_bytes(case.T, case.D, case.K, b)
    loads = routing.tokens_per_expert().tolist()
    return timed_row(
        case, ctx, timing, bytes_=float(nbytes), ceiling="copy", tokens_per_expert=loads
    )


def _measure_regroup(case: Case, ctx: BenchContext) -> Row:
    """Sort the T*K rows one rank receives expert-major, and back, as an EP layer does.

    The chunk sizes are the routing's per-expert loads: expert ``e`` lives on rank
    ``e // El`` and every one of ``world`` sources sends it an equal share.
    """
    routing = skewed_routing(case, ctx)
    El = case.E // case.world
    per_expert_E = routing.tokens_per_expert().to(torch.int64)
    local_El = per_expert_E.view(case.world, El).sum(0)
    counts_REl = torch.stack([local_El // case.world] * case.world)
    counts_REl[0] += local_El - counts_REl.sum(0)
    x_MD = randn((int(counts_REl.sum()), case.D), case, ctx, salt=22)

    def there_and_back() -> torch.Tensor:
        return sort_chunks(sort_chunks(x_MD, counts_REl), counts_REl, inverse=True)

    timing = ctx.time(there_and_back, prime=touch(x_MD))  # the dispatch just wrote x_MD
    nbytes = work.regroup_bytes(int(counts_REl.sum()), case.D, case.elem_bytes)
    return timed_row(
        case, ctx, timing, bytes_=float(nbytes), ceiling="copy", tokens_per_expert=local_El.tolist()
    )
