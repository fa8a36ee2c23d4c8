"""The layout search of the MoE Parallel Folding rows (``moesim.validation.layout_search``)."""

from __future__ import annotations

import math

import pytest

from moesim.config.loader import load_hardware
from moesim.config.scenario import Scenario
from moesim.validation.layout_search import (
    LayoutGrid,
    feasible,
    layout_scenario,
    neighbours,
    peak_GiB,
    search,
)
from moesim.validation.published import load_published


def _row(row_id: str):  # type: ignore[no-untyped-def]
    return next(r for r in load_published().rows if r.id == row_id)


@pytest.fixture(scope="module")
def mixtral():  # type: ignore[no-untyped-def]
    row = _row("folding-mixtral-8x22b-h100-mfu")
    return row.scenario, row.search, load_hardware(row.scenario.hardware)


def test_each_layout_keeps_the_global_batch_by_hand(mixtral) -> None:  # type: ignore[no-untyped-def]
    """128 GPUs, 256 sequences of 4096, micro-batch 1. tp2 pp8: dp 8, 32 micro-batches,
    2048 tokens per GPU (SP); tp1 pp4 vpp7: dp 32, 8 micro-batches, 4096, interleaved."""
    base, grid, _ = mixtral
    a = layout_scenario(base, grid, (2, 1, 8, 1, 8, 1), "none")
    assert (a.workload.micro_batches, a.workload.tokens_per_gpu) == (32, 2048)
    assert a.parallel.sp and a.parallel.pp_schedule == "1f1b"
    assert a.parallel.attention_dp(128) == 8 and a.parallel.expert_dp(128) == 2
    b = layout_scenario(base, grid, (1, 1, 4, 7, 8, 1), "selective")
    assert (b.workload.micro_batches, b.workload.tokens_per_gpu) == (8, 4096)
    assert b.parallel.pp_schedule == "interleaved" and not b.parallel.sp
    assert b.workload.recompute_granularity == "selective"
    # 256 sequences over dp 128 x micro-batch 4 do not split
    big = grid.model_copy(update={"micro_batch": 4})
    with pytest.raises(ValueError, match="global batch"):
        layout_scenario(base, big, (1, 1, 1, 1, 8, 1), "none")


def test_without_folding_the_moe_layers_reuse_the_attention_mapping(mixtral) -> None:  # type: ignore[no-untyped-def]
    base, grid, _ = mixtral
    coupled = grid.model_copy(update={"folding": False})
    with pytest.raises(ValueError, match="etp = tp"):
        layout_scenario(base, coupled, (2, 1, 8, 1, 8, 1), "none")  # etp 1 != tp 2
    with pytest.raises(ValueError, match="ep"):
        layout_scenario(base, coupled, (4, 1, 8, 1, 8, 4), "none")  # dp 4: ep 8 does not divide
    ok = layout_scenario(base, coupled, (2, 1, 8, 1, 8, 2), "none")  # dp 8, ep 8 inside it
    assert ok.parallel.expert_dp(128) == 1
    folded = layout_scenario(base, grid, (4, 1, 8, 1, 8, 1), "none")  # ep 8 > dp 4: folding only
    assert folded.parallel.expert_dp(128) == 2


def test_the_lightest_recompute_that_fits_is_chosen(mixtral) -> None:  # type: ignore[no-untyped-def]
    base, _, hw = mixtral
    one = LayoutGrid(global_batch=256, tp=[2], pp=[8], ep=[8], etp=[1])
    point = (2, 1, 8, 1, 8, 1)
    none, _ = peak_GiB(layout_scenario(base, one, point, "none"), hw)
    full, _ = peak_GiB(layout_scenario(base, one, point, "full"), hw)
    assert full < none

    def with_hbm(gib: float):  # type: ignore[no-untyped-def]
        return hw.model_copy(update={"gpu": hw.gpu.model_copy(update={"hbm_GiB": gib})})

    cands = feasible(base, with_hbm((none + full) / 2), one)
    assert cands[point].scenario.workload.recompute_granularity in ("selective", "full")
    assert cands[point].peak_GiB <= (none + full) / 2
    roomy = feasible(base, with_hbm(none + 1), one)
    assert roomy[point].scenario.workload.recompute_granularity == "none"
    assert feasible(base, with_hbm(full / 2), one) == {}


def test_neighbours_step_to_the_nearest_feasible_value_by_hand() -> None:
    grid = LayoutGrid(global_batch=8, tp=[1, 2, 4], pp=[1, 2, 4, 8], ep=[2, 4])
    cands = {(2, 1, 4, 1, 4, 1), (1, 1, 4, 1, 4, 1), (2, 1, 1, 1, 4, 1), (2, 1, 4, 1, 2, 1)}
    got = set(neighbours((2, 1, 4, 1, 4, 1), grid, cands))
    # tp: 1 below, 4 not feasible; pp: 2 not feasible so 1, 8 not; ep: 2 below
    assert got == {(1, 1, 4, 1, 4, 1), (2, 1, 1, 1, 4, 1), (2, 1, 4, 1, 2, 1)}


def _bowl(scn: Scenario) -> float:
    """Unimodal in log2 of each size: best at tp 2, pp 4, ep 8, etp 1."""
    p = scn.parallel
    return -(
        (math.log2(p.tp) - 1) ** 2
        + (math.log2(p.pp) - 2) ** 2
        + (math.log2(p.ep) - 3) ** 2
        + math.log2(p.etp)
    )


def test_the_search_finds_the_best_of_a_unimodal_value(mixtral) -> None:  # type: ignore[no-untyped-def]
    base, _, hw = mixtral
    grid = LayoutGrid(global_batch=256, tp=[1, 2, 4], pp=[2, 4, 8], ep=[2, 4, 8], etp=[1, 2])
    cands = feasible(base, hw, grid)
    assert (2, 1, 4, 1, 8, 1) in cands
    found = search(base, hw, grid, _bowl)
    assert found.best.point == (2, 1, 4, 1, 8, 1)
    assert found.value == pytest.approx(max(_bowl(c.scenario) for c in cands.values()))
    assert len(found.evaluated) < found.feasible == len(cands)
    assert found.grid_points == 3 * 3 * 3 * 2


def test_searched_rows_store_a_feasible_layout_of_their_grid() -> None:
    """The layout each folding row holds is a point of its grid that fits in memory."""
    rows = [r for r in load_published().rows if r.search is not None]
    assert len(rows) == 4 and all("2504.14960" in r.url for r in rows)
    for row in rows:
        scn, grid = row.scenario, row.search
        assert grid is not None and grid.folding == row.id.startswith("folding-")
        p = scn.parallel
        point = (p.tp, p.cp, p.pp, p.vpp, p.ep, p.etp)
        again = layout_scenario(scn, grid, point, scn.workload.recompute_granularity)
        assert again.parallel == p and again.workload == scn.workload
        peak, hbm = peak_GiB(scn, load_hardware(scn.hardware))
        assert peak <= hbm
