"""Every router kind against the slow per-token reference, plus hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.config.router import ROUTER_KINDS
from moesim.errors import ConfigError
from moesim.kernels import reference as ref
from moesim.kernels.experts import ExpertWeights, moe_forward
from moesim.kernels.gating import (
    ROUTERS,
    RouterSpec,
    apply_capacity,
    expert_capacity,
    jitter,
    route,
)

torch.set_num_threads(1)

#: (id, spec kwargs, tokens, experts); every kind, with and without capacity
SPECS = [
    ("softmax", dict(kind="softmax_topk", top_k=2), 24, 8),
    ("softmax-norm", dict(kind="softmax_topk", top_k=2, normalize=True), 24, 8),
    ("softmax-pnorm", dict(kind="softmax_topk", top_k=4, norm_p=1.5), 24, 16),
    ("softmax-cap-probs", dict(kind="softmax_topk", top_k=2, capacity_factor=0.7), 30, 8),
    (
        "softmax-cap-pos",
        dict(kind="softmax_topk", top_k=2, capacity_factor=0.7, drop_policy="position"),
        30,
        8,
    ),
    ("topk_softmax", dict(kind="topk_softmax", top_k=4), 24, 32),
    ("sigmoid", dict(kind="sigmoid_topk", top_k=4, normalize=True), 24, 16),
    (
        "sigmoid-groups",
        dict(
            kind="sigmoid_topk",
            top_k=4,
            normalize=True,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        ),
        24,
        16,
    ),
    ("sigmoid_top1", dict(kind="sigmoid_top1", top_k=1), 24, 16),
    ("switch", dict(kind="switch_top1", top_k=1), 24, 8),
    (
        "switch-seqcap",
        dict(
            kind="switch_top1",
            top_k=1,
            capacity_factor=1.0,
            capacity_per="sequence",
            sequence_length=8,
            drop_policy="position",
        ),
        24,
        4,
    ),
    ("noisy-eval", dict(kind="noisy_topk", top_k=2), 24, 8),
    ("expert_choice", dict(kind="expert_choice", top_k=2), 24, 8),
    ("expert_choice-cf", dict(kind="expert_choice", top_k=1, capacity_factor=2.0), 10, 4),
    ("hash", dict(kind="hash", top_k=2), 24, 8),
    ("hash-cap", dict(kind="hash", top_k=1, capacity_factor=1.0), 24, 5),
    ("soft", dict(kind="soft", top_k=2), 12, 4),
    ("soft-never-drops", dict(kind="soft", top_k=1, capacity_factor=0.5), 12, 4),
]


def _logits(T: int, E: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, E, generator=torch.Generator().manual_seed(seed)) * 2


def _bias(E: int) -> torch.Tensor:
    return torch.randn(E, generator=torch.Generator().manual_seed(99)) * 0.3  # partly negative


def _by_expert(ids: list[int], weights: list[float], kept: list[bool]):
    """Slots sorted by expert id: (ids, kept), weights (slot order is not a contract)."""
    rows = sorted(zip(ids, weights, kept, strict=True))
    return [(i, k) for i, _, k in rows], [w for _, w, _ in rows]


def test_every_kind_is_checked_against_the_reference():
    """SPECS covers every kind of the registry (the import-time assert ties it to the
    config's kinds), so a new router cannot land without a reference comparison."""
    assert {kw["kind"] for _, kw, _, _ in SPECS} == set(ROUTERS) == set(ROUTER_KINDS)


@pytest.mark.parametrize(("name", "kwargs", "T", "E"), SPECS, ids=[s[0] for s in SPECS])
def test_route_matches_reference(name, kwargs, T, E):
    spec = RouterSpec(**kwargs)
    logits = _logits(T, E)
    bias = _bias(E) if spec.kind == "sigmoid_topk" else None
    got = route(logits, spec, bias)
    want = ref.ref_route(logits, spec, bias)
    for t in range(T):
        got_slots, got_w = _by_expert(
            got.expert_ids_TK[t].tolist(), got.weights_TK[t].tolist(), got.kept_TK[t].tolist()
        )
        want_slots, want_w = _by_expert(want.ids[t], want.weights[t], want.kept[t])
        assert got_slots == want_slots, f"token {t}"
        assert got_w == pytest.approx(want_w, abs=1e-6), f"token {t}"
    torch.testing.assert_close(got.probs_TE.double(), torch.tensor(want.probs, dtype=torch.double))
    assert got.expert_ids_TK.dtype == torch.int64 and got.kept_TK.dtype == torch.bool
    assert float(got.z_loss) == pytest.approx(ref.ref_z_loss(logits), rel=1e-5)


@pytest.mark.parametrize("kind", ["softmax_topk", "topk_softmax", "sigmoid_topk", "switch_top1"])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_matches_formula(kind, masked):
    T, E = 20, 8
    k = 1 if kind == "switch_top1" else 2
    logits = _logits(T, E, seed=5)
    mask = torch.arange(T) % 3 != 0 if masked else None
    r = route(logits, RouterSpec(kind=kind, top_k=k), token_mask_T=mask)
    probs = r.probs_TE / r.probs_TE.sum(dim=-1, keepdim=True)  # sigmoid scores normalised
    want = ref.ref_aux_loss(
        probs.tolist(), r.expert_ids_TK.tolist(), None if mask is None else mask.tolist()
    )
    assert float(r.aux_loss) == pytest.approx(want, rel=1e-5)


def test_switch_aux_loss_averages_over_sequences():
    T, E, L = 12, 4, 4
    logits = _logits(T, E, seed=6)
    spec = RouterSpec(
        kind="switch_top1",
        top_k=1,
        capacity_per="sequence",
        sequence_length=L,
        capacity_factor=2.0,
    )
    r = route(logits, spec)
    per_seq = [
        ref.ref_aux_loss(r.probs_TE[s : s + L].tolist(), r.expert_ids_TK[s : s + L].tolist())
        for s in range(0, T, L)
    ]
    assert float(r.aux_loss) == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-5)


