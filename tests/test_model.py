"""moesim.model: parameter counts vs transformers (meta device), FLOPs and bytes vs closed forms.

The config dicts are the published ``config.json`` values of each model (typed
in from the Hub pages; no downloads). transformers builds each model on the
meta device (no memory, no weights) and counts its parameters: the oracle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moesim.config import load_scenario
from moesim.config.scenario import ModelConfig, Scenario
from moesim.errors import ConfigError
from moesim.model import count_params, forward_flops_per_token, params_per_rank
from moesim.model.collectives import cp_bytes, etp_bytes, layer_collective_bytes, tp_block_bytes
from moesim.model.flops import attention_core_flops, attention_proj_flops, matmul_params
from moesim.model.hf import COMMON_IGNORED, FAMILIES, hf_to_moesim

REPO = Path(__file__).resolve().parents[1]

DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "attention_bias": False,
    "ep_size": 1,
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "torch_dtype": "bfloat16",
}
MIXTRAL_8X7B: dict[str, Any] = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1e6,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "router_aux_loss_coef": 0.02,
    "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "max_window_layers": 48,
    "sliding_window": None,
    "use_sliding_window": False,
    "attention_bias": False,
    "rope_theta": 1e6,
    "max_position_embeddings": 40960,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
}
GPT_OSS_120B: dict[str, Any] = {
    "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
    "num_local_experts": 128, "num_experts_per_tok": 4, "experts_per_token": 4,
    "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 18,
    "attention_bias": True, "tie_word_embeddings": False, "swiglu_limit": 7.0,
    "initial_context_length": 4096, "max_position_embeddings": 131072, "hidden_act": "silu",
    "router_aux_loss_coef": 0.9, "rms_norm_eps": 1e-5,
}  # fmt: skip
QWEN2_57B_A14B: dict[str, Any] = {
    "model_type": "qwen2_moe",
    "architectures": ["Qwen2MoeForCausalLM"],
    "vocab_size": 151936,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "norm_topk_prob": False,
    "max_window_layers": 28,
    "sliding_window": 65536,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_theta": 1e6,
    "max_position_embeddings": 131072,
    "router_aux_loss_coef": 0.001,
    "rms_norm_eps": 1e-6,
}
MIXTRAL_8X22B: dict[str, Any] = MIXTRAL_8X7B | {
    "vocab_size": 32768,
    "hidden_size": 6144,
    "intermediate_size": 16384,
    "num_hidden_layers": 56,
    "num_attention_heads": 48,
    "max_position_embeddings": 65536,
}
ORACLE = {
    "deepseek-v3": DEEPSEEK_V3,
    "mixtral-8x7b": MIXTRAL_8X7B,
    "qwen3-30b-a3b": QWEN3_30B_A3B,
    "gpt-oss-120b": GPT_OSS_120B,
    "qwen2-57b-a14b": QWEN2_57B_A14B,
    "mixtral-8x22b": MIXTRAL_8X22B,
}
#: the totals the model cards state (billions), a coarse check on the oracle itself
CARD_B = {"deepseek-v3": 671.0, "mixtral-8x7b": 46.7, "qwen3-30b-a3b": 30.5, "gpt-oss-120b": 116.8,
          "qwen2-57b-a14b": 57.4, "mixtral-8x22b": 140.6}  # fmt: skip


def _model(cfg: dict[str, Any]) -> ModelConfig:
    fields, _ = hf_to_moesim(cfg)
    return ModelConfig.model_validate(fields | {"dense": fields["dense"] | {"seq_length": 4096}})


def _hf_count(cfg: dict[str, Any]) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(ORACLE))
def test_parameter_counts_equal_transformers_on_meta_device(name: str) -> None:
    cfg = ORACLE[name]
    total = count_params(_model(cfg)).total
    assert total == _hf_count(cfg)
    assert total / 1e9 == pytest.approx(CARD_B[name], rel=0.01)


def test_every_field_transformers_writes_is_known_or_ignored() -> None:
    transformers = pytest.importorskip("transformers")
    base = set(transformers.PretrainedConfig().to_dict())
    for kind, (known, _) in FAMILIES.items():
        cls = type(transformers.AutoConfig.for_model(kind))
        missing = set(cls().to_dict()) - base - known - COMMON_IGNORED
        assert missing == set(), (kind, missing)


def test_active_parameters_match_the_model_cards() -> None:
    # DeepSeek-V3: 37B activated; Mixtral 12.9B; GPT-OSS 5.1B; Qwen3 3.3B, which counts
    # its 0.31B input embedding (the others' cards do not)
    cards = [("deepseek-v3", 37.5, 0), ("mixtral-8x7b", 12.9, 0),
             ("qwen3-30b-a3b", 3.3, 1), ("gpt-oss-120b", 5.13, 0)]  # fmt: skip
    for name, active_b, embedding in cards:
        c = count_params(_model(ORACLE[name]))
        main_active = c.active - c.mtp_active + embedding * c.embedding
        assert main_active / 1e9 == pytest.approx(active_b, rel=0.03), name


def test_mtp_module_of_deepseek_v3() -> None:
    c = count_params(_model(DEEPSEEK_V3))
    # one MoE layer (MLA + 256 experts + shared + router + norms) + eh_proj 2D x D + 3 norms
    D = 7168
    layer = (count_params(_model(DEEPSEEK_V3)).experts + c.moe_other) / 58 + c.attention / 61
    assert c.mtp == pytest.approx(layer + 2 * D * D + 3 * D, abs=1)
    assert (c.total + c.mtp) / 1e9 == pytest.approx(682.5, abs=0.5)


# -- FLOPs vs closed forms ------------------------------------------------------------


def test_mla_flops_per_token_closed_form() -> None:
    d = _model(DEEPSEEK_V3).dense
    assert d is not None
    D, H = 7168, 128
    proj = 2 * (D * 1536 + 1536 * H * 192 + D * (512 + 64) + 512 * H * (128 + 128) + H * 128 * D)
    assert attention_proj_flops(d, D) == proj
    assert attention_core_flops(d) == 2 * H * (192 + 128) * 4096 / 2
    # MLA's projections are about half of what 128x128 MHA would cost
    assert proj / (2 * 4 * D * H * 128) == pytest.approx(0.4, abs=0.05)


def test_gqa_flops_per_token_closed_form() -> None:
    d = _model(QWEN3_30B_A3B).dense
    assert d is not None
    D, H, KV, hd = 2048, 32, 4, 128
    assert attention_proj_flops(d, D) == 2 * (D * H * hd + 2 * D * KV * hd + H * hd * D)
    assert attention_core_flops(d) == 2 * H * 2 * hd * 4096 / 2


def test_forward_flops_is_two_n_plus_attention() -> None:
    m = _model(MIXTRAL_8X7B)
    D, F, V, L = 4096, 14336, 32000, 32
    attn = D * 4096 + 2 * D * 1024 + 4096 * D
    n = L * (attn + 2 * 3 * D * F + D * 8) + V * D  # top-2 experts, router, LM head
    assert matmul_params(m) == n
    assert forward_flops_per_token(m) == 2 * n + L * 2 * 32 * 256 * 2048


def test_sliding_layers_see_their_window() -> None:
    m = _model(GPT_OSS_120B)
    d = m.dense
    assert d is not None and d.num_sliding_layers == 18 and d.sliding_window == 128
    S, W = 4096, 128
    core = 2 * 64 * 128 * (18 * S / 2 + 18 * W * (1 - W / (2 * S)))
    assert forward_flops_per_token(m) == 2 * matmul_params(m) + core


# -- collective bytes vs closed forms -------------------------------------------------


def test_collective_bytes_closed_forms() -> None:
    T, D, b = 4096, 7168, 2
    assert tp_block_bytes(T, D, b, 1) == 0
    assert tp_block_bytes(T, D, b, 4) == 2 * 3 * T * D * b  # AG + RS, 3 shards out each
    assert etp_bytes(1000, D, b, 2) == 2 * 1000 * D * b
    d = _model(DEEPSEEK_V3).dense
    assert d is not None  # MLA: K (192) and V (128) of the rank's 128/tp heads
    assert cp_bytes(T, d, b, 4, 2, backward=False) == 3 * T * (192 + 128) * 64 * b
    assert cp_bytes(T, d, b, 4, 2, backward=True) == 2 * 3 * T * 320 * 64 * b
    q = _model(QWEN3_30B_A3B).dense
    assert q is not None  # GQA: 4 KV heads of 128, split over tp=2
    assert cp_bytes(T, q, b, 2, 2, backward=False) == T * 256 * 2 * b


def test_layer_collective_bytes_of_a_folded_scenario() -> None:
    folded = ["parallel.tp=2", "parallel.cp=2", "parallel.etp=2", "parallel.ep=4"]
    scn = load_scenario(REPO / "scenarios/qwen3-30b-a3b-16xh100.yaml", folded)
    T, D = 8192, 2048
    got = layer_collective_bytes(scn, expert_rows=5000)
    assert got == {"tp_attn": 2 * T * D * 2, "tp_shared": 0.0, "etp": 2 * 5000 * D * 2,
                   "cp": T * 2 * 128 * 2 * 2}  # fmt: skip


# -- params per rank -------------------------------------------------------------------


def test_params_per_rank_splits_experts_over_ep_etp_and_the_rest_over_tp() -> None:
    scn = load_scenario(REPO / "scenarios/mixtral-8x7b-8xh100.yaml",
                        ["parallel.ep=4", "parallel.tp=2"])  # fmt: skip
    c = count_params(scn.model)
    r = params_per_rank(scn)
    assert r.expert == c.experts / 4
    assert r.non_expert == (c.attention + c.moe_other) / 2
    assert r.embedding == (c.embedding + c.lm_head) / 2


# -- HF config loading -----------------------------------------------------------------


def _scenario_with_hf(tmp_path: Path, cfg: dict[str, Any], extra: str = "") -> Path:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    text = (
        "name: hf\nhardware: h100-sxm\ncluster: {nodes: 1, gpus_per_node: 8}\n"
        "model: {hf_config: config.json, dtype: bf16, dense: {seq_length: 4096}" + extra + "}\n"
        "parallel: {ep: 8}\n"
    )
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_scenario_takes_its_model_from_a_hf_config(tmp_path: Path) -> None:
    scn = load_scenario(_scenario_with_hf(tmp_path, DEEPSEEK_V3))
    assert isinstance(scn, Scenario)
    d = scn.model.dense
    assert d is not None and d.kind == "mla" and d.kv_lora_rank == 512 and d.seq_length == 4096
    assert scn.model.num_moe_layers == 58 and scn.model.mtp_num_layers == 1
    assert scn.router.kind == "sigmoid_topk" and scn.router.n_group == 8
    assert count_params(scn.model).total == count_params(_model(DEEPSEEK_V3)).total
    over = load_scenario(_scenario_with_hf(tmp_path, MIXTRAL_8X7B, ", top_k: 1"))
    assert over.model.top_k == 1  # keys next to hf_config override it


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        (MIXTRAL_8X7B | {"frobnicate": 1}, "frobnicate: unknown field(s) for mixtral: frobnicate"),
        (MIXTRAL_8X7B | {"hidden_act": "gelu"}, "hidden_act = 'gelu': unsupported value"),
        ({"model_type": "bert"}, "model_type = 'bert': unsupported model family"),
        ({k: v for k, v in MIXTRAL_8X7B.items() if k != "hidden_size"}, "hidden_size: required"),
    ],
)
def test_bad_hf_configs_name_the_field(tmp_path: Path, cfg: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=r"config\.json") as err:
        load_scenario(_scenario_with_hf(tmp_path, cfg))
    assert needle in str(err.value)


SHIPPED = {
    "deepseek-v3-256xh800": "deepseek-v3",
    "deepseek-v3-2048xh800": "deepseek-v3",
    "mixtral-8x7b-8xh100": "mixtral-8x7b",
    "qwen3-30b-a3b-16xh100": "qwen3-30b-a3b",
    "gpt-oss-120b-8xh100": "gpt-oss-120b",
}


@pytest.mark.parametrize("scenario", list(SHIPPED))
def test_shipped_scenarios_have_the_real_shapes(scenario: str) -> None:
    scn = load_scenario(REPO / f"scenarios/{scenario}.yaml")
    real = _model(ORACLE[SHIPPED[scenario]])
    assert real.dense is not None and scn.model.dense is not None
    seq = {"seq_length": scn.model.dense.seq_length}
    real = real.model_copy(update={"dense": real.dense.model_copy(update=seq)})
    assert count_params(scn.model) == count_params(real)
    assert forward_flops_per_token(scn.model) == forward_flops_per_token(real)


@pytest.mark.parametrize(
    ("row_id", "name"),
    [("folding-mixtral-8x22b-h100-mfu", "mixtral-8x22b"),
     ("folding-qwen2-57b-a14b-h100-mfu", "qwen2-57b-a14b")],
)  # fmt: skip
def test_published_folding_rows_have_the_real_shapes(row_id: str, name: str) -> None:
    from moesim.validation.published import load_published

    row = next(r for r in load_published().rows if r.id == row_id)
    assert count_params(row.scenario.model) == count_params(_model(ORACLE[name]))


def test_cli_simulates_a_hf_config_and_exits_2_on_a_bad_one(tmp_path: Path, capsys) -> None:
    from moesim.cli import main

    path = _scenario_with_hf(tmp_path, QWEN3_30B_A3B, ", num_moe_layers: 2")
    assert main(["simulate", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mfu"] > 0 and out["details"]["flop_formula"]
    bad = _scenario_with_hf(tmp_path, QWEN3_30B_A3B | {"rope_kind": "x"})
    assert main(["simulate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json: rope_kind: unknown field(s) for qwen3_moe: rope_kind" in err
    assert "\n" not in err
