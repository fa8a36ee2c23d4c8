"""Experts suite: the SwiGLU expert FFNs over expert-major rows, every strategy.

N = T·K rows split over E experts by :func:`moesim.measure.loads.zipf_counts`
(balanced for skew 0; under skew the cold tail experts get zero tokens).
FLOPs from :func:`moesim.costs.work.expert_flops`, bytes from ``expert_bytes``
summed over experts; compute-bound, so the row is compared with the GEMM ceiling.

Strategy ``dense`` is the reference: the same N rows and FLOPs through a single
expert (E = 1, plain dense GEMMs), so a grouped path can be compared with a
dense GEMM of the same work.
"""

from __future__ import annotations

import itertools
import math

import torch

from moesim.costs import work
from moesim.kernels.experts import EXPERT_STRATEGIES, experts_forward, grouped_mm_available
from moesim.measure.grids import Grid, check_names
from moesim.measure.loads import zipf_counts
from moesim.measure.suites.common import (
    BenchContext,
    Case,
    Row,
    failed_row,
    randn,
    timed_row,
)


def supported(strategy: str, device: str, dtype: torch.dtype) -> bool:
    """False for ``grouped_mm`` where torch cannot run it on this device and dtype."""
    if strategy != "grouped_mm":
        return True
    return grouped_mm_available(torch.device(device).type, dtype)


DENSE = "dense"


def strategies() -> list[str]:
    return [*EXPERT_STRATEGIES, DENSE]


def cases(grid: Grid, dtypes: list[str], ctx: BenchContext) -> list[Case]:
    names = grid.get("strategies") or strategies()
    check_names("experts.strategies", names, strategies())
    out: list[Case] = []
    for dtype, name, T, D, F, E, K, skew in itertools.product(
        dtypes, names, grid["T"], grid["D"], grid["F"], grid["E"], grid["K"], grid["skew"]
    ):
        if name == DENSE:  # one expert holding all T·K rows: E = 1, no skew
            E, skew = 1, 0.0
        elif K > E:
            continue
        case = Case(
            "experts", "experts", strategy=name, dtype=dtype, T=T, D=D, F=F, E=E, K=K, skew=skew
        )
        if case not in out and supported(name, ctx.device, case.torch_dtype):
            out.append(case)
    return out


def working_bytes(case: Case, counts: list[int]) -> float:
    """Weights plus activations; ``bmm`` pads every expert to the largest load."""
    b = case.elem_bytes
    rows = case.E * max(counts) if case.strategy == "bmm" else sum(counts)
    return 3.0 * case.E * case.D * case.F * b + rows * (2 * case.D + 3 * case.F) * b


def measure(case: Case, ctx: BenchContext) -> Row:
    counts = zipf_counts(case.T * case.K, case.E, case.skew)
    if working_bytes(case, counts) > ctx.mem_limit_bytes:
        return failed_row(case, ctx, "oom")  # would not fit in the bench's memory limit
    E, D, F = case.E, case.D, case.F
    x_ND = randn((sum(counts), D), case, ctx, salt=30)
    w_gate = randn((E, D, F), case, ctx, salt=31, scale=1 / math.sqrt(D))
    w_up = randn((E, D, F), case, ctx, salt=32, scale=1 / math.sqrt(D))
    w_down = randn((E, F, D), case, ctx, salt=33, scale=1 / math.sqrt(F))
    # counts stay on the host: the kernels read them there, a device copy would sync per call
    tpe = torch.tensor(counts, dtype=torch.long)

    strategy = "loop" if case.strategy == DENSE else case.strategy

    def ffn() -> object:
        return experts_forward(x_ND, tpe, w_gate, w_up, w_down, strategy=strategy)

    timing = ctx.time(ffn)
    b = case.elem_bytes
    flops = float(work.expert_flops(sum(counts), D, F))
    nbytes = float(work.expert_bytes(counts, D, F, b).sum())
    return timed_row(
        case, ctx, timing, flops=flops, bytes_=nbytes, ceiling="gemm", tokens_per_expert=counts
    )
