"""Routing loads, capacity and drops: against exact probabilities and the kernels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats

from moesim.config.scenario import RoutingConfig
from moesim.errors import ConfigError
from moesim.simulate import capacity, routing, simulate

# (tokens, experts, k, capacity factor, sequence length) for the kernels comparison
CAPACITY_CASES = [
    (64, 8, 2, 1.0, None),
    (64, 8, 2, 0.5, 16),
    (50, 4, 1, 1.25, None),
    (96, 16, 4, 2.0, 32),
]


@pytest.mark.parametrize(("T", "E", "K", "cf", "seq"), CAPACITY_CASES)
def test_capacity_formula_matches_the_kernels(T, E, K, cf, seq) -> None:
    from moesim.kernels.gating import expert_capacity

    assert capacity.expert_capacity(T, E, K, cf) == expert_capacity(T, E, K, cf)


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize(("T", "E", "K", "cf", "seq"), CAPACITY_CASES)
def test_keep_mask_matches_kernels_apply_capacity(T, E, K, cf, seq, policy) -> None:
    import torch

    from moesim.kernels.gating import apply_capacity, expert_capacity

    gen = torch.Generator().manual_seed(T * E + K)
    scores = torch.rand(T, E, generator=gen) ** 3  # skewed, ties impossible
    weights, ids = scores.topk(K, dim=-1)
    cap = expert_capacity(seq or T, E, K, cf)
    expected = apply_capacity(ids, weights, E, cap, policy, seq)
    sizes = capacity.domain_sizes(T, seq)
    caps = capacity.capacities(sizes, E, K, cf)
    assert caps is not None
    prio = weights.double().numpy()[None] if policy == "probs" else None
    got = capacity.keep_mask(ids.numpy()[None], E, sizes, caps, prio)[0]
    assert got.tolist() == expected.tolist()


def test_keep_counts_is_min_of_routed_and_capacity() -> None:
    routed = np.array([[[0, 3, 9], [5, 5, 5]]])
    kept = capacity.keep_counts(routed, np.array([4, 5]))
    assert kept.tolist() == [[[0, 3, 4], [5, 5, 5]]]
    assert capacity.keep_counts(routed, None) is routed
    padded = capacity.sent_counts(kept, np.array([4, 5]), pad=True)
    assert padded.tolist() == [[[4, 4, 4], [5, 5, 5]]]


def test_inclusion_probs_sum_to_k_and_never_exceed_one() -> None:
    p = np.array([0.7, 0.1, 0.1, 0.05, 0.05])
    pi = routing.inclusion_probs(p, 2)
    assert pi.sum() == pytest.approx(2.0)
    assert pi[0] == 1.0
    assert pi[1:] == pytest.approx(p[1:] / p[1:].sum())
    uniform = routing.inclusion_probs(np.full(8, 1 / 8), 3)
    assert uniform == pytest.approx(np.full(8, 3 / 8))


def test_persistence_one_keeps_popularity_and_zero_redeals_it() -> None:
    rng = np.random.default_rng(0)
    keep = routing.layer_popularities(RoutingConfig(distribution="zipf"), 16, 4, rng)
    assert (keep == keep[0]).all()
    cfg = RoutingConfig(distribution="zipf", persistence=0.0)
    moved = routing.layer_popularities(cfg, 16, 4, np.random.default_rng(0))
    assert not (moved == moved[0]).all()
    assert (np.sort(moved, axis=1) == np.sort(moved[0])).all()  # same shape, re-dealt


@pytest.mark.parametrize("dist", ["uniform", "zipf", "lognormal", "dirichlet"])
def test_popularity_is_a_distribution(dist: str) -> None:
    p = routing.popularity(RoutingConfig(distribution=dist), 32, np.random.default_rng(1))
    assert p.shape == (32,) and (p > 0).all() and p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("tokens", [64, 4096])  # exact binomial draws / normal approximation
def test_counts_have_binomial_mean_and_variance(tokens: int) -> None:
    pi = np.array([0.05, 0.25, 0.5])
    counts = routing.draw_counts(np.random.default_rng(3), np.array([tokens]), pi, (4000,))
    assert counts.shape == (4000, 1, 3)
    mean, var = tokens * pi, tokens * pi * (1 - pi)
    assert counts.mean((0, 1)) == pytest.approx(mean, rel=0.02)
    assert counts.var((0, 1)) == pytest.approx(var, rel=0.1)


def test_table_normal_sampler_has_the_normal_law_and_its_tails() -> None:
    """The quantile-table sampler against the exact normal: KS on the body, the tail
    mass inside and beyond the end bins (|z| > 3.97, drawn exactly)."""
    rng = np.random.default_rng(5)
    z = routing.standard_normal_f32(rng, (2000, 1001)).astype(np.float64).ravel()
    assert z.shape == (2_002_000,)
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.var() - 1) < 0.005
    for cut in (3.0, 4.17, 4.5):
        expect = 2 * stats.norm.sf(cut) * z.size
        assert abs((np.abs(z) > cut).sum() - expect) < 5 * np.sqrt(expect) + 1, cut
    assert np.abs(z).max() > 4.4  # not cut at the end bins' midpoints (4.32)
    again = routing.standard_normal_f32(np.random.default_rng(5), (2000, 1001))
    assert np.array_equal(again.ravel(), z.astype(np.float32))  # same seed, same draws


def _exact_drop_fraction(T: int, E: int, K: int, cap: int) -> float:
    x = np.arange(T + 1)
    overflow = (np.maximum(x - cap, 0) * stats.binom.pmf(x, T, K / E)).sum()
    return float(overflow / (T * K / E))


@pytest.mark.parametrize(
    ("tokens", "path"),
    [(64, "tokens"), (64, "counts"), (2048, "counts")],  # per-token / binomial / normal approx
)
def test_uniform_drop_fraction_matches_the_exact_binomial(
    make_scenario: Any, make_hardware: Any, tokens, path, monkeypatch
) -> None:
    from moesim.simulate import loads

    monkeypatch.setattr(loads, "EXACT_TOKEN_CELLS", 1 << 30 if path == "tokens" else 0)
    E, K, cf = 8, 2, 1.0
    scn = make_scenario(
        "cluster.gpus_per_node=8", "parallel.ep=8", f"model.num_experts={E}", f"model.top_k={K}",
        "model.num_moe_layers=25", f"router.capacity_factor={cf}",
        f"workload.tokens_per_gpu={tokens}",
    )  # fmt: skip
    res = simulate(scn, make_hardware(gpus_per_node=8), seed=11)
    cap = capacity.expert_capacity(tokens, E, K, cf)
    exact = _exact_drop_fraction(tokens, E, K, cap)
    # standard error of the mean overflow over 8 sources x 8 experts x 25 layers
    x = np.arange(tokens + 1)
    pmf = stats.binom.pmf(x, tokens, K / E)
    over = np.maximum(x - cap, 0)
    sd = np.sqrt((over**2 * pmf).sum() - (over * pmf).sum() ** 2) / (tokens * K / E)
    se = sd / np.sqrt(8 * 8 * 25)
    assert abs(res.drop_fraction - exact) < 4 * se + 1e-3, (res.drop_fraction, exact, se)


def test_systematic_sampling_hits_the_inclusion_probabilities_with_distinct_picks() -> None:
    p = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    ids = routing.sample_ids(np.random.default_rng(0), p[None], 40000, 2)[0]
    assert (ids[:, 0] != ids[:, 1]).all()
    freq = np.bincount(ids.ravel(), minlength=6) / len(ids)
    assert freq == pytest.approx(routing.inclusion_probs(p, 2), abs=0.01)


def test_group_limited_sampling_reaches_at_most_topk_group_groups() -> None:
    ids = routing.sample_ids(np.random.default_rng(1), np.full((1, 32), 1 / 32), 3000, 6, (8, 3))
    groups = ids[0] // 4
    assert max(len(set(row)) for row in groups.tolist()) <= 3
    assert np.bincount(ids.ravel(), minlength=32) / 3000 == pytest.approx(6 / 32, abs=0.03)


@pytest.mark.parametrize("groups", [None, (8, 4)])
def test_fast_distinct_token_counts_track_the_per_token_sampler(
    make_scenario: Any, make_hardware: Any, groups, monkeypatch
) -> None:
    from moesim.simulate import loads
    from moesim.simulate.topology import build_topology

    extra = (
        [] if groups is None else [f"router.n_group={groups[0]}", f"router.topk_group={groups[1]}"]
    )
    scn = make_scenario(
        "cluster.nodes=8", "cluster.gpus_per_node=4", "parallel.ep=32", "model.num_experts=256",
        "model.top_k=8", "workload.tokens_per_gpu=256", "dispatcher=hierarchical", *extra,
    )  # fmt: skip
    topo = build_topology(scn, make_hardware(gpus_per_node=4))
    monkeypatch.setattr(loads, "EXACT_TOKEN_CELLS", 1 << 30)
    exact = loads.LoadModel(scn, topo, 0, 1).load(0, 0)
    monkeypatch.setattr(loads, "EXACT_TOKEN_CELLS", 0)
    fast = loads.LoadModel(scn, topo, 0, 1).load(0, 0)
    assert fast.tok_GP.mean() == pytest.approx(exact.tok_GP.mean(), rel=0.03)
    assert fast.tok_GNd.mean() == pytest.approx(exact.tok_GNd.mean(), rel=0.05)
    assert fast.kept_GE.mean() == pytest.approx(exact.kept_GE.mean(), rel=0.02)


def test_counts_and_distinct_tokens_from_ids_match_a_loop() -> None:
    rng = np.random.default_rng(5)
    G, T, K, E = 3, 20, 2, 8
    ids = np.stack([[rng.choice(E, K, replace=False) for _ in range(T)] for _ in range(G)])
    kept = rng.random((G, T, K)) < 0.7
    counts = routing.counts_from_ids(ids[:, None], kept[:, None], E)[:, 0]
    distinct = routing.distinct_from_ids(ids, kept, block=2, n_blocks=4)
    ref_c = np.zeros((G, E), int)
    ref_d = np.zeros((G, 4), int)
    for g in range(G):
        for t in range(T):
            blocks = set()
            for k in range(K):
                if kept[g, t, k]:
                    ref_c[g, ids[g, t, k]] += 1
                    blocks.add(ids[g, t, k] // 2)
            for b in blocks:
                ref_d[g, b] += 1
    assert counts.tolist() == ref_c.tolist()
    assert distinct.tolist() == ref_d.tolist()


def test_trace_with_an_id_out_of_range_names_file_and_value(tmp_path) -> None:
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[0, 1], [2, 9]]))
    with pytest.raises(ConfigError, match=r"ids\.npy.*expert id 9 out of range; allowed 0\.\.7"):
        routing.load_trace(path, E=8, K=2)


def test_trace_loads_npy_and_parquet_and_refuses_pickles(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.array([[0, 1], [2, 3], [1, 0]])
    np.save(tmp_path / "a.npy", ids)
    assert routing.load_trace(tmp_path / "a.npy", 4, 2).tolist() == [ids.tolist()]
    pq.write_table(pa.table({"expert_ids": ids.tolist()}), tmp_path / "a.parquet")
    assert routing.load_trace(tmp_path / "a.parquet", 4, 2).tolist() == [ids.tolist()]
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=r"obj\.npy"):
        routing.load_trace(tmp_path / "obj.npy", 4, 2)
    with pytest.raises(ConfigError, match=r"k = 2 ids per token, model\.top_k is 3"):
        routing.load_trace(tmp_path / "a.npy", 4, 3)


def test_group_and_row_sums_of_counts_are_exact() -> None:
    """float32 counts summed by BLAS equal the float64 sums; past 2**24 they fall back."""
    from moesim.simulate.loads import group_sum, row_sum

    rng = np.random.default_rng(2)
    counts = rng.integers(0, 5000, (64, 32)).astype(np.float32)
    assert np.array_equal(group_sum(counts, 4), counts.reshape(4, 16, 32).sum(1, dtype=np.float64))
    assert np.array_equal(row_sum(counts), counts.sum(-1, dtype=np.float64))
    big = np.full((4, 2), 2.0**24 - 1, dtype=np.float32)  # float32 sums would round
    assert group_sum(big, 1)[0, 0] == 4 * (2.0**24 - 1)
    assert row_sum(big)[0] == 2 * (2.0**24 - 1)
