"""Every dispatch x expert strategy equals the slow reference on edge-case routings."""

from __future__ import annotations

import pytest
import torch

from moesim.errors import ConfigError
from moesim.kernels import reference as ref
from moesim.kernels.dispatch import DISPATCH_STRATEGIES, permute, sort_chunks, unpermute
from moesim.kernels.experts import (
    EXPERT_STRATEGIES,
    ExpertWeights,
    SharedExpert,
    experts_forward,
    grouped_mm_available,
    moe_forward,
)
from moesim.kernels.gating import RouterSpec, Routing

torch.set_num_threads(1)

D, F = 8, 12


def _routing(ids_TK: torch.Tensor, kept_TK: torch.Tensor, E: int, seed: int) -> Routing:
    g = torch.Generator().manual_seed(seed)
    weights_TK = torch.rand(ids_TK.shape, generator=g) * kept_TK
    probs_TE = torch.softmax(torch.randn(ids_TK.shape[0], E, generator=g), dim=-1)
    zero = torch.zeros(())
    return Routing(ids_TK.long(), weights_TK, kept_TK, probs_TE, zero, zero)


def _distinct_ids(T: int, E: int, K: int, seed: int, experts: int | None = None) -> torch.Tensor:
    """K distinct experts per token drawn from the first ``experts`` experts."""
    g = torch.Generator().manual_seed(seed)
    pool = experts or E
    return torch.stack([torch.randperm(pool, generator=g)[:K] for _ in range(T)])


def _case(name: str):
    """(routing, E) of a named edge case."""
    if name == "balanced":
        T, E, K = 16, 4, 2
        ids = _distinct_ids(T, E, K, 1)
        kept = torch.ones(T, K, dtype=torch.bool)
    elif name == "expert_with_zero_tokens":
        T, E, K = 12, 6, 2
        ids = _distinct_ids(T, E, K, 2, experts=4)  # experts 4 and 5 get nothing
        kept = torch.ones(T, K, dtype=torch.bool)
    elif name == "all_on_one_expert":
        T, E, K = 9, 4, 1
        ids = torch.zeros(T, K, dtype=torch.long)
        kept = torch.ones(T, K, dtype=torch.bool)
    elif name == "fewer_tokens_than_experts":
        T, E, K = 3, 8, 2
        ids = _distinct_ids(T, E, K, 3)
        kept = torch.ones(T, K, dtype=torch.bool)
    elif name == "dropped_tokens":
        T, E, K = 14, 4, 2
        ids = _distinct_ids(T, E, K, 4)
        kept = torch.rand(T, K, generator=torch.Generator().manual_seed(5)) > 0.35
    elif name == "all_dropped":
        T, E, K = 5, 3, 1
        ids = _distinct_ids(T, E, K, 6)
        kept = torch.zeros(T, K, dtype=torch.bool)
    elif name == "single_token":
        T, E, K = 1, 4, 3
        ids = _distinct_ids(T, E, K, 7)
        kept = torch.ones(T, K, dtype=torch.bool)
    else:
        raise KeyError(name)
    return _routing(ids, kept, E, seed=len(name)), E


CASES = [
    "balanced",
    "expert_with_zero_tokens",
    "all_on_one_expert",
    "fewer_tokens_than_experts",
    "dropped_tokens",
    "all_dropped",
    "single_token",
]
CAPACITIES = [None, 2, 5]  # None = no padding; 2 cuts the busiest experts; 5 pads


def _weights(E: int, seed: int = 0, gated: bool = True) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, D, F, generator=g) / D**0.5 if gated else None
    up = torch.randn(E, D, F, generator=g) / D**0.5
    down = torch.randn(E, F, D, generator=g) / F**0.5
    return ExpertWeights(gate, up, down, "silu" if gated else "relu")


def _x(T: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(T))


