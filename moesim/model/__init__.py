"""The whole model from its shapes: parameter counts, FLOPs and collective bytes.

Torch-free; reads :class:`moesim.config.scenario.ModelConfig`. Hugging Face
``config.json`` files are read by :mod:`moesim.model.hf`.
"""

from moesim.model.flops import (
    FORMULA,
    attention_core_flops,
    attention_proj_flops,
    forward_flops_per_token,
    matmul_params,
    model_flops_per_token,
)
from moesim.model.params import ParamCounts, RankParams, count_params, params_per_rank

__all__ = [
    "FORMULA",
    "ParamCounts",
    "RankParams",
    "attention_core_flops",
    "attention_proj_flops",
    "count_params",
    "forward_flops_per_token",
    "matmul_params",
    "model_flops_per_token",
    "params_per_rank",
]