def test_no_aux_loss_for_balanced_by_construction_kinds():
    for kind in ("expert_choice", "hash", "soft"):
        assert float(route(_logits(8, 4), RouterSpec(kind=kind, top_k=2)).aux_loss) == 0.0


# ------------------------------------------------------------- capacity by hand


def test_capacity_formula_is_megatron_get_capacity():
    # ceil((T·k / E) · cf): 10 tokens, k=2, 4 experts, cf 1.1 -> ceil(5.5) = 6
    assert expert_capacity(10, 4, 2, 1.1) == 6
    assert expert_capacity(8, 8, 1, 1.0) == 1
    assert expert_capacity(3, 8, 2, 1.0) == 1  # T < E: ceil(0.75)


def test_drop_by_probs_keeps_the_highest_weights():
    ids = torch.tensor([[0], [0], [0], [1]])
    weights = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    kept = apply_capacity(ids, weights, 2, capacity=2, drop_policy="probs")
    assert kept.squeeze(1).tolist() == [False, True, True, True]


def test_drop_by_position_keeps_the_first_tokens():
    ids = torch.tensor([[0], [0], [0], [1]])
    weights = torch.tensor([[0.2], [0.9], [0.5], [0.1]])
    kept = apply_capacity(ids, weights, 2, capacity=2, drop_policy="position")
    assert kept.squeeze(1).tolist() == [True, True, False, True]


def test_per_sequence_capacity_restarts_each_sequence():
    ids = torch.tensor([[0], [0], [0], [0], [0], [1]])
    weights = torch.ones(6, 1)
    kept = apply_capacity(ids, weights, 2, 2, "position", sequence_length=3)
    assert kept.squeeze(1).tolist() == [True, True, False, True, True, True]


def test_route_reports_capacity_and_padding():
    spec = RouterSpec(kind="softmax_topk", top_k=2, capacity_factor=1.0, pad_to_capacity=True)
    r = route(_logits(10, 4), spec)
    assert r.capacity == math.ceil(10 * 2 / 4) and r.pad_to_capacity
    assert int(r.tokens_per_expert().max()) <= r.capacity
    assert torch.all(r.weights_TK[~r.kept_TK] == 0)
    seq = RouterSpec(
        kind="switch_top1",
        top_k=1,
        capacity_factor=1.0,
        capacity_per="sequence",
        sequence_length=4,
    )
    assert route(_logits(12, 4), seq).capacity == 3 * 1  # 3 sequences × ceil(4/4)