def _capped(routing: Routing, capacity: int | None) -> torch.Tensor:
    """kept mask after an explicit capacity (rows past it, in token order, are dropped)."""
    if capacity is None:
        return routing.kept_TK
    kept = routing.kept_TK.clone()
    seen: dict[int, int] = {}
    for t in range(kept.shape[0]):
        for j in range(kept.shape[1]):
            if kept[t, j]:
                e = int(routing.expert_ids_TK[t, j])
                seen[e] = seen.get(e, 0) + 1
                kept[t, j] = seen[e] <= capacity
    return kept


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dispatch", list(DISPATCH_STRATEGIES))
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_permute_matches_reference_layout(case, dispatch, capacity):
    routing, E = _case(case)
    x = _x(routing.expert_ids_TK.shape[0])
    x_ND, layout_E, state = permute(x, routing, dispatch, num_experts=E, capacity=capacity)
    expected = ref.ref_permute(x, routing.expert_ids_TK, _capped(routing, capacity), E)
    assert int(layout_E.sum()) == x_ND.shape[0]
    assert state.counts_E.tolist() == [len(rows) for rows in expected]
    start = 0
    for e, rows in enumerate(expected):
        got = x_ND[start : start + int(layout_E[e])]
        assert torch.equal(got[: len(rows)], rows)
        assert torch.count_nonzero(got[len(rows) :]) == 0  # padding rows are zero
        start += int(layout_E[e])
    if capacity is not None or dispatch == "einsum":
        assert len(set(layout_E.tolist())) <= 1  # a capacity layout


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dispatch", list(DISPATCH_STRATEGIES))
@pytest.mark.parametrize("experts", list(EXPERT_STRATEGIES))
@pytest.mark.parametrize("capacity", [None, 5])
def test_dispatch_experts_combine_matches_reference(case, dispatch, experts, capacity):
    if experts == "grouped_mm" and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("grouped_mm not available on this torch/CPU")
    routing, E = _case(case)
    w = _weights(E)
    x = _x(routing.expert_ids_TK.shape[0])
    x_ND, layout_E, state = permute(x, routing, dispatch, num_experts=E, capacity=capacity)
    y_ND = experts_forward(x_ND, layout_E, w.w_gate_EDF, w.w_up_EDF, w.w_down_EFD, experts)
    y = unpermute(y_ND, state, dispatch)
    kept = _capped(routing, capacity)
    expected = ref.ref_moe(
        x, routing.expert_ids_TK, routing.weights_TK, kept, w.w_gate_EDF, w.w_up_EDF, w.w_down_EFD
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("experts", list(EXPERT_STRATEGIES))
def test_non_gated_relu_experts(experts):
    if experts == "grouped_mm" and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("grouped_mm not available on this torch/CPU")
    routing, E = _case("dropped_tokens")
    w = _weights(E, gated=False)
    x = _x(routing.expert_ids_TK.shape[0])
    x_ND, layout_E, state = permute(x, routing)
    y_ND = experts_forward(
        x_ND, layout_E, None, w.w_up_EDF, w.w_down_EFD, experts, activation="relu"
    )
    expected = ref.ref_moe(
        x,
        routing.expert_ids_TK,
        routing.weights_TK,
        routing.kept_TK,
        None,
        w.w_up_EDF,
        w.w_down_EFD,
        act=torch.relu,
    )
    torch.testing.assert_close(unpermute(y_ND, state), expected, atol=1e-5, rtol=1e-5)


def test_grouped_mm_pads_unaligned_dims():
    if not grouped_mm_available("cpu", torch.float32):
        pytest.skip("grouped_mm not available on this torch/CPU")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 5, generator=g), torch.randn(3, 5, 3, generator=g)
    counts = torch.tensor([2, 0, 5])
    expected = torch.cat([x[:2] @ w[0], x[2:] @ w[2]])
    got = EXPERT_STRATEGIES["grouped_mm"](x, counts, w)
    torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("experts", list(EXPERT_STRATEGIES))
def test_experts_on_cuda_bf16(experts):
    if experts == "grouped_mm" and not grouped_mm_available("cuda", torch.bfloat16):
        pytest.skip("grouped_mm not available on this GPU")
    routing, E = _case("expert_with_zero_tokens")
    w = _weights(E)
    x = _x(routing.expert_ids_TK.shape[0])
    expected = ref.ref_moe(
        x,
        routing.expert_ids_TK,
        routing.weights_TK,
        routing.kept_TK,
        w.w_gate_EDF,
        w.w_up_EDF,
        w.w_down_EFD,
    )
    cuda = {k: getattr(w, k).cuda().bfloat16() for k in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}
    dev_routing = Routing(
        *(
            t.cuda()
            for t in (
                routing.expert_ids_TK,
                routing.weights_TK,
                routing.kept_TK,
                routing.probs_TE,
                routing.aux_loss,
                routing.z_loss,
            )
        )
    )
    for dispatch in DISPATCH_STRATEGIES:
        x_ND, layout_E, state = permute(x.cuda().bfloat16(), dev_routing, dispatch)
        y_ND = experts_forward(
            x_ND, layout_E, cuda["w_gate_EDF"], cuda["w_up_EDF"], cuda["w_down_EFD"], experts
        )
        y = unpermute(y_ND, state, dispatch).float().cpu()
        torch.testing.assert_close(y, expected, atol=3e-2, rtol=3e-2)


