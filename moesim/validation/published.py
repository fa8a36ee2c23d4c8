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

from moesim import model
from moesim.config.base import DTYPE_BYTES, Frozen
from moesim.config.loader import check_pair, load_hardware, read_yaml, validate
from moesim.config.scenario import Scenario
from moesim.errors import ConfigError
from moesim.validation.layout_search import LayoutGrid, SearchResult, layout_label

PUBLISHED_PATH = Path(__file__).with_name("published.yaml")

Metric = Literal[
    "dispatch_GBps",
    "combine_GBps",
    "dispatch_nvl_GBps",
    "combine_nvl_GBps",
    "dispatch_rdma_GBps",
    "combine_rdma_GBps",
    "dispatch_us",
    "combine_us",
    "alltoall_busbw_GBps",
    "alltoall_nic_GBps",
    "tokens_per_s_per_gpu",
    "model_tflops_per_gpu",
    "mfu_percent",
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
    # the source's figure is the best over a layout search: moesim runs the same search
    # with ``validate --published --search``; ``scenario`` holds the layout it last chose
    search: LayoutGrid | None = None


class PublishedTable(Frozen):
    version: int
    rows: list[PublishedRow] = Field(min_length=1)


@dataclass(frozen=True)
class PublishedResult:
    row: PublishedRow
    predicted: float
    searched: SearchResult | None = None

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
            "flop_formula": model.FORMULA if r.metric in FLOP_METRICS else None,
            "layout": self.layout,
            "search": self._search_dict(),
        }

    @property
    def layout(self) -> str | None:
        """The layout predicted: the search's best, else the row's (None: not a searched row)."""
        if self.searched is not None:
            return self.searched.best.label
        return layout_label(self.row.scenario) if self.row.search is not None else None

    def _search_dict(self) -> dict[str, Any] | None:
        if self.searched is None:
            return None
        return self.searched.to_dict() | {
            "stored_layout": layout_label(self.row.scenario),
            "stored_is_best": self.searched.best.label == layout_label(self.row.scenario),
        }


def load_published(path: str | Path = PUBLISHED_PATH) -> PublishedTable:
    """The table at ``path``; top-level keys starting with ``_`` hold YAML anchors only."""
    data = {k: v for k, v in read_yaml(path).items() if not str(k).startswith("_")}
    return validate(PublishedTable, data, file=str(path))


# -- reading a metric off a simulation ----------------------------------------------


def transfer_s(res: Mapping[str, Any]) -> float:
    """Dispatch seconds without the split-size exchange (``details.split_exchange_s``).

    Kernel benchmarks time the transfer alone: nccl-tests' all-to-all has fixed
    splits, and DeepEP's tests time ``dispatch`` with a cached ``handle``, which
    skips ``notify_dispatch``. The engine adds the exchange as a prefix of every
    forward dispatch, so removing it leaves the transfer exactly.
    """
    return float(res["dispatch_time_s"]) - float(res["details"].get("split_exchange_s", 0.0))


def _alltoall_bytes(scn: Scenario) -> float:
    """nccl-tests ``S``: bytes per rank, every copy (self included)."""
    m = scn.model
    return scn.workload.tokens_per_gpu * m.top_k * m.hidden_size * DTYPE_BYTES[scn.dispatch_dtype]


def _busbw(scn: Scenario, res: Mapping[str, Any]) -> float:
    """nccl-tests all-to-all: ``busbw = S / t * (n-1)/n`` (src/alltoall.cu ``AlltoAllGetBw``)."""
    n = scn.parallel.ep
    return _alltoall_bytes(scn) / transfer_s(res) * (n - 1) / n / 1e9


