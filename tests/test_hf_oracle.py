"""Our routers and MoE layer against Hugging Face transformers as the oracle.

Semantics were first read from **transformers 5.23.0**; the tests run against the
installed release, whose version pytest prints in its header (``conftest.py``), and the
CI constraints file pins it (``constraints/ci.txt``). Modules read:
``models/{mixtral,qwen2_moe,qwen3_moe,olmoe,deepseek_v3,switch_transformers,
gpt_oss,llama4,granitemoe,dbrx,jetmoe}/modeling_*.py``. Tiny randomly initialised
blocks are built from configs on CPU (no hub downloads); for each we check
that ``route`` picks the same expert sets with the same weights (1e-6), the
same Mixtral/Qwen/Switch aux loss and Switch z-loss, and that ``moe_forward``
with their weights copied in gives their block output (GPT-OSS through its
clamped, biased GLU: ``activation="gpt_oss"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moesim.kernels.experts import ExpertWeights, SharedExpert, moe_forward  # noqa: E402
from moesim.kernels.gating import RouterSpec, route  # noqa: E402

torch.set_num_threads(1)

D, F, B, S = 16, 24, 2, 12  # hidden, expert FFN, batch, sequence


# ------------------------------------------------------------------ helpers


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return module.eval()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))


def _split_gate_up(gate_up_E2FD: torch.Tensor, down_EDF: torch.Tensor) -> ExpertWeights:
    """HF v5 fused layout: gate_up [E, 2F, D] (gate first), down [E, D, F]."""
    f = gate_up_E2FD.shape[1] // 2
    gate = gate_up_E2FD[:, :f].transpose(1, 2)
    up = gate_up_E2FD[:, f:].transpose(1, 2)
    return ExpertWeights(gate, up, down_EDF.transpose(1, 2))


def _mlp(mlp: Any, gate: torch.Tensor | None = None) -> SharedExpert:
    return SharedExpert(
        mlp.gate_proj.weight.t(), mlp.up_proj.weight.t(), mlp.down_proj.weight.t(), gate
    )


@dataclass
class Model:
    """How to build one HF MoE block and read it as our pieces."""

    name: str
    build: Callable[[], torch.nn.Module]
    spec: RouterSpec
    router: Callable[[Any, torch.Tensor], tuple]  # (block, x_TD) -> (logits, weights, ids)
    router_weight: Callable[[Any], torch.Tensor]  # -> [D, E]
    experts: Callable[[Any], ExpertWeights] | None
    shared: Callable[[Any], SharedExpert | None] = lambda b: None
    bias: Callable[[Any], torch.Tensor | None] = lambda b: None
    router_bias: Callable[[Any], torch.Tensor | None] = lambda b: None
    forward_kwargs: dict = field(default_factory=dict)
    aux: bool = True  # HF has the Mixtral load-balancing loss for this model


def _mixtral() -> torch.nn.Module:
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=8, num_experts_per_tok=2
    )
    return _init(MixtralSparseMoeBlock(cfg), 10)


def _qwen2() -> torch.nn.Module:
    from transformers.models.qwen2_moe.modeling_qwen2_moe import (
        Qwen2MoeConfig,
        Qwen2MoeSparseMoeBlock,
    )

    cfg = Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        shared_expert_intermediate_size=2 * F,
        num_experts=12,
        num_experts_per_tok=4,
        norm_topk_prob=False,
    )
    return _init(Qwen2MoeSparseMoeBlock(cfg), 11)


def _qwen3() -> torch.nn.Module:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (
        Qwen3MoeConfig,
        Qwen3MoeSparseMoeBlock,
    )

    cfg = Qwen3MoeConfig(
        hidden_size=D,
        moe_intermediate_size=F,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
    )
    return _init(Qwen3MoeSparseMoeBlock(cfg), 12)


def _olmoe() -> torch.nn.Module:
    from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock

    cfg = OlmoeConfig(
        hidden_size=D,
        intermediate_size=F,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=False,
    )
    return _init(OlmoeSparseMoeBlock(cfg), 13)


def _deepseek_v3() -> torch.nn.Module:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Config,
        DeepseekV3MoE,
    )

    cfg = DeepseekV3Config(
        hidden_size=D,
        moe_intermediate_size=F,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    block = _init(DeepseekV3MoE(cfg), 14)
    g = torch.Generator().manual_seed(15)
    block.gate.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.2)  # ± values
    return block


def _switch() -> torch.nn.Module:
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersConfig,
        SwitchTransformersSparseMLP,
    )

    cfg = SwitchTransformersConfig(
        d_model=D, d_ff=F, num_experts=4, expert_capacity=2, router_jitter_noise=0.0
    )
    return _init(SwitchTransformersSparseMLP(cfg), 16)


def _gpt_oss() -> torch.nn.Module:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssConfig, GptOssMLP

    cfg = GptOssConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=8, num_experts_per_tok=4
    )
    block = _init(GptOssMLP(cfg), 17)
    block.experts.gate_up_proj.data *= 12  # large enough that the ±7 clamps bite
    return block


def _llama4() -> torch.nn.Module:
    from transformers.models.llama4.modeling_llama4 import Llama4TextConfig, Llama4TextMoe

    cfg = Llama4TextConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=4, num_experts_per_tok=1
    )
    return _init(Llama4TextMoe(cfg), 18)


def _granite() -> torch.nn.Module:
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeConfig, GraniteMoeMoE

    cfg = GraniteMoeConfig(
        hidden_size=D, intermediate_size=F, num_local_experts=8, num_experts_per_tok=2
    )
    return _init(GraniteMoeMoE(cfg), 19)


def _dbrx() -> torch.nn.Module:
    from transformers.models.dbrx.modeling_dbrx import DbrxConfig, DbrxFFN

    cfg = DbrxConfig(
        d_model=D,
        ffn_config=dict(
            ffn_hidden_size=F,
            moe_num_experts=8,
            moe_top_k=4,
            moe_normalize_expert_weights=1.0,
            moe_jitter_eps=None,
        ),
    )
    return _init(DbrxFFN(cfg), 20)


def _dbrx_experts(b: Any) -> ExpertWeights:
    E = b.experts.num_experts
    w1, v1, w2 = (getattr(b.experts.mlp, n).view(E, F, D) for n in ("w1", "v1", "w2"))
    return ExpertWeights(w1.transpose(1, 2), v1.transpose(1, 2), w2)


def _llama4_router(b: Any, x: torch.Tensor) -> tuple:
    scores_TE, logits = b.router(x)
    ids = torch.topk(logits, 1, dim=-1)[1]
    return logits, scores_TE.gather(1, ids), ids


def _llama4_experts(b: Any) -> ExpertWeights:
    gate_up, down = b.experts.gate_up_proj, b.experts.down_proj
    return ExpertWeights(gate_up[..., :F], gate_up[..., F:], down)


def _dbrx_router(b: Any, x: torch.Tensor) -> tuple:
    logits = b.router(x)
    weights, ids = b.route_tokens_to_experts(logits)
    return logits, weights, ids


def _gpt_oss_experts(b: Any) -> ExpertWeights:
    """GPT-OSS: gate_up [E, D, 2F] interleaved (gate even, up odd columns), biases."""
    ex = b.experts
    return ExpertWeights(
        ex.gate_up_proj[..., ::2],
        ex.gate_up_proj[..., 1::2],
        ex.down_proj,
        "gpt_oss",
        b_gate_EF=ex.gate_up_proj_bias[..., ::2],
        b_up_EF=ex.gate_up_proj_bias[..., 1::2],
        b_down_ED=ex.down_proj_bias,
    )


def _std_experts(b: Any) -> ExpertWeights:
    return _split_gate_up(b.experts.gate_up_proj, b.experts.down_proj)


MODELS = [
    Model(
        "mixtral",
        _mixtral,
        RouterSpec(kind="softmax_topk", top_k=2, normalize=True),
        lambda b, x: b.gate(x),
        lambda b: b.gate.weight.t(),
        _std_experts,
    ),
    Model(
        "qwen2_moe",
        _qwen2,
        RouterSpec(kind="softmax_topk", top_k=4),
        lambda b, x: b.gate(x),
        lambda b: b.gate.weight.t(),
        _std_experts,
        shared=lambda b: _mlp(b.shared_expert, b.shared_expert_gate.weight[0]),
    ),
    Model(
        "qwen3_moe",
        _qwen3,
        RouterSpec(kind="softmax_topk", top_k=4, normalize=True),
        lambda b, x: b.gate(x),
        lambda b: b.gate.weight.t(),
        _std_experts,
    ),
    Model(
        "olmoe",
        _olmoe,
        RouterSpec(kind="softmax_topk", top_k=4),
        lambda b, x: b.gate(x),
        lambda b: b.gate.weight.t(),
        _std_experts,
    ),
    Model(
        "deepseek_v3",
        _deepseek_v3,
        RouterSpec(
            kind="sigmoid_topk",
            top_k=4,
            n_group=4,
            topk_group=2,
            normalize=True,
            routed_scaling_factor=2.5,
        ),
        lambda b, x: b.gate(x),
        lambda b: b.gate.weight.t(),
        _std_experts,
        shared=lambda b: _mlp(b.shared_experts),
        bias=lambda b: b.gate.e_score_correction_bias,
        aux=False,
    ),
    Model(
        "gpt_oss",
        _gpt_oss,
        RouterSpec(kind="topk_softmax", top_k=4),
        lambda b, x: b.router(x),
        lambda b: b.router.weight.t(),
        _gpt_oss_experts,
        router_bias=lambda b: b.router.bias,
    ),
    Model(
        "granitemoe",
        _granite,
        RouterSpec(kind="topk_softmax", top_k=2),
        lambda b, x: b.router(x),
        lambda b: b.router.weight.t(),
        _std_experts,
    ),
    Model(
        "llama4",
        _llama4,
        RouterSpec(kind="sigmoid_top1", top_k=1),
        _llama4_router,
        lambda b: b.router.weight.t(),
        _llama4_experts,
        shared=lambda b: _mlp(b.shared_expert),
        forward_kwargs=dict(scale_inputs=True),
        aux=False,
    ),
    Model(
        "dbrx",
        _dbrx,
        RouterSpec(kind="softmax_topk", top_k=4, norm_p=1.0),
        _dbrx_router,
        lambda b: b.router.layer.weight.t(),
        _dbrx_experts,
    ),
]
IDS = [m.name for m in MODELS]


def _hf_out(block: Any, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return (out[0] if isinstance(out, tuple) else out).reshape(-1, D)


def _assert_same_choice(ids_hf, w_hf, ids, w):
    order_hf, order = ids_hf.sort(dim=-1), ids.sort(dim=-1)
    assert torch.equal(order_hf.values, order.values), "expert sets differ"
    torch.testing.assert_close(
        w.gather(1, order.indices), w_hf.float().gather(1, order_hf.indices), atol=1e-6, rtol=0
    )


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_router_matches_transformers(model):
    block = model.build()
    x = _x().reshape(-1, D)
    with torch.no_grad():
        logits, w_hf, ids_hf = model.router(block, x)
        r = route(logits, model.spec, model.bias(block))
    assert r.kept_TK.all()
    _assert_same_choice(ids_hf, w_hf, r.expert_ids_TK, r.weights_TK)


@pytest.mark.parametrize(
    "model", [m for m in MODELS if m.aux], ids=[m.name for m in MODELS if m.aux]
)
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_matches_transformers(model, masked):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    block = model.build()
    x = _x().reshape(-1, D)
    mask_BS = (torch.arange(S) < S - 3).repeat(B, 1).long() if masked else None
    with torch.no_grad():
        logits = model.router(block, x)[0]
        r = route(logits, model.spec, token_mask_T=None if mask_BS is None else mask_BS.reshape(-1))
        E = logits.shape[1]
        want = load_balancing_loss_func((logits,), E, model.spec.top_k, mask_BS)
    assert float(r.aux_loss) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize(
    "model", [m for m in MODELS if m.experts], ids=[m.name for m in MODELS if m.experts]
)
def test_moe_block_matches_transformers(model):
    block = model.build()
    x = _x()
    assert model.experts is not None
    with torch.no_grad():
        want = _hf_out(block, x)
        got = moe_forward(
            x.reshape(-1, D),
            model.router_weight(block),
            model.experts(block),
            model.spec,
            bias_E=model.bias(block),
            router_bias_E=model.router_bias(block),
            shared=model.shared(block),
            **model.forward_kwargs,
        )
    torch.testing.assert_close(got.y_TD, want, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------- Switch


def _switch_spec() -> RouterSpec:
    # expert_capacity 2 per sequence of 12 over 4 experts = ceil((12/4)·cf) with cf 2/3
    return RouterSpec(
        kind="switch_top1",
        top_k=1,
        capacity_factor=2 / 3,
        capacity_per="sequence",
        sequence_length=S,
        drop_policy="position",
    )


def test_switch_router_capacity_and_losses_match_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func,
        router_z_loss_func,
    )

    block = _switch()
    x = _x(2)
    with torch.no_grad():
        onehot_BSE, probs_BS1, logits_BSE = block.router(x)
        r = route(logits_BSE.reshape(-1, 4), _switch_spec())
        aux = load_balancing_loss_func(torch.softmax(logits_BSE, -1), logits_BSE.argmax(-1))
        z = router_z_loss_func(logits_BSE)
    kept_hf = onehot_BSE.reshape(-1, 4).sum(-1).bool()
    assert torch.equal(r.kept_TK[:, 0], kept_hf)
    assert torch.equal(r.expert_ids_TK[kept_hf, 0], onehot_BSE.reshape(-1, 4)[kept_hf].argmax(-1))
    assert (~kept_hf).any(), "the case should drop tokens"
    torch.testing.assert_close(
        r.weights_TK[:, 0], probs_BS1.reshape(-1) * kept_hf, atol=1e-6, rtol=0
    )
    assert float(r.aux_loss) == pytest.approx(float(aux), rel=1e-6)
    assert float(r.z_loss) == pytest.approx(float(z), rel=1e-6)


def test_switch_block_matches_transformers_including_dropped_tokens():
    block = _switch()
    x = _x(2)
    experts = [block.experts[f"expert_{e}"] for e in range(4)]
    weights = ExpertWeights(
        None,
        torch.stack([m.wi.weight.t() for m in experts]),
        torch.stack([m.wo.weight.t() for m in experts]),
        activation="relu",
    )
    with torch.no_grad():
        want = block(x).reshape(-1, D)
        got = moe_forward(
            x.reshape(-1, D),
            block.router.classifier.weight.t(),
            weights,
            _switch_spec(),
            dispatch="einsum",
            expert_strategy="bmm",
        )
    assert got.routing.dropped_fraction() > 0
    torch.testing.assert_close(got.y_TD, want, atol=1e-5, rtol=1e-5)


def test_z_loss_matches_switch_formula_for_any_router():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        router_z_loss_func,
    )

    logits = torch.randn(B, S, 8, generator=torch.Generator().manual_seed(3)) * 3
    r = route(logits.reshape(-1, 8), RouterSpec(kind="softmax_topk", top_k=2))
    assert float(r.z_loss) == pytest.approx(float(router_z_loss_func(logits)), rel=1e-6)


def test_jetmoe_router_and_sorted_layout_match_transformers():
    """JetMoE's gating returns a sort-based permutation: compare it with ``permute``."""
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeTopKGating

    from moesim.kernels.dispatch import permute

    gating = _init(JetMoeTopKGating(D, 8, 2), 21)
    x = _x(4).reshape(-1, D)
    with torch.no_grad():
        _, token_hf, gates_hf, sizes_hf, logits = gating(x)
        r = route(logits, RouterSpec(kind="topk_softmax", top_k=2))
        _, layout_E, state = permute(x, r, "sort")
    assert layout_E.tolist() == sizes_hf
    start = 0
    for rows in sizes_hf:  # same (token, weight) pairs per expert; HF's sort is not stable
        want = sorted(
            zip(
                token_hf[start : start + rows].tolist(),
                gates_hf[start : start + rows].tolist(),
                strict=True,
            )
        )
        got = sorted(
            zip(
                state.token_N[start : start + rows].tolist(),
                state.weight_N[start : start + rows].tolist(),
                strict=True,
            )
        )
        assert [t for t, _ in got] == [t for t, _ in want]
        assert [w for _, w in got] == pytest.approx([w for _, w in want], abs=1e-6)
        start += rows