def test_scale_inputs_weights_the_expert_input():
    """Llama 4 style: expert(w · x) instead of w · expert(x), for every dispatch."""
    g = torch.Generator().manual_seed(3)
    x, wr = torch.randn(10, D, generator=g), torch.randn(D, 4, generator=g)
    w = _weights(4)
    spec = RouterSpec(kind="sigmoid_top1", top_k=1)
    for dispatch in DISPATCH_STRATEGIES:
        out = moe_forward(x, wr, w, spec, dispatch=dispatch, scale_inputs=True)
        r = out.routing
        expected = ref.ref_moe(
            x,
            r.expert_ids_TK,
            r.weights_TK,
            r.kept_TK,
            w.w_gate_EDF,
            w.w_up_EDF,
            w.w_down_EFD,
            scale_inputs=True,
        )
        torch.testing.assert_close(out.y_TD, expected, atol=1e-5, rtol=1e-5)


def test_shared_expert_is_added_with_its_sigmoid_gate():
    g = torch.Generator().manual_seed(4)
    x, wr = torch.randn(6, D, generator=g), torch.randn(D, 4, generator=g)
    shared = SharedExpert(
        torch.randn(D, F, generator=g),
        torch.randn(D, F, generator=g),
        torch.randn(F, D, generator=g),
        gate_D=torch.randn(D, generator=g),
    )
    spec = RouterSpec(kind="softmax_topk", top_k=2)
    plain = moe_forward(x, wr, _weights(4), spec).y_TD
    with_shared = moe_forward(x, wr, _weights(4), spec, shared=shared).y_TD
    s = (torch.nn.functional.silu(x @ shared.w_gate_DF) * (x @ shared.w_up_DF)) @ shared.w_down_FD
    gate = torch.sigmoid(x @ shared.gate_D)[:, None]
    torch.testing.assert_close(with_shared - plain, gate * s, atol=1e-5, rtol=1e-5)


def test_unknown_strategies_name_the_allowed_ones():
    routing, E = _case("balanced")
    with pytest.raises(ConfigError, match="allowed: sort, einsum, index_add"):
        permute(_x(16), routing, "nope")
    w = _weights(E)
    with pytest.raises(ConfigError, match="allowed: loop, bmm, grouped_mm"):
        experts_forward(
            _x(4), torch.tensor([4, 0, 0, 0]), w.w_gate_EDF, w.w_up_EDF, w.w_down_EFD, "x"
        )


# ----------------------------------------------------------- random routings

RANDOM_SEEDS = list(range(6))


def _random_case(seed: int) -> tuple[Routing, int]:
    g = torch.Generator().manual_seed(100 + seed)
    E = int(torch.randint(1, 9, (1,), generator=g))
    K = int(torch.randint(1, E + 1, (1,), generator=g))
    T = int(torch.randint(1, 20, (1,), generator=g))
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    kept = torch.rand(T, K, generator=g) > float(torch.rand(1, generator=g)) * 0.5
    return _routing(ids, kept, E, seed), E


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_every_path_matches_reference_on_random_routings(seed):
    routing, E = _random_case(seed)
    w = _weights(E, seed)
    x = _x(routing.expert_ids_TK.shape[0])
    expected = ref.ref_moe(
        x,
        routing.expert_ids_TK,
        routing.weights_TK,
        routing.kept_TK,
        w.w_gate_EDF,
        w.w_up_EDF,
        w.w_down_EFD,
    )
    for dispatch in DISPATCH_STRATEGIES:
        for experts in EXPERT_STRATEGIES:
            if experts == "grouped_mm" and not grouped_mm_available("cpu", torch.float32):
                continue
            x_ND, layout_E, state = permute(x, routing, dispatch)
            y_ND = experts_forward(x_ND, layout_E, w.w_gate_EDF, w.w_up_EDF, w.w_down_EFD, experts)
            torch.testing.assert_close(
                unpermute(y_ND, state, dispatch),
                expected,
                atol=1e-5,
                rtol=1e-5,
                msg=lambda m, d=dispatch, e=experts: f"{d}/{e}: {m}",
            )


@pytest.mark.parametrize("experts", list(EXPERT_STRATEGIES))
def test_bf16_paths_track_the_fp32_reference(experts):
    if experts == "grouped_mm" and not grouped_mm_available("cpu", torch.bfloat16):
        pytest.skip("grouped_mm not available for bf16 on this CPU")
    routing, E = _case("dropped_tokens")
    w = _weights(E)
    x = _x(routing.expert_ids_TK.shape[0])
    expected = ref.ref_moe(
        x,
        routing.expert_ids_TK,
        routing.weights_TK,
        routing.kept_TK,
        w.w_gate_EDF,
        w.w_up_EDF,
        w.w_down_EFD,
    )
    bf = {k: getattr(w, k).bfloat16() for k in ("w_gate_EDF", "w_up_EDF", "w_down_EFD")}
    x_ND, layout_E, state = permute(x.bfloat16(), routing)
    y_ND = experts_forward(
        x_ND, layout_E, bf["w_gate_EDF"], bf["w_up_EDF"], bf["w_down_EFD"], experts
    )
    y = unpermute(y_ND, state)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dispatch", list(DISPATCH_STRATEGIES))