def _nic_GBps(scn: Scenario, res: Mapping[str, Any]) -> float:
    """Rate of one GPU's NIC in an all-to-all over ``N`` nodes: ``S (N-1)/N / t``.

    With even splits ``(N-1)/N`` of a rank's ``S`` bytes leave its node and set
    the time (NCCL maintainers, nccl-tests issue 130: on ``N`` nodes all-to-all
    busbw is about ``N/(N-1)`` times the per-GPU network bandwidth). Equals
    ``busbw * n/(n-1) * (N-1)/N`` for ``n`` ranks.
    """
    nodes = scn.parallel.ep // scn.cluster.gpus_per_node
    if nodes < 2:
        raise ConfigError(
            "alltoall_nic_GBps needs an EP group over at least 2 nodes",
            field="parallel.ep",
            value=scn.parallel.ep,
        )
    return _alltoall_bytes(scn) * (nodes - 1) / nodes / transfer_s(res) / 1e9


def _combine_bytes(scn: Scenario, res: Mapping[str, Any]) -> float:
    ratio = DTYPE_BYTES[scn.combine_dtype] / DTYPE_BYTES[scn.dispatch_dtype]
    return float(res["dispatch_bytes_per_gpu"]) * ratio


def expected_rdma_nodes(scn: Scenario) -> float:
    """Mean distinct nodes (the token's own included) a token's top-k experts live on.

    This is DeepEP's RDMA count: ``tests/test_internode.py`` sums
    ``num_rdma_token_sent``, the distinct (token, node) pairs with the sender's own
    node counted, so its "RDMA bandwidth" is a logical one (DeepEP's V2 README says
    so). Under uniform routing with node-limited groups (``n_group`` = nodes of the
    EP group) a token picks ``topk_group`` nodes, then its k experts uniformly among
    their experts; a picked node may still get none of the k. 0 on one node.
    """
    m = scn.model
    nodes, g = _groups(scn)
    if nodes == 1:
        return 0.0
    per_node = m.num_experts // nodes
    empty = math.comb((g - 1) * per_node, m.top_k) / math.comb(g * per_node, m.top_k)
    return g * (1.0 - empty)


