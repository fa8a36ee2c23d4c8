"""Expert placement: EPLB packing on cases with known optima, replicas splitting tokens exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sim_builders import hardware, scenario

from moesim.config.dynamics import PlacementConfig
from moesim.errors import ConfigError
from moesim.simulate import simulate
from moesim.simulate.placement import (
    balanced_packing,
    build_placement,
    rebalance,
    replicate_experts,
    split_counts,
)


def _rank_loads(slot_expert_R: np.ndarray, weight_E: np.ndarray, ranks: int) -> np.ndarray:
    copies = np.bincount(slot_expert_R, minlength=len(weight_E))
    per_slot = weight_E[slot_expert_R] / copies[slot_expert_R]
    return per_slot.reshape(ranks, -1).sum(-1)


def test_balanced_packing_reaches_the_even_split() -> None:
    # 8..1 into 2 packs of 4: total 36, the greedy order reaches the optimum 18 / 18
    w = np.array([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    pack, rank = balanced_packing(w, 2)
    assert pack.tolist() == [[0, 1, 1, 0, 0, 1, 1, 0]]
    loads = np.bincount(pack[0], weights=w[0])
    assert loads.tolist() == [18.0, 18.0]
    assert sorted(rank[0][pack[0] == 0].tolist()) == [0, 1, 2, 3]


def test_replicas_go_to_the_hottest_expert_per_copy() -> None:
    slot_expert, copy_rank, copies = replicate_experts(np.array([[10.0, 2, 2, 2]]), 6)
    assert slot_expert.tolist() == [[0, 1, 2, 3, 0, 0]]
    assert copy_rank.tolist() == [[0, 0, 0, 0, 1, 2]]
    assert copies.tolist() == [[3, 1, 1, 1]]


def test_eplb_global_finds_the_optimum_of_a_small_case() -> None:
    # [10, 2, 2, 2] on 2 ranks x 3 slots: copies 3,1,1,1 (10/3 each); 3 slots per rank
    # allow {a, a, b} = 8.67 and {a, b, b} = 7.33 at best (enumerated: no better split)
    w = np.array([10.0, 2, 2, 2])
    slots = rebalance(w[None], 6, 1, 1, 2)[0]
    loads = _rank_loads(slots, w, 2)
    assert sorted(loads.tolist()) == pytest.approx([22 / 3, 26 / 3])
    # without copies the best of 2 per rank is 10 + 2 = 12 vs 4
    contiguous_best = _rank_loads(rebalance(w[None], 4, 1, 1, 2)[0], w, 2)
    assert sorted(contiguous_best.tolist()) == [4.0, 12.0]


def test_hierarchical_keeps_each_groups_copies_on_its_node() -> None:
    # 8 experts in 4 groups of 2 over 2 nodes x 2 ranks; group 3 (experts 6, 7) is hot
    w = np.array([[1.0, 1, 2, 2, 3, 3, 8, 8]])
    slots = rebalance(w, 12, 4, 2, 4)[0]  # 12 slots: 3 per rank, 6 per node
    node_of_slot = np.arange(12) // 6
    group_of = slots // 2
    for g in range(4):
        assert len(set(node_of_slot[group_of == g].tolist())) == 1  # a group lives on one node
    # groups by load 16, 6, 4, 2 -> node A {16, 2}, node B {6, 4}
    nodes = [set(group_of[node_of_slot == n].tolist()) for n in (0, 1)]
    assert {frozenset(s) for s in nodes} == {frozenset({3, 0}), frozenset({2, 1})}
    # each node adds 2 copies to its hottest per copy: node A experts 6, 7; node B 4, 5
    assert np.bincount(slots, minlength=8).tolist() == [1, 1, 1, 1, 2, 2, 2, 2]


def test_replicas_split_tokens_exactly() -> None:
    slot_expert = np.array([0, 1, 0, 2, 0, 1])  # expert 0: 3 copies, 1: 2, 2: 1
    counts = np.array([[5, 3, 4], [5, 3, 4], [0, 1, 7]])
    out = split_counts(counts, slot_expert)
    # copy j of n gets c // n, plus 1 when (j - source) mod n < c mod n
    assert out.tolist() == [[2, 2, 2, 4, 1, 1], [1, 1, 2, 4, 2, 2], [0, 1, 0, 7, 0, 0]]
    for e in range(3):
        assert (out[:, slot_expert == e].sum(1) == counts[:, e]).all()  # nothing lost or made


def test_split_is_exact_and_even_on_random_counts() -> None:
    rng = np.random.default_rng(0)
    slot_expert = rng.permutation(np.r_[np.arange(16), rng.integers(0, 16, 8)])
    counts = rng.integers(0, 50, (64, 16))
    out = split_counts(counts, slot_expert)
    for e in range(16):
        mine = out[:, slot_expert == e]
        assert (mine.sum(1) == counts[:, e]).all()
        assert (mine.max(1) - mine.min(1) <= 1).all()  # copies differ by at most one row


def test_bad_redundancy_is_a_config_error() -> None:
    cfg = PlacementConfig(kind="eplb", redundant_experts=3)
    with pytest.raises(ConfigError, match=r"placement\.redundant_experts"):
        build_placement(cfg, np.ones((1, 8)), 2, 1, None)


def test_eplb_lowers_gpu_imbalance_and_adds_memory_in_simulate() -> None:
    base = ("workload.routing={distribution: zipf, zipf_exponent: 1.2}", "model.num_experts=8",
            "parallel.ep=2", "workload.tokens_per_gpu=256")  # fmt: skip
    hw = hardware()
    res = {}
    for kind, extra in (("contiguous", ()), ("eplb", ("placement.redundant_experts=2",))):
        scn = scenario(*base, f"placement.kind={kind}", *extra)
        res[kind] = simulate(scn, hw)
    c, e = res["contiguous"], res["eplb"]
    assert e.gpu_load_imbalance < c.gpu_load_imbalance
    assert e.load_imbalance == pytest.approx(c.load_imbalance)  # the logical loads are the same
    pc, pe = c.details["placement"], e.details["placement"]
    assert (pc["experts_per_gpu"], pe["experts_per_gpu"]) == (4, 5)
    assert pe["expert_weight_bytes_per_gpu"] == pytest.approx(
        1.25 * pc["expert_weight_bytes_per_gpu"]
    )


def test_impossible_placement_exits_2_naming_file_and_field(capsys) -> None:
    from pathlib import Path

    from moesim.cli import main

    tiny = str(Path(__file__).resolve().parents[1] / "scenarios/tiny-cpu.yaml")
    args = [
        "simulate",
        tiny,
        "--set",
        "placement.kind=eplb",
        "--set",
        "placement.redundant_experts=3",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "tiny-cpu.yaml: placement.redundant_experts = 3" in err and err.count("\n") == 0
