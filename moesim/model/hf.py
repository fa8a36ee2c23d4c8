"""Model shapes from a Hugging Face ``config.json`` (parsed as JSON, no transformers).

A scenario may write ``model: {hf_config: path/to/config.json, ...}``; the
file's fields become ``model`` (and ``router``) fields, and keys written next
to ``hf_config`` override them. Field names follow each family's
``transformers`` config class (``DeepseekV3Config``, ``MixtralConfig``,
``Qwen3MoeConfig``, ``Qwen2MoeConfig``, ``GptOssConfig``); the tests check the
tables below against those classes. A field this module does not know, or a
value it cannot model, is a one-line error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesim.errors import ConfigError

Json = dict[str, Any]

#: fields every family may carry that do not change shapes or cost
COMMON_IGNORED = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
        "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "rms_norm_eps",
        "use_cache", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
        "attention_dropout", "router_aux_loss_coef", "output_router_logits", "auto_map",
        "max_window_layers", "use_sliding_window", "router_jitter_noise", "quantization_config",
        "ep_size", "aux_loss_alpha", "seq_aux", "initializer_factor", "_name_or_path",
        "use_qk_norm", "swiglu_limit", "swiglu_alpha", "router_z_loss_coef", "qk_head_dim",
        "initial_context_length", "id2label", "label2id", "chunk_size_feed_forward",
        "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
        "return_dict", "tie_encoder_decoder",
    }
)  # fmt: skip


def _need(cfg: Json, key: str, file: str) -> Any:
    if key not in cfg:
        raise ConfigError("required field is missing", file=file, field=key, has_value=False)
    return cfg[key]


def _check_value(cfg: Json, key: str, allowed: tuple[Any, ...], file: str) -> None:
    if key in cfg and cfg[key] not in allowed:
        raise ConfigError(
            f"unsupported value; moesim models {', '.join(map(repr, allowed))}",
            file=file,
            field=key,
            value=cfg[key],
        )


def _gqa(cfg: Json, file: str) -> Json:
    H = _need(cfg, "num_attention_heads", file)
    D = _need(cfg, "hidden_size", file)
    return {
        "num_attention_heads": H,
        "num_key_value_heads": cfg.get("num_key_value_heads") or H,
        "head_dim": cfg.get("head_dim") or D // H,
    }


def _common(cfg: Json, file: str) -> Json:
    _check_value(cfg, "hidden_act", ("silu",), file)
    return {
        "hidden_size": _need(cfg, "hidden_size", file),
        "vocab_size": _need(cfg, "vocab_size", file),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def _mixtral(cfg: Json, file: str) -> tuple[Json, Json]:
    _check_value(cfg, "sliding_window", (None,), file)
    model = _common(cfg, file) | {
        "moe_intermediate_size": _need(cfg, "intermediate_size", file),
        "num_experts": _need(cfg, "num_local_experts", file),
        "top_k": _need(cfg, "num_experts_per_tok", file),
        "num_moe_layers": _need(cfg, "num_hidden_layers", file),
        "dense": _gqa(cfg, file),
    }
    return model, {"kind": "softmax_topk", "normalize": True}


def _qwen_moe(cfg: Json, file: str) -> tuple[Json, Json]:
    """Qwen2-MoE / Qwen3-MoE: MoE every ``decoder_sparse_step``-th layer."""
    _check_value(cfg, "mlp_only_layers", ([], None), file)
    _check_value(cfg, "use_sliding_window", (False, None), file)
    layers = _need(cfg, "num_hidden_layers", file)
    step = int(cfg.get("decoder_sparse_step", 1))
    if layers % step:
        raise ConfigError(
            f"must divide num_hidden_layers ({layers})", file=file, field="decoder_sparse_step",
            value=step,
        )  # fmt: skip
    qwen3 = cfg.get("model_type") == "qwen3_moe"
    dense = _gqa(cfg, file) | ({"qk_norm": True} if qwen3 else {"qkv_bias": True})
    if qwen3 and cfg.get("attention_bias"):
        dense["attention_bias"] = True
    model = _common(cfg, file) | {
        "moe_intermediate_size": _need(cfg, "moe_intermediate_size", file),
        "num_experts": cfg.get("num_experts") or _need(cfg, "num_local_experts", file),
        "top_k": _need(cfg, "num_experts_per_tok", file),
        "num_moe_layers": layers // step,
        "moe_layer_freq": step,
        "dense": dense,
    }
    if step > 1:
        dense["dense_intermediate_size"] = _need(cfg, "intermediate_size", file)
    shared = cfg.get("shared_expert_intermediate_size") or 0
    if shared:
        model |= {
            "num_shared_experts": 1,
            "shared_expert_intermediate_size": shared,
            "shared_expert_gate": True,
        }
    router = {"kind": "softmax_topk", "normalize": bool(cfg.get("norm_topk_prob", False))}
    return model, router


def _deepseek_v3(cfg: Json, file: str) -> tuple[Json, Json]:
    _check_value(cfg, "moe_layer_freq", (1,), file)
    _check_value(cfg, "scoring_func", ("sigmoid",), file)
    _check_value(cfg, "topk_method", ("noaux_tc",), file)
    _check_value(cfg, "attention_bias", (False,), file)
    layers = _need(cfg, "num_hidden_layers", file)
    first = int(cfg.get("first_k_dense_replace", 0))
    n_shared = int(cfg.get("n_shared_experts") or 0)
    F = _need(cfg, "moe_intermediate_size", file)
    mla = {
        k: _need(cfg, k, file)
        for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    }
    H = _need(cfg, "num_attention_heads", file)
    dense = {
        "attention": "mla",
        "num_attention_heads": H,
        "num_key_value_heads": cfg.get("num_key_value_heads") or H,
        "head_dim": mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"],
        "q_lora_rank": cfg.get("q_lora_rank"),
        **mla,
        "num_dense_layers": first,
        "dense_intermediate_size": _need(cfg, "intermediate_size", file),
    }
    model = _common(cfg, file) | {
        "moe_intermediate_size": F,
        "num_experts": _need(cfg, "n_routed_experts", file),
        "top_k": _need(cfg, "num_experts_per_tok", file),
        "num_moe_layers": layers - first,
        "num_shared_experts": 1 if n_shared else 0,
        "mtp_num_layers": int(cfg.get("num_nextn_predict_layers") or 0),
        "dense": dense,
    }
    if n_shared:  # HF builds one shared MLP of n_shared * F
        model["shared_expert_intermediate_size"] = n_shared * F
    router = {
        "kind": "sigmoid_topk",
        "normalize": bool(cfg.get("norm_topk_prob", True)),
        "n_group": cfg.get("n_group"),
        "topk_group": cfg.get("topk_group"),
        "routed_scaling_factor": cfg.get("routed_scaling_factor", 1.0),
    }
    return model, router


def _gpt_oss(cfg: Json, file: str) -> tuple[Json, Json]:
    types = cfg.get("layer_types") or []
    allowed = {"sliding_attention", "full_attention"}
    bad = sorted(set(types) - allowed)
    if bad:
        raise ConfigError(f"unsupported layer types; moesim models {sorted(allowed)}",
                          file=file, field="layer_types", value=bad)  # fmt: skip
    dense = _gqa(cfg, file) | {
        "attention_bias": bool(cfg.get("attention_bias", True)),
        "attention_sinks": True,
        "sliding_window": cfg.get("sliding_window"),
        "num_sliding_layers": types.count("sliding_attention"),
    }
    model = _common(cfg, file) | {
        "moe_intermediate_size": _need(cfg, "intermediate_size", file),
        "num_experts": _need(cfg, "num_local_experts", file),
        "top_k": _need(cfg, "num_experts_per_tok", file),
        "num_moe_layers": _need(cfg, "num_hidden_layers", file),
        "router_bias": True,
        "expert_bias": True,
        "dense": dense,
    }
    return model, {"kind": "topk_softmax"}


#: model_type -> (fields it reads beyond the common ones, mapping)
FAMILIES: dict[str, tuple[frozenset[str], Callable[[Json, str], tuple[Json, Json]]]] = {
    "mixtral": (
        frozenset({"hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "vocab_size", "tie_word_embeddings", "hidden_act", "sliding_window"}),
        _mixtral,
    ),
    "qwen3_moe": (
        frozenset({"hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts",
                   "num_experts_per_tok", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                   "hidden_act", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
                   "sliding_window", "attention_bias", "layer_types", "num_local_experts"}),
        _qwen_moe,
    ),
    "qwen2_moe": (
        frozenset({"hidden_size", "intermediate_size", "moe_intermediate_size", "num_experts",
                   "num_experts_per_tok", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "vocab_size", "tie_word_embeddings", "hidden_act",
                   "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob", "sliding_window",
                   "shared_expert_intermediate_size", "qkv_bias", "layer_types",
                   "num_local_experts"}),
        _qwen_moe,
    ),
    "deepseek_v3": (
        frozenset({"hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                   "n_shared_experts", "num_experts_per_tok", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "vocab_size",
                   "tie_word_embeddings", "hidden_act", "first_k_dense_replace", "moe_layer_freq",
                   "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                   "v_head_dim", "head_dim", "n_group", "topk_group", "routed_scaling_factor",
                   "norm_topk_prob", "scoring_func", "topk_method", "num_nextn_predict_layers",
                   "attention_bias", "rope_interleave", "pretraining_tp"}),
        _deepseek_v3,
    ),
    "gpt_oss": (
        frozenset({"hidden_size", "intermediate_size", "num_local_experts", "num_experts_per_tok",
                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "vocab_size", "tie_word_embeddings", "hidden_act", "sliding_window",
                   "layer_types", "attention_bias", "experts_per_token", "num_experts"}),
        _gpt_oss,
    ),
}  # fmt: skip


def read_hf_config(path: str | Path, *, file: str | None = None) -> tuple[Json, Json]:
    """``(model fields, router fields)`` of the config.json at ``path``."""
    where = file or str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError("file not found (expected a Hugging Face config.json)",
                          file=where, field="model.hf_config", value=str(path))  # fmt: skip
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"not a readable JSON file: {err}", file=str(path)) from None
    if not isinstance(cfg, dict):
        raise ConfigError("top level must be a JSON object", file=str(path))
    return hf_to_moesim(cfg, file=str(path))


def hf_to_moesim(cfg: Json, *, file: str = "config.json") -> tuple[Json, Json]:
    """Map a parsed HF config to moesim ``model`` and ``router`` fields."""
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise ConfigError(f"unsupported model family; supported: {', '.join(sorted(FAMILIES))}",
                          file=file, field="model_type", value=kind)  # fmt: skip
    known, mapping = FAMILIES[kind]
    unknown = sorted(k for k in cfg if k not in known and k not in COMMON_IGNORED)
    if unknown:
        raise ConfigError(
            f"unknown field(s) for {kind}: {', '.join(unknown)}", file=file, field=unknown[0],
            has_value=False,
        )  # fmt: skip
    return mapping(cfg, file)
