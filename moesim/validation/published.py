"""Predicted vs published: the cited figures of ``published.yaml``, each simulated.

Each row names a metric (:data:`METRICS`), the published value, its source and
a scenario with the full published setup. The scenario is simulated on the
shipped hardware profile it names, with no per-row tuning, and the metric is
read off the simulation the way the source defines it. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from moesim.config.base import DTYPE_BYTES, Frozen
from moesim.config.loader import check_pair, load_hardware, read_yaml, validate
from moesim.config.scenario import Scenario
from moesim.costs import work
from moesim.errors import ConfigError

PUBLISHED_PATH = Path(__file__).with_name("published.yaml")

Metric = Literal[
    "dispatch_GBps",
    "combine_GBps",
    "dispatch_rdma_GBps",
    "combine_rdma_GBps",
    "dispatch_us",
    "combine_us",
    "alltoall_busbw_GBps",
    "tokens_per_s_per_gpu",
    "model_tflops_per_gpu",
]


class PublishedRow(Frozen):
    """One published figure with its setup and citation."""

    id: str
    metric: Metric
    published: float = Field(gt=0)
    unit: str
    source: str  # who published it, and which table / figure / comment
    url: str
    note: str  # what the model captures and what it does not
    scenario: Scenario


class PublishedTable(Frozen):
    version: int
    rows: list[PublishedRow] = Field(min_length=1)


@dataclass(frozen=True)
class PublishedResult:
    row: PublishedRow
    predicted: float

    @property
    def error(self) -> float:
        """Signed relative error ``(predicted - published) / published``."""
        return (self.predicted - self.row.published) / self.row.published

    def to_dict(self) -> dict[str, Any]:
        r = self.row
        return {
            "id": r.id,
            "metric": r.metric,
            "unit": r.unit,
            "published": r.published,
            "predicted": self.predicted,
            "error": self.error,
            "source": r.source,
            "url": r.url,
            "note": r.note,
        }


def load_published(path: str | Path = PUBLISHED_PATH) -> PublishedTable:
    """The table at ``path``; top-level keys starting with ``_`` hold YAML anchors only."""
    data = {k: v for k, v in read_yaml(path).items() if not str(k).startswith("_")}
    return validate(PublishedTable, data, file=str(path))


# -- reading a metric off a simulation ----------------------------------------------


def _busbw(scn: Scenario, res: Mapping[str, Any]) -> float:
    """nccl-tests: algbw = S / t with S = bytes per rank (every copy, self included)."""
    m = scn.model
    size = scn.workload.tokens_per_gpu * m.top_k * m.hidden_size * DTYPE_BYTES[scn.dispatch_dtype]
    n = scn.parallel.ep
    return size / res["dispatch_time_s"] * (n - 1) / n / 1e9


def _combine_bytes(scn: Scenario, res: Mapping[str, Any]) -> float:
    ratio = DTYPE_BYTES[scn.combine_dtype] / DTYPE_BYTES[scn.dispatch_dtype]
    return float(res["dispatch_bytes_per_gpu"]) * ratio


def expected_remote_nodes(scn: Scenario) -> float:
    """Mean number of *other* nodes a token's top-k experts live on (uniform routing).

    With node-limited routing (``n_group`` = nodes of the EP group) a token picks
    ``topk_group`` nodes, then its k experts uniformly among their experts; a picked
    node may still end up with none of the k. Without it, experts are uniform over all.
    """
    m, r = scn.model, scn.router
    nodes = max(1, scn.parallel.ep // scn.cluster.gpus_per_node)
    per_node = m.num_experts // nodes
    g = r.topk_group if (r.n_group == nodes and r.topk_group) else nodes
    empty = math.comb((g - 1) * per_node, m.top_k) / math.comb(g * per_node, m.top_k)
    return (nodes - 1) * (g / nodes) * (1.0 - empty)


def _rdma_bytes(scn: Scenario, dtype: str) -> float:
    """Bytes a GPU sends over RDMA: one copy per remote node per token (DeepEP's count).

    FP8 rows carry one fp32 scale per 128 elements, as DeepEP counts them.
    """
    m = scn.model
    per_elem = DTYPE_BYTES[dtype] * (1.0 + 4.0 / 128.0 if dtype == "fp8" else 1.0)
    return scn.workload.tokens_per_gpu * expected_remote_nodes(scn) * m.hidden_size * per_elem


def _rdma_GBps(scn: Scenario, dtype: str, seconds: float) -> float:
    return _rdma_bytes(scn, dtype) / seconds / 1e9


def model_flops_per_token(scn: Scenario) -> float:
    """Training FLOPs per token: 3x forward of router, routed + shared experts, attention."""
    m = scn.model
    D = m.hidden_size
    moe = m.top_k * work.expert_flops(1, D, m.moe_intermediate_size)
    moe = moe + work.gate_flops(1, D, m.num_experts)
    if m.num_shared_experts:
        moe = moe + m.num_shared_experts * work.expert_flops(
            1, D, m.shared_expert_intermediate_size or m.moe_intermediate_size
        )
    per_layer, dense_layers = moe, 0.0
    if m.dense is not None:
        a = m.dense
        per_layer = per_layer + work.attention_flops(
            1, D, a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.seq_length
        )
        if a.num_dense_layers:
            ffn = work.expert_flops(1, D, a.dense_intermediate_size or m.moe_intermediate_size)
            attn = work.attention_flops(
                1, D, a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.seq_length
            )
            dense_layers = a.num_dense_layers * float(ffn + attn)
    return 3.0 * (m.num_moe_layers * float(per_layer) + dense_layers)


def _tokens_per_gpu(scn: Scenario, res: Mapping[str, Any]) -> float:
    return float(res["throughput_tokens_per_s"]) / scn.cluster.num_gpus


#: metric -> ``(scenario, simulate JSON) -> predicted value in the row's unit``
METRICS: dict[str, Callable[[Scenario, Mapping[str, Any]], float]] = {
    "dispatch_GBps": lambda s, r: r["dispatch_bytes_per_gpu"] / r["dispatch_time_s"] / 1e9,
    "combine_GBps": lambda s, r: _combine_bytes(s, r) / r["combine_time_s"] / 1e9,
    "dispatch_rdma_GBps": lambda s, r: (
        _rdma_bytes(s, s.dispatch_dtype) / r["dispatch_time_s"] / 1e9
    ),
    "combine_rdma_GBps": lambda s, r: _rdma_bytes(s, s.combine_dtype) / r["combine_time_s"] / 1e9,
    "dispatch_us": lambda s, r: r["dispatch_time_s"] * 1e6,
    "combine_us": lambda s, r: r["combine_time_s"] * 1e6,
    "alltoall_busbw_GBps": _busbw,
    "tokens_per_s_per_gpu": _tokens_per_gpu,
    "model_tflops_per_gpu": lambda s, r: _tokens_per_gpu(s, r) * model_flops_per_token(s) / 1e12,
}


# -- running the table ---------------------------------------------------------------


def predict_row(row: PublishedRow, *, seed: int | None = None) -> PublishedResult:
    """Simulate ``row.scenario`` on its shipped hardware profile and read the metric."""
    from moesim.simulate import simulate

    scn = row.scenario
    hw = load_hardware(scn.hardware)
    check_pair(scn, hw, file=f"{PUBLISHED_PATH.name}: {row.id}")
    res = simulate(scn, hw, seed=seed).to_dict()
    value = float(METRICS[row.metric](scn, res))
    if not np.isfinite(value):
        raise ConfigError(f"row {row.id}: the simulation gave no finite {row.metric}")
    return PublishedResult(row, value)


@dataclass(frozen=True)
class PublishedReport:
    results: list[PublishedResult]

    @property
    def abs_errors(self) -> list[float]:
        return [abs(r.error) for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        errs = self.abs_errors
        return {
            "rows": [r.to_dict() for r in self.results],
            "median_abs_error": float(np.median(errs)),
            "max_abs_error": float(np.max(errs)),
            "within_20pct": sum(e <= 0.20 for e in errs),
        }


def run_published(
    table: PublishedTable | None = None,
    *,
    only: str | None = None,
    advance: Callable[..., None] | None = None,
) -> PublishedReport:
    """Predict every row (or those whose id contains ``only``); ``advance()`` after each."""
    table = table or load_published()
    rows = [r for r in table.rows if only is None or only in r.id]
    if not rows:
        known = ", ".join(r.id for r in table.rows)
        raise ConfigError(f"no published row matches; ids: {known}", field="--only", value=only)
    results = []
    for row in rows:
        results.append(predict_row(row))
        if advance is not None:
            advance(1, row.id)
    return PublishedReport(results)