@pytest.mark.parametrize("experts", ["loop", "bmm"])  # grouped_mm has no CPU backward in torch 2.13
def test_gradients_agree_across_strategies(dispatch, experts):
    g = torch.Generator().manual_seed(8)
    x0, wr0 = torch.randn(10, D, generator=g), torch.randn(D, 4, generator=g)
    spec = RouterSpec(kind="softmax_topk", top_k=2, capacity_factor=1.0)

    def grads(dispatch: str, experts: str) -> list[torch.Tensor]:
        x, wr = x0.clone().requires_grad_(), wr0.clone().requires_grad_()
        w = _weights(4)
        up = w.w_up_EDF.clone().requires_grad_()
        out = moe_forward(
            x,
            wr,
            ExpertWeights(w.w_gate_EDF, up, w.w_down_EFD),
            spec,
            dispatch=dispatch,
            expert_strategy=experts,
        )
        (out.y_TD.square().sum() + out.routing.aux_loss).backward()
        return [x.grad, wr.grad, up.grad]

    for got, want in zip(grads(dispatch, experts), grads("index_add", "loop"), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _gpt_oss_row(x, gate, up, down, bg, bu, bd):
    g = (x @ gate + bg).clamp(max=7.0)
    u = (x @ up + bu).clamp(-7.0, 7.0)
    return ((u + 1) * g * torch.sigmoid(1.702 * g)) @ down + bd


@pytest.mark.parametrize("dispatch", list(DISPATCH_STRATEGIES))
@pytest.mark.parametrize("experts", list(EXPERT_STRATEGIES))
def test_biased_gpt_oss_experts_match_a_per_row_loop(dispatch, experts):
    if experts == "grouped_mm" and not grouped_mm_available("cpu", torch.float32):
        pytest.skip("grouped_mm not available on this torch/CPU")
    routing, E = _case("expert_with_zero_tokens")
    g = torch.Generator().manual_seed(9)
    w = _weights(E)
    gate, up = w.w_gate_EDF * 8, w.w_up_EDF * 8  # big enough to hit the ±7 clamps
    bg, bu, bd = (torch.randn(E, n, generator=g) for n in (F, F, D))
    x = _x(routing.expert_ids_TK.shape[0])
    x_ND, layout_E, state = permute(x, routing, dispatch, capacity=5)
    y_ND = experts_forward(
        x_ND,
        layout_E,
        gate,
        up,
        w.w_down_EFD,
        experts,
        activation="gpt_oss",
        b_gate_EF=bg,
        b_up_EF=bu,
        b_down_ED=bd,
    )
    want = torch.zeros_like(x)
    for t, j in zip(*torch.where(_capped(routing, 5)), strict=True):
        e = int(routing.expert_ids_TK[t, j])
        row = _gpt_oss_row(x[t], gate[e], up[e], w.w_down_EFD[e], bg[e], bu[e], bd[e])
        want[t] += routing.weights_TK[t, j] * row
    torch.testing.assert_close(unpermute(y_ND, state, dispatch), want, atol=1e-4, rtol=1e-5)


# (sources R, local experts L, counts or None for random): what the chunks look like
SORT_CHUNKS_CASES = {
    "hand": (2, 2, [[1, 2], [0, 1]]),  # rows s0e0, s0e1, s0e1, s1e1 -> e0: s0; e1: s0 s0 s1
    "interleaved": (2, 2, [[1, 1], [1, 1]]),  # s0e0 s0e1 s1e0 s1e1 -> s0e0 s1e0 s0e1 s1e1
    "one_source": (1, 3, None),
    "one_expert": (4, 1, None),  # the identity, no copy
    "random_4x3": (4, 3, None),
    "all_empty_but_one": (3, 2, [[0, 0], [0, 5], [0, 0]]),
    "nothing": (2, 3, [[0, 0, 0], [0, 0, 0]]),
}


@pytest.mark.parametrize("name", sorted(SORT_CHUNKS_CASES))
def test_sort_chunks_matches_chunk_by_chunk_reference(name: str) -> None:
    R, L, counts = SORT_CHUNKS_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    counts_RL = torch.randint(0, 4, (R, L), generator=g) if counts is None else torch.tensor(counts)
    x_MD = torch.randn(int(counts_RL.sum()), 3, generator=g)
    grouped_MD = sort_chunks(x_MD, counts_RL)
    torch.testing.assert_close(grouped_MD, ref.ref_sort_chunks(x_MD, counts_RL))
    torch.testing.assert_close(sort_chunks(grouped_MD, counts_RL, inverse=True), x_MD)


def test_sort_chunks_hand_case_order() -> None:
    x_MD = torch.arange(4.0)[:, None]
    assert sort_chunks(x_MD, torch.tensor([[1, 1], [1, 1]])).flatten().tolist() == [0, 2, 1, 3]
