"""Tune a parallel layout the way a published run was tuned: the best feasible one of a grid.

Some sources report only the best figure over a layout search they do not
list (arXiv 2504.14960, Table 1: "the MFU achieved with the optimal parallelism
configuration found by tuning its supported parallelism dimensions"). Such a
row carries a :class:`LayoutGrid`; moesim runs the same search and compares its
best with the published best.

Every grid point ``(tp, cp, pp, vpp, ep, etp)`` becomes a scenario of the same
model, cluster and global batch: ``tokens_per_gpu = micro_batch * seq / (tp*cp)``
(sequence parallel shards), ``micro_batches = global_batch / (micro_batch * dp)``,
``vpp > 1`` runs the interleaved schedule. Its recompute is the lightest of
``grid.recompute`` whose predicted peak memory fits the GPU (as a user tunes
it). Without folding (``grid.folding`` false, Megatron-Core before folding) the
MoE layers reuse the attention mapping: ``etp = tp`` and EP inside the
data-parallel group, ``ep | dp * cp``.

The search runs in two stages over the feasible points. First every attention
layout ``(tp, cp, pp, vpp)`` is simulated once, with its MoE mapping of the
largest ``ep`` and then the smallest ``etp`` ("EP over ETP", the paper's section
4.4). Then a steepest ascent starts at the best of those: it simulates, in each
dimension, the nearest feasible point below and above (the other dimensions
kept), moves to the best while the metric improves, and stops at a local
optimum. Torch-free.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from moesim.config.base import Frozen
from moesim.config.hardware import HardwareProfile
from moesim.config.scenario import Scenario
from moesim.errors import ConfigError

Recompute = Literal["none", "selective", "full"]
RECOMPUTE: tuple[Recompute, ...] = ("none", "selective", "full")  # lightest first
DIMS = ("tp", "cp", "pp", "vpp", "ep", "etp")


class LayoutGrid(Frozen):
    """The layouts a row's source tuned over, and the batch every layout keeps."""

    global_batch: int = Field(ge=1)  # sequences per optimizer step
    micro_batch: int = Field(default=1, ge=1)  # sequences per micro-batch of one DP rank
    tp: list[int] = Field(default_factory=lambda: [1], min_length=1)
    cp: list[int] = Field(default_factory=lambda: [1], min_length=1)
    pp: list[int] = Field(default_factory=lambda: [1], min_length=1)
    vpp: list[int] = Field(default_factory=lambda: [1], min_length=1)
    ep: list[int] = Field(default_factory=lambda: [1], min_length=1)
    etp: list[int] = Field(default_factory=lambda: [1], min_length=1)
    recompute: list[Recompute] = Field(default_factory=lambda: list(RECOMPUTE), min_length=1)
    folding: bool = True  # False: etp = tp and ep divides dp * cp (no MoE Parallel Folding)


Point = tuple[int, int, int, int, int, int]  # (tp, cp, pp, vpp, ep, etp)


@dataclass(frozen=True)
class Candidate:
    point: Point
    scenario: Scenario
    peak_GiB: float

    @property
    def label(self) -> str:
        return layout_label(self.scenario)


@dataclass
class SearchResult:
    best: Candidate
    value: float
    evaluated: dict[Point, float] = field(default_factory=dict)
    feasible: int = 0
    grid_points: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": self.best.label,
            "value": self.value,
            "peak_GiB": self.best.peak_GiB,
            "grid_points": self.grid_points,
            "feasible": self.feasible,
            "simulated": len(self.evaluated),
        }


def layout_label(scn: Scenario) -> str:
    """``attn tp2 cp1 dp8 pp8 vpp1 | moe etp1 ep8 edp2 | recompute none``."""
    p = scn.parallel
    n = scn.cluster.num_gpus
    return (
        f"attn tp{p.tp} cp{p.cp} dp{p.attention_dp(n)} pp{p.pp} vpp{p.vpp} | "
        f"moe etp{p.etp} ep{p.ep} edp{p.expert_dp(n)} | recompute "
        f"{scn.workload.recompute_granularity}"
    )


def grid_points(grid: LayoutGrid) -> Iterator[Point]:
    yield from itertools.product(*(sorted(set(getattr(grid, d))) for d in DIMS))