def _groups(scn: Scenario) -> tuple[int, int]:
    """``(nodes of the EP group, nodes a token may pick)`` under node-limited routing."""
    r = scn.router
    nodes = max(1, scn.parallel.ep // scn.cluster.gpus_per_node)
    return nodes, r.topk_group if (r.n_group == nodes and r.topk_group) else nodes


def expected_ranks(scn: Scenario) -> float:
    """Mean distinct EP ranks (its own included) a token's top-k experts live on.

    A token picks its nodes, then k experts uniformly among theirs; each of the
    picked nodes' ranks holds ``E / ep`` of them and is missed with probability
    ``C(pool - E/ep, k) / C(pool, k)``. DeepEP sends a token once per such rank.
    """
    m = scn.model
    nodes, g = _groups(scn)
    ranks = g * scn.parallel.ep // nodes
    pool, local = g * m.num_experts // nodes, m.num_experts // scn.parallel.ep
    return ranks * (1.0 - math.comb(pool - local, m.top_k) / math.comb(pool, m.top_k))


def _row_bytes(scn: Scenario, dtype: str) -> float:
    """Bytes of one token as DeepEP's tests count them: FP8 with one fp32 scale per 128."""
    per_elem = DTYPE_BYTES[dtype] * (1.0 + 4.0 / 128.0 if dtype == "fp8" else 1.0)
    return scn.model.hidden_size * per_elem


def _nvl_bytes(scn: Scenario, dtype: str) -> float:
    """DeepEP intranode: bytes a rank receives (``recv_x``), its own tokens included."""
    return scn.workload.tokens_per_gpu * expected_ranks(scn) * _row_bytes(scn, dtype)


def _rdma_bytes(scn: Scenario, dtype: str) -> float:
    """DeepEP's RDMA bytes of one GPU: one copy per token per node it goes to (own included).

    FP8 rows carry one fp32 scale per 128 elements, as DeepEP counts them.
    """
    return scn.workload.tokens_per_gpu * expected_rdma_nodes(scn) * _row_bytes(scn, dtype)


def model_flops_per_token(scn: Scenario) -> float:
    """Training FLOPs per token of the row's model: :data:`moesim.model.FORMULA`."""
    return model.model_flops_per_token(scn)


#: metrics read off the model-FLOPs count; their rows state :data:`moesim.model.FORMULA`
FLOP_METRICS = frozenset({"model_tflops_per_gpu", "mfu_percent"})


def _tokens_per_gpu(scn: Scenario, res: Mapping[str, Any]) -> float:
    return float(res["throughput_tokens_per_s"]) / scn.cluster.num_gpus


#: metric -> ``(scenario, simulate JSON) -> predicted value in the row's unit``
METRICS: dict[str, Callable[[Scenario, Mapping[str, Any]], float]] = {
    "dispatch_GBps": lambda s, r: r["dispatch_bytes_per_gpu"] / transfer_s(r) / 1e9,
    "combine_GBps": lambda s, r: _combine_bytes(s, r) / r["combine_time_s"] / 1e9,
    "dispatch_nvl_GBps": lambda s, r: _nvl_bytes(s, s.dispatch_dtype) / transfer_s(r) / 1e9,
    "combine_nvl_GBps": lambda s, r: _nvl_bytes(s, s.combine_dtype) / r["combine_time_s"] / 1e9,
    "dispatch_rdma_GBps": lambda s, r: _rdma_bytes(s, s.dispatch_dtype) / transfer_s(r) / 1e9,
    "combine_rdma_GBps": lambda s, r: _rdma_bytes(s, s.combine_dtype) / r["combine_time_s"] / 1e9,
    "dispatch_us": lambda s, r: transfer_s(r) * 1e6,
    "combine_us": lambda s, r: r["combine_time_s"] * 1e6,
    "alltoall_busbw_GBps": _busbw,
    "alltoall_nic_GBps": _nic_GBps,
    "tokens_per_s_per_gpu": _tokens_per_gpu,
    "model_tflops_per_gpu": lambda s, r: _tokens_per_gpu(s, r) * model_flops_per_token(s) / 1e12,
    "mfu_percent": lambda s, r: 100.0 * float(r["mfu"]),
}


# -- running the table ---------------------------------------------------------------


def predict_row(
    row: PublishedRow,
    *,
    seed: int | None = None,
    search: bool = False,
    advance: Callable[[str], None] | None = None,
) -> PublishedResult:
    """Simulate ``row.scenario`` on its shipped hardware profile and read the metric.

    ``search`` with a row that has a :class:`LayoutGrid`: the best value over the
    grid's feasible layouts instead (:func:`moesim.validation.layout_search.search`).
    """
    from moesim.validation.layout_search import search as run_search

    hw = load_hardware(row.scenario.hardware)
    check_pair(row.scenario, hw, file=f"{PUBLISHED_PATH.name}: {row.id}")
    if search and row.search is not None:
        found = run_search(
            row.scenario, hw, row.search, lambda s: _value(row, s, seed), advance=advance
        )
        return PublishedResult(row, found.value, found)
    return PublishedResult(row, _value(row, row.scenario, seed))


def _value(row: PublishedRow, scn: Scenario, seed: int | None) -> float:
    from moesim.simulate import simulate

    res = simulate(scn, load_hardware(scn.hardware), seed=seed).to_dict()
    value = float(METRICS[row.metric](scn, res))
    if not np.isfinite(value):
        raise ConfigError(f"row {row.id}: the simulation gave no finite {row.metric}")
    return value


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
    search: bool = False,
) -> PublishedReport:
    """Predict every row (or those whose id contains ``only``); ``advance()`` after each.

    ``search``: rows with a layout grid run their search (minutes each; see
    :mod:`moesim.validation.layout_search`).
    """
    table = table or load_published()
    rows = [r for r in table.rows if only is None or only in r.id]
    if not rows:
        known = ", ".join(r.id for r in table.rows)
        raise ConfigError(f"no published row matches; ids: {known}", field="--only", value=only)
    results = []
    for row in rows:
        results.append(predict_row(row, search=search))
        if advance is not None:
            advance(1, row.id)
    return PublishedReport(results)