def test_expert_choice_gives_every_expert_the_same_load():
    r = route(_logits(16, 4), RouterSpec(kind="expert_choice", top_k=2))
    assert r.tokens_per_expert().tolist() == [8, 8, 8, 8]  # c = 16·2/4
    assert r.dropped_fraction() > 0  # padding slots of tokens few experts chose


def test_sigmoid_groups_only_select_inside_the_best_groups():
    # two groups of two experts; group 1 has the larger top-2 sum, so expert 0 loses
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0]])
    spec = RouterSpec(kind="sigmoid_topk", top_k=1, n_group=2, topk_group=1)
    assert route(logits, spec).expert_ids_TK.tolist() == [[2]]
    # the bias moves selection but not the weight
    r = route(logits, RouterSpec(kind="sigmoid_topk", top_k=1), bias_E=torch.tensor([0, 0, 0, 5.0]))
    assert r.expert_ids_TK.tolist() == [[3]]
    assert float(r.weights_TK[0, 0]) == pytest.approx(1 / (1 + math.exp(-1.0)))


# --------------------------------------------------------------------- noise


def test_noisy_topk_is_seeded_and_noise_free_without_generator():
    logits = _logits(32, 8)
    spec = RouterSpec(kind="noisy_topk", top_k=2)
    a = route(logits, spec, generator=torch.Generator().manual_seed(1))
    b = route(logits, spec, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    clean = route(logits, spec)
    assert not torch.equal(a.expert_ids_TK, clean.expert_ids_TK)
    plain = route(logits, RouterSpec(kind="topk_softmax", top_k=2))
    assert torch.equal(clean.expert_ids_TK, plain.expert_ids_TK)
    # a huge learned noise std makes the choice mostly random; a tiny one keeps it
    tiny = torch.full_like(logits, -30.0)
    quiet = route(logits, spec, generator=torch.Generator().manual_seed(2), noise_logits_TE=tiny)
    assert torch.equal(quiet.expert_ids_TK, plain.expert_ids_TK)


def test_jitter_is_seeded_and_bounded():
    x = torch.ones(100, 4)
    a = jitter(x, 0.01, torch.Generator().manual_seed(0))
    b = jitter(x, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert float(a.min()) >= 0.99 and float(a.max()) <= 1.01
    assert jitter(x, 0.01, None) is x


def test_switch_jitter_acts_on_router_inputs_in_moe_forward():
    g = torch.Generator().manual_seed(0)
    x, wr = torch.randn(16, 8, generator=g), torch.randn(8, 4, generator=g)
    w = ExpertWeights(None, torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g))
    spec = RouterSpec(kind="switch_top1", top_k=1, jitter_eps=0.5)
    out = moe_forward(x, wr, w, spec, generator=torch.Generator().manual_seed(3))
    noise = jitter(x, 0.5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.logits_TE, noise @ wr)


def test_hash_uses_token_ids_when_given():
    spec = RouterSpec(kind="hash", top_k=1)
    ids = torch.tensor([7, 7, 3])
    r = route(torch.zeros(3, 8), spec, token_ids_T=ids)
    assert r.expert_ids_TK[0].tolist() == r.expert_ids_TK[1].tolist()
    want = ref.ref_route(torch.zeros(3, 8), spec, token_ids=[7, 7, 3])
    assert r.expert_ids_TK.tolist() == want.ids


# -------------------------------------------------------------------- errors

BAD = [
    (dict(kind="softmax_topk", top_k=9), 8, "top_k"),
    (dict(kind="switch_top1", top_k=2), 8, "top_k"),
    (dict(kind="sigmoid_topk", top_k=2, n_group=3, topk_group=1), 8, "n_group"),
    (
        dict(
            kind="switch_top1",
            top_k=1,
            capacity_per="sequence",
            sequence_length=5,
            capacity_factor=1.0,
        ),
        8,
        "sequence_length",
    ),
]


@pytest.mark.parametrize(("kwargs", "E", "field"), BAD)
def test_bad_specs_raise_one_line_config_errors(kwargs, E, field):
    with pytest.raises(ConfigError, match=rf"router\.{field}") as err:
        route(_logits(8, E), RouterSpec(**kwargs))
    assert "\n" not in str(err.value)


# ------------------------------------------------- Megatron-Core formulation


def _megatron_topk_softmax_with_capacity(logits, topk, cf, drop_policy, pad_to_capacity):
    """Megatron-Core ``moe_utils.topk_softmax_with_capacity`` (softmax, use_pre_softmax
    False) transcribed tensor for tensor: returns (routing_probs_TE, routing_map_TE)."""
    num_tokens, num_experts = logits.shape
    scores, top_indices = torch.topk(logits, k=topk, dim=1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    capacity = math.ceil((num_tokens * topk / num_experts) * cf)
    topk_masked_gates = torch.zeros_like(logits).scatter(1, top_indices, probs)
    topk_map = torch.zeros_like(logits).int().scatter(1, top_indices, 1).bool()
    if drop_policy == "probs":
        _, capacity_indices = torch.topk(topk_masked_gates, k=capacity, dim=0, sorted=False)
    else:  # position: a stable "first come" version of their topk over the int map
        _, capacity_indices = torch.sort(topk_map.int(), dim=0, descending=True, stable=True)
        capacity_indices = capacity_indices[:capacity]
    capacity_mask = torch.zeros_like(logits).scatter(0, capacity_indices, 1).bool()
    final_mask = capacity_mask if pad_to_capacity else topk_map & capacity_mask
    return topk_masked_gates * final_mask, final_mask


MEGATRON_CASES = [(0.5, "probs"), (1.0, "probs"), (0.75, "position"), (1.25, "position")]


@pytest.mark.parametrize(("cf", "policy"), MEGATRON_CASES)
def test_capacity_matches_megatron_core_formulation(cf, policy):
    logits = _logits(40, 8, seed=11)
    spec = RouterSpec(kind="topk_softmax", top_k=2, capacity_factor=cf, drop_policy=policy)
    r = route(logits, spec)
    probs_TE, map_TE = _megatron_topk_softmax_with_capacity(logits, 2, cf, policy, False)
    ours_TE = torch.zeros(40, 8).scatter(1, r.expert_ids_TK, r.weights_TK)
    kept_TE = torch.zeros(40, 8, dtype=torch.bool).scatter(1, r.expert_ids_TK, r.kept_TK)
    assert torch.equal(kept_TE, map_TE)
    torch.testing.assert_close(ours_TE, probs_TE)
    assert r.capacity == math.ceil((40 * 2 / 8) * cf)


# ------------------------------------------------------------ property check


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    E=st.integers(1, 6),
    seqs=st.integers(1, 3),
    L=st.integers(1, 7),
    capacity=st.integers(0, 6),
    policy=st.sampled_from(["probs", "position"]),
    per_sequence=st.booleans(),
)
def test_apply_capacity_matches_reference_loops(data, E, seqs, L, capacity, policy, per_sequence):
    T = seqs * L
    K = data.draw(st.integers(1, E))
    ids = [data.draw(st.permutations(range(E)))[:K] for _ in range(T)]
    # distinct weights on a coarse grid, so ties never decide the outcome
    flat = data.draw(st.permutations(range(T * K)))
    weights = [[flat[t * K + j] / (T * K) for j in range(K)] for t in range(T)]
    seq = L if per_sequence else None
    got = apply_capacity(torch.tensor(ids), torch.tensor(weights), E, capacity, policy, seq)
    assert got.tolist() == ref.ref_keep(ids, weights, E, capacity, policy, seq)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "kwargs", "T", "E"), SPECS, ids=[s[0] for s in SPECS])
def test_route_on_cuda_matches_cpu(name, kwargs, T, E):
    spec = RouterSpec(**kwargs)
    logits = _logits(T, E)
    bias = _bias(E) if spec.kind == "sigmoid_topk" else None
    cpu = route(logits, spec, bias)
    gpu = route(logits.cuda(), spec, None if bias is None else bias.cuda())

    def dense(r):  # slot order is not a contract: compare [T, E] maps
        ids, kept, w = r.expert_ids_TK.cpu(), r.kept_TK.cpu(), r.weights_TK.cpu()
        return torch.zeros(T, E).scatter(1, ids, kept.float()), torch.zeros(T, E).scatter(1, ids, w)

    (kept_gpu, w_gpu), (kept_cpu, w_cpu) = dense(gpu), dense(cpu)
    assert torch.equal(kept_gpu, kept_cpu)
    torch.testing.assert_close(w_gpu, w_cpu)
    torch.testing.assert_close(gpu.aux_loss.cpu(), cpu.aux_loss)