def layout_scenario(base: Scenario, grid: LayoutGrid, point: Point, recompute: str) -> Scenario:
    """``base`` with the layout ``point``, the grid's batch and ``recompute``; may raise."""
    tp, cp, pp, vpp, ep, etp = point
    n, seq = base.cluster.num_gpus, _seq_length(base)
    dp, rem = divmod(n, tp * cp * pp)
    if rem or grid.global_batch % (grid.micro_batch * dp):
        raise ValueError("the global batch does not split over this layout")
    if not grid.folding and (etp != tp or (dp * cp) % ep):
        raise ValueError("without folding the MoE layers need etp = tp and ep | dp*cp")
    if vpp > 1 and pp == 1:
        raise ValueError("virtual stages need pp > 1")
    if (grid.micro_batch * seq) % (tp * cp):
        raise ValueError("the sequence does not split over tp*cp")
    d = base.model_dump()
    d["parallel"] = {
        **d["parallel"],
        **dict(zip(DIMS, point, strict=True)),
        "dp": None,
        "sp": tp > 1,
        "pp_schedule": "interleaved" if vpp > 1 else "1f1b",
    }
    d["workload"] = {
        **d["workload"],
        "tokens_per_gpu": grid.micro_batch * seq // (tp * cp),
        "micro_batches": grid.global_batch // (grid.micro_batch * dp),
        "recompute_granularity": recompute,
    }
    return Scenario.model_validate(d)


def _seq_length(scn: Scenario) -> int:
    if scn.model.dense is None:
        raise ConfigError("a layout search needs model.dense (its seq_length)", field="model")
    return scn.model.dense.seq_length


def peak_GiB(scn: Scenario, hw: HardwareProfile) -> tuple[float, float]:
    """Predicted peak memory of the fullest GPU and its HBM, without running the engine
    (:func:`moesim.simulate.core.memory_estimate`)."""
    from moesim.simulate.core import memory_estimate

    mem = memory_estimate(scn, hw).to_dict(scn)
    return float(mem["peak_GiB"]), float(mem["hbm_GiB"])


def feasible(base: Scenario, hw: HardwareProfile, grid: LayoutGrid) -> dict[Point, Candidate]:
    """Every valid grid point with the lightest recompute that fits in memory."""
    out: dict[Point, Candidate] = {}
    for point in grid_points(grid):
        for rc in grid.recompute:
            try:
                scn = layout_scenario(base, grid, point, rc)
                peak, hbm = peak_GiB(scn, hw)
            except (ValueError, ConfigError):
                break  # the layout itself cannot run: no recompute helps
            if peak <= hbm:
                out[point] = Candidate(point, scn, peak)
                break
    return out


def starts(cands: dict[Point, Candidate]) -> list[Point]:
    """One point per attention layout ``(tp, cp, pp, vpp)``: its MoE mapping with the
    largest ``ep``, then the smallest ``etp`` ("EP over ETP", the paper's section 4.4)."""
    best: dict[Point, Point] = {}
    for p in sorted(cands, key=lambda p: (-p[4], p[5])):
        best.setdefault(p[:4], p)  # type: ignore[arg-type]
    return list(best.values())


def neighbours(point: Point, grid: LayoutGrid, cands: Collection[Point]) -> Iterator[Point]:
    """Per dimension, the nearest feasible point below and above ``point``, others kept."""
    for i, dim in enumerate(DIMS):
        values = sorted(set(getattr(grid, dim)))
        j = values.index(point[i])
        for side in (values[:j][::-1], values[j + 1 :]):
            moved = ((*point[:i], v, *point[i + 1 :]) for v in side)
            q = next((m for m in moved if m in cands), None)
            if q is not None:
                yield q


def search(
    base: Scenario,
    hw: HardwareProfile,
    grid: LayoutGrid,
    value_of: Callable[[Scenario], float],
    *,
    advance: Callable[[str], None] | None = None,
) -> SearchResult:
    """Steepest ascent of ``value_of`` over the feasible layouts (see module)."""
    cands = feasible(base, hw, grid)
    if not cands:
        raise ConfigError("no layout of the search grid fits in memory", field="search")
    seen: dict[Point, float] = {}

    def value(p: Point) -> float:
        if p not in seen:
            seen[p] = value_of(cands[p].scenario)
            if advance is not None:
                advance(cands[p].label)
        return seen[p]

    top = _climb(max(starts(cands), key=value), grid, cands, value)
    total = sum(1 for _ in grid_points(grid))
    return SearchResult(cands[top], value(top), seen, len(cands), total)


def _climb(
    here: Point, grid: LayoutGrid, cands: dict[Point, Candidate], value: Callable[[Point], float]
) -> Point:
    """Steepest ascent from ``here`` to a local optimum."""
    while True:
        best = max(neighbours(here, grid, cands), key=value, default=here)
        if value(best) <= value(here):
            return here
        here = best
