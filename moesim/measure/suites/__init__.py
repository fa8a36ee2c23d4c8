"""Benchmark suites: a registry of name -> how to list cases and measure them.

A suite either measures one case at a time (``measure``) or a batch of cases in
one go (``measure_many``, the all-to-all suite: one distributed launch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moesim.measure.grids import Grid
from moesim.measure.suites import alltoall, dispatch, experts, gating, roofline
from moesim.measure.suites.common import BenchContext, Case, Row


@dataclass(frozen=True)
class Suite:
    """``cases(grid, dtypes, ctx)`` lists the grid; one of ``measure``/``measure_many`` times it."""

    name: str
    cases: Callable[[Grid, list[str], BenchContext], list[Case]]
    measure: Callable[[Case, BenchContext], Row] | None = None
    measure_many: Callable[[list[Case], BenchContext], list[Row]] | None = None


SUITES: dict[str, Suite] = {
    "roofline": Suite("roofline", roofline.cases, measure=roofline.measure),
    "gating": Suite("gating", gating.cases, measure=gating.measure),
    "dispatch": Suite("dispatch", dispatch.cases, measure=dispatch.measure),
    "experts": Suite("experts", experts.cases, measure=experts.measure),
    "alltoall": Suite("alltoall", alltoall.cases, measure_many=alltoall.measure_many),
}

__all__ = ["SUITES", "BenchContext", "Case", "Row", "Suite"]
