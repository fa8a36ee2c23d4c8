"""Per-layer, per-micro-batch routing loads of every GPU, with capacity applied.

Legend: G = GPUs, X = EP groups, P = EP ranks, Nd = nodes of a group,
E = experts, K = top-k, T = tokens per GPU per micro-batch, S = capacity domains.

:class:`LoadModel` turns a scenario into one :class:`Load` per (layer,
micro-batch): routed and kept assignments per (source GPU, expert), rows put
into dispatch buffers, and the *distinct* tokens each source needs on each
EP rank and node of its group (what dedup-ing dispatchers send). Every
(layer, micro-batch) has its own random stream ``[seed, 2, layer, mb]``, so
loads do not depend on the order they are asked for.

Three ways to a load, all with the same per-expert inclusion probabilities:

- per-token ids from a trace file or the real router: exact, capacity applied
  token by token with the kernels' drop policies (:func:`capacity.keep_mask`);
- synthetic distributions on small clusters (``G·T·E <= EXACT_TOKEN_CELLS``):
  every token samples its K distinct experts (:func:`routing.sample_ids`,
  group-limited when the router is), then as above;
- synthetic distributions above that: per-expert counts
  (:func:`routing.draw_counts`), capacity as ``min(routed, capacity)``, and
  distinct tokens per block ``T·(1 - Π_e (1 - kept_e/T))`` treating a token's
  experts as independent — under group-limited routing first per group
  (:func:`_touch_grouped`). A test checks these against the per-token sampler.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moesim.config.scenario import Scenario
from moesim.simulate import capacity, routing
from moesim.simulate.topology import Topology

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]
I64 = NDArray[np.int64]
#: synthetic loads are sampled token by token (exact) up to this many GPU x token x expert
#: cells per (layer, micro-batch), and drawn as per-expert counts (fast) above it
EXACT_TOKEN_CELLS = 1 << 17
#: per-token ids processed at once (GPUs are chunked to stay under it)
IDS_PER_CHUNK = 1 << 22
Counts = NDArray[Any]  # integral counts, as int64 or float32


@dataclass(frozen=True)
class Load:
    """One MoE layer, one micro-batch, all GPUs."""

    routed_GE: Counts  # assignments routed, before capacity
    kept_GE: Counts  # assignments kept by capacity
    sent_GE: Counts  # rows put in dispatch buffers (kept, or capacity when padding)
    # distinct tokens a source needs on each rank / node of its group; only the
    # hierarchical dispatcher reads them, so for the others they are empty ([G, 0])
    tok_GP: F64
    tok_GNd: F64


class LoadModel:
    """Draws :class:`Load` objects for one scenario and seed."""

    def __init__(self, scn: Scenario, topo: Topology, seed: int, layers: int) -> None:
        self.scn, self.topo, self.seed = scn, topo, seed
        m, r = scn.model, scn.router
        self.E, self.K, self.T = m.num_experts, m.top_k, scn.workload.tokens_per_gpu
        self.cfg = scn.workload.routing
        seq = r.sequence_length if r.capacity_per == "sequence" else None
        self.sizes_S = capacity.domain_sizes(self.T, seq)
        self.cap_S = capacity.capacities(self.sizes_S, self.E, self.K, r.capacity_factor)
        self.pad = r.pad_to_capacity and self.cap_S is not None
        self.dedup = scn.dispatcher == "hierarchical"  # the only reader of distinct counts
        self._pop: F64 | None = None
        self._trace: I64 | None = None
        kind = self.cfg.distribution
        if kind == "trace":
            self._trace = routing.load_trace(_trace_path(scn), self.E, self.K)
        elif kind != "router":
            rng = np.random.default_rng([seed, 0])
            self._pop = routing.layer_popularities(self.cfg, self.E, layers, rng)

    # -- public ------------------------------------------------------------
    def load(self, layer: int, mb: int) -> Load:
        rng = np.random.default_rng([self.seed, 2, layer, mb])
        if self.scn.router.kind in ("expert_choice", "soft"):
            return self._balanced()
        if self._pop is None:
            return self._from_ids(layer, mb, rng)
        return self._synthetic(layer, rng)

    def expected_loads(self, layers: int) -> F64:
        """``[layers, E]`` expected assignments per expert and token (sums to K per row).

        Synthetic: the inclusion probabilities of the layer's popularity; trace: the
        trace layer's id counts; router: the ids the router gives micro-batch 0
        (one measured batch, as EPLB places from recorded loads); balanced kinds: even.
        """
        E, K = self.E, self.K
        if self.scn.router.kind in ("expert_choice", "soft"):
            return np.full((layers, E), K / E)
        if self._pop is not None:
            return routing.inclusion_probs(self._pop[:layers], K)
        out = np.empty((layers, E))
        for i in range(layers):
            if self._trace is not None:
                ids = self._trace[i % self._trace.shape[0]]
                counts = np.bincount(ids.ravel(), minlength=E).astype(np.float64)
            else:
                counts = self._from_ids(
                    i, 0, np.random.default_rng([self.seed, 3, i])
                ).routed_GE.sum(0)
            out[i] = counts * K / max(float(np.sum(counts)), 1.0)
        return out

    @property
    def capacity_per_domain(self) -> int | None:
        return None if self.cap_S is None else int(self.cap_S[0])

    # -- synthetic distributions ------------------------------------------
    def _synthetic(self, layer: int, rng: np.random.Generator) -> Load:
        assert self._pop is not None
        G = self.topo.num_gpus
        p = self._pop[layer]
        skew_rng = np.random.default_rng([self.seed, 1, layer])
        p_src = routing.source_popularity(p, G, self.cfg.source_skew, skew_rng)
        if G * self.T * self.E <= EXACT_TOKEN_CELLS:
            p_GE = np.broadcast_to(p, (G, self.E)) if p_src is None else p_src
            ids = routing.sample_ids(rng, p_GE, self.T, self.K, self._groups())
            return self._chunk(ids, None, rng)
        pi = routing.inclusion_probs(p if p_src is None else p_src, self.K)
        routed_GSE = routing.draw_counts(rng, self.sizes_S, pi, (G,))
        kept_GSE = capacity.keep_counts(routed_GSE, self.cap_S)
        sent_GSE = capacity.sent_counts(kept_GSE, self.cap_S, self.pad)
        routed, kept, sent = (_over_domains(a) for a in (routed_GSE, kept_GSE, sent_GSE))
        tok_GP, tok_GNd = self._distinct_from_counts(kept, sent)
        return Load(routed, kept, sent, tok_GP, tok_GNd)

    def _distinct_from_counts(self, kept_GE: Counts, sent_GE: Counts) -> tuple[F64, F64]:
        """Distinct tokens per (source, rank) and (source, node) from per-expert counts."""
        P, Nd = self.topo.ep, self.topo.nodes_per_group
        if not self.dedup:
            return _none(kept_GE), _none(kept_GE)
        if self.pad:
            sent_GP = _block_sum(sent_GE, P)
            return sent_GP, _block_sum(sent_GP, Nd)
        kept32_GE = np.asarray(kept_GE, dtype=np.float32)
        groups = self._groups()
        if groups is None or not _nested(P, groups[0]) or not _nested(Nd, groups[0]):
            frac_GE = np.minimum(kept32_GE / np.float32(self.T), 1)
            miss_GP = _block_prod(1.0 - frac_GE, P)
            return self.T * (1.0 - miss_GP), self.T * (1.0 - _block_prod(miss_GP, Nd))
        touch_GP, touch_GNd = _touch_grouped(kept32_GE, self.T, P, Nd, groups, self.K)
        return self.T * touch_GP, self.T * touch_GNd

    def _balanced(self) -> Load:
        """Expert choice (each expert takes its capacity), soft MoE (every token, every expert)."""
        G, E, T = self.topo.num_gpus, self.E, self.T
        if self.scn.router.kind == "soft":
            per = T
        else:
            cf = self.scn.router.capacity_factor or 1.0
            per = capacity.expert_capacity(T, E, self.K, cf)
        counts = np.full((G, E), per, dtype=np.int64)
        tok_GP, tok_GNd = self._distinct_from_counts(counts, counts)
        return Load(counts, counts, counts, tok_GP, tok_GNd)

    def _groups(self) -> tuple[int, int] | None:
        r = self.scn.router
        return None if r.n_group is None or r.topk_group is None else (r.n_group, r.topk_group)

    # -- per-token ids -----------------------------------------------------
    def _from_ids(self, layer: int, mb: int, rng: np.random.Generator) -> Load:
        """Loads from per-token ids, a chunk of GPUs at a time to bound memory."""
        G, T = self.topo.num_gpus, self.T
        source = self._id_source(layer, mb)
        step = max(1, IDS_PER_CHUNK // (T * self.K))
        parts = [self._chunk(*source(g, min(g + step, G)), rng) for g in range(0, G, step)]
        if len(parts) == 1:
            return parts[0]
        names = [f.name for f in fields(Load)]
        return Load(*(np.concatenate([getattr(p, n) for p in parts]) for n in names))

    def _id_source(self, layer: int, mb: int) -> Callable[[int, int], tuple[I64, F64 | None]]:
        """``(g0, g1) -> (ids [g1-g0, T, K], weights or None)`` of that (layer, micro-batch)."""
        G, T, K = self.topo.num_gpus, self.T, self.K
        if self._trace is not None:
            trace = self._trace

            def from_trace(g0: int, g1: int) -> tuple[I64, F64 | None]:
                ids = routing.tile_trace(trace, layer, (mb * G + g0) * T, (g1 - g0) * T)
                return ids.reshape(g1 - g0, T, K), None

            return from_trace
        module = importlib.import_module("moesim.kernels.router_loads")
        n = min(G * T, module.MAX_UNIQUE_TOKENS)
        ids_nK, w_nK = module.router_ids(self.scn, layer, mb, n, self.seed)

        def from_router(g0: int, g1: int) -> tuple[I64, F64 | None]:
            idx = (g0 * T + np.arange((g1 - g0) * T)) % n
            return ids_nK[idx].reshape(g1 - g0, T, K), w_nK[idx].reshape(g1 - g0, T, K)

        return from_router

    def _chunk(self, ids: I64, weights: F64 | None, rng: np.random.Generator) -> Load:
        E, P, Nd = self.E, self.topo.ep, self.topo.nodes_per_group
        kept_mask = np.ones(ids.shape, dtype=bool)
        if self.cap_S is not None:
            prio = None
            if self.scn.router.drop_policy == "probs":
                prio = weights if weights is not None else rng.random(ids.shape)
            kept_mask = capacity.keep_mask(ids, E, self.sizes_S, self.cap_S, prio)
        ones = np.ones(ids.shape, dtype=bool)
        routed = routing.counts_from_ids(ids[:, None], ones[:, None], E)[:, 0]
        kept = routing.counts_from_ids(ids[:, None], kept_mask[:, None], E)[:, 0]
        if self.pad and self.cap_S is not None:
            sent = np.broadcast_to(self.cap_S.sum(), kept.shape).astype(np.int64)
            return Load(routed, kept, sent, _block_sum(sent, P), _block_sum(sent, Nd))
        if not self.dedup:
            return Load(routed, kept, kept, _none(kept), _none(kept))
        tok_GP = routing.distinct_from_ids(ids, kept_mask, E // P, P).astype(np.float64)
        tok_GNd = routing.distinct_from_ids(ids, kept_mask, E // Nd, Nd).astype(np.float64)
        return Load(routed, kept, kept, tok_GP, tok_GNd)


#: GPU x expert cells of one load from which drawing ahead on a thread pays off
AHEAD_MIN_CELLS = 1 << 17


class AheadLoads:
    """:meth:`LoadModel.load`, one micro-batch ahead on a worker thread.

    A (layer, micro-batch) load is a pure function of its seed, so drawing it
    early on another core changes no number. The draws are large numpy passes
    that release the GIL, so they run beside the engine's Python, which holds it
    (at 8192 GPUs the loads are about a fifth of a step here). Only synthetic
    popularities are drawn ahead; router kernels and traces run when asked.
    Draws ahead only between :meth:`start` and :meth:`close` (the engine's run).
    """

    def __init__(self, model: LoadModel, mbs: int) -> None:
        self.model, self.mbs = model, mbs
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[tuple[int, int], Future[Load]] = {}

    def start(self) -> None:
        m = self.model
        big = m.topo.num_gpus * m.E >= AHEAD_MIN_CELLS  # a thread pays off
        if big and m._pop is not None and m.scn.router.kind not in ("expert_choice", "soft"):
            self._pool = ThreadPoolExecutor(1, "moesim-loads") if self.mbs > 1 else None

    def load(self, layer: int, mb: int) -> Load:
        """The load of ``(layer, mb)``: drawn ahead if it was asked for, else now."""
        fut = self._pending.pop((layer, mb), None)
        got = fut.result() if fut is not None else self.model.load(layer, mb)
        return got

    def ahead(self, layer: int, mb: int) -> None:
        """Start drawing ``(layer, mb)`` if it is not drawn or being drawn."""
        if self._pool is not None and mb < self.mbs and (layer, mb) not in self._pending:
            self._pending[layer, mb] = self._pool.submit(self.model.load, layer, mb)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()


def _none(x_GE: Counts) -> F64:
    return np.zeros((x_GE.shape[0], 0))


def _nested(blocks: int, n_group: int) -> bool:
    return blocks % n_group == 0 or n_group % blocks == 0


def _touch_grouped(
    kept_GE: F32, T: int, P: int, Nd: int, groups: tuple[int, int], K: int
) -> list[F64]:
    """P(a token reaches each rank / node), ``[[G, P], [G, Nd]]``, under group-limited routing.

    A token picks ``topk_group`` groups with inclusion ``gamma_g`` (as
    :func:`routing.sample_ids` does), then experts inside them, where expert
    ``e`` is in its set with probability ``frac_e / gamma_g`` (``frac_e``: the
    share ``kept / T`` of the source's ``T`` tokens). Ranks, nodes and groups
    must nest (each count a multiple or divisor of the other).
    """
    n_group, topk = groups
    G, E = kept_GE.shape
    gamma = routing.inclusion_probs(_block_sum(kept_GE, n_group) / (T * K), topk)
    scale = (1.0 / (T * np.maximum(gamma, 1e-12))).astype(np.float32)  # frac / gamma, per group
    miss_GE = kept_GE.reshape(G, n_group, -1) * scale[:, :, None]  # one [G, E] buffer:
    np.minimum(miss_GE, 1.0, out=miss_GE)
    np.subtract(1.0, miss_GE, out=miss_GE)  # 1 - min(frac / gamma, 1), in place
    miss_GE = miss_GE.reshape(G, E)
    # float32 values, float64 storage: a mixed-precision broadcast is 5x slower here
    gamma = gamma.astype(np.float32).astype(np.float64)
    miss_GP = _block_prod(miss_GE, P)
    out = []
    for blocks, miss in ((P, miss_GP), (Nd, None)):
        if blocks >= n_group:  # each block inside one group: reached if its group is
            inner = miss if miss is not None else _block_prod(miss_GP, blocks)
            reached = (1.0 - inner).reshape(G, n_group, -1) * gamma[:, :, None]
            out.append(reached.reshape(G, blocks))  # (broadcast: np.repeat is slow here)
        else:
            finer = miss_GP if n_group <= P else miss_GE
            per_group = gamma * (1.0 - _block_prod(finer, n_group))
            out.append(1.0 - _block_prod(1.0 - per_group, blocks))
    return out


#: float32 sums of integer-valued counts are exact below this
F32_EXACT = float(2**24)


def _sum_f64(v: NDArray[Any], ones_at: int) -> F64:
    """Sum of ``v`` over axis ``ones_at`` (1 or 2 of a 3-d view), as float64.

    float32 counts are summed by BLAS in float32 (4-6x faster here than a float64
    reduction over a middle or short axis: a profiled hot path at thousands of GPUs),
    exact for integer counts below :data:`F32_EXACT` and within float32's precision
    for fractional ones (replicated experts' splits); larger sums and other dtypes in
    float64.
    """
    if v.dtype == np.float32:
        ones = np.ones(v.shape[ones_at], dtype=np.float32)
        out = np.matmul(ones, v) if ones_at == 1 else v @ ones
        if float(out.max(initial=0.0)) < F32_EXACT:
            return out.astype(np.float64)
    return v.sum(ones_at, dtype=np.float64)


def group_sum(x_GE: Any, X: int) -> F64:
    """Sum over each group's sources, ``[G, E] -> [X, E]`` float64 (:func:`_sum_f64`)."""
    return _sum_f64(np.asarray(x_GE).reshape(X, -1, np.shape(x_GE)[-1]), 1)


def row_sum(x_GE: Any) -> F64:
    """``[G, E] -> [G]`` float64 (:func:`_sum_f64`)."""
    return _block_sum(x_GE, 1)[:, 0]


def _block_sum(x_GB: Counts, blocks: int) -> F64:
    """Sum contiguous blocks of the last axis: ``[G, B] -> [G, blocks]`` (float64)."""
    return _sum_f64(np.asarray(x_GB).reshape(x_GB.shape[0], blocks, -1), 2)


def _block_prod(x_GB: NDArray[np.floating], blocks: int) -> F64:
    """Product over contiguous blocks of the last axis: ``[G, B] -> [G, blocks]`` (float64).

    Multiplies strided views one block position at a time: numpy reduces a short
    inner axis ten times slower.
    """
    G = x_GB.shape[0]
    v = np.asarray(x_GB).reshape(G, blocks, -1)
    out = v[:, :, 0].copy()  # in the input's precision, widened once at the end
    for j in range(1, v.shape[2]):
        out *= v[:, :, j]
    return out.astype(np.float64)


def _over_domains(x_GSE: Counts) -> Counts:
    return x_GSE[:, 0] if x_GSE.shape[1] == 1 else x_GSE.sum(1)


def _trace_path(scn: Scenario) -> Path:
    assert scn.workload.routing.trace is not None
    return Path(scn.workload.routing.trace)
