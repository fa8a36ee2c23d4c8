"""Expert placement inside an EP group: contiguous, balanced packing, EPLB with replicas.

Legend: L = layers, E = logical experts, R = physical expert slots of a group
(``E + redundant_experts``), P = EP ranks, S = slots per rank (``R / P``),
G = GPUs, Nd = nodes of a group, X = EP groups, I = items one packing places.

A :class:`Placement` is, per layer, ``slot_expert_LR``: the logical expert each
physical slot runs, slots ``[p*S, (p+1)*S)`` on rank ``p``. The algorithm is
DeepSeek's published EPLB (github.com/deepseek-ai/EPLB, ``eplb.py``):

- :func:`replicate_experts`: add copies one at a time to the expert with the
  most load per copy;
- :func:`balanced_packing`: items by decreasing weight, each to the pack with
  the least weight that still has room (every pack gets the same number);
- :func:`rebalance`: hierarchical (node-limited) when the expert groups divide
  over the nodes: groups packed to nodes, copies made inside each node, copies
  packed to the node's GPUs; otherwise global (one group, one node).

Tokens of a replicated expert are split over its copies as evenly as integers
allow (:func:`split_counts`): copy ``j`` of an expert with ``n`` copies gets
``c // n`` of a source's ``c`` rows plus one of the remainder, the remainder
rotated by source so that no copy is favoured. :func:`place_load` turns a
logical :class:`~moesim.simulate.loads.Load` into the physical one the plan prices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moesim.config.base import DTYPE_BYTES
from moesim.config.dynamics import PlacementConfig
from moesim.config.scenario import Scenario
from moesim.errors import ConfigError
from moesim.simulate.loads import Load, LoadModel
from moesim.simulate.topology import Topology

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]


@dataclass(frozen=True)
class Placement:
    """Physical slots of every layer: ``slot_expert_LR`` logical expert per slot."""

    slot_expert_LR: I64
    ranks: int  # P

    @property
    def slots_per_rank(self) -> int:
        return self.slot_expert_LR.shape[1] // self.ranks

    @property
    def contiguous(self) -> bool:
        L, R = self.slot_expert_LR.shape
        return bool(np.array_equal(self.slot_expert_LR, np.broadcast_to(np.arange(R), (L, R))))

    def copies_LE(self, E: int) -> I64:
        """``[L, E]`` copies of each logical expert."""
        L = self.slot_expert_LR.shape[0]
        code = self.slot_expert_LR + E * np.arange(L)[:, None]
        return np.bincount(code.ravel(), minlength=L * E).reshape(L, E)


def contiguous(layers: int, E: int, P: int) -> Placement:
    return Placement(np.broadcast_to(np.arange(E), (layers, E)).astype(np.int64), P)


# -- DeepSeek EPLB ------------------------------------------------------------------
def balanced_packing(weight_XI: F64, packs: int) -> tuple[I64, I64]:
    """Pack ``I`` items of each row into ``packs`` packs of ``I / packs`` items each.

    Returns ``(pack_XI, rank_in_pack_XI)``. Items go by decreasing weight to the
    lightest pack with room (ties: lowest index), as EPLB's ``balanced_packing``.
    """
    X, I = weight_XI.shape
    per = I // packs
    pack = np.zeros((X, I), dtype=np.int64)
    rank = np.zeros((X, I), dtype=np.int64)
    if per == 1:
        pack[:] = np.arange(I)
        return pack, rank
    order = np.argsort(-weight_XI, axis=1, kind="stable")
    for x in range(X):
        load = np.zeros(packs)
        items = np.zeros(packs, dtype=np.int64)
        for item in order[x]:
            free = np.flatnonzero(items < per)
            p = int(free[np.argmin(load[free])])
            pack[x, item], rank[x, item] = p, items[p]
            load[p] += weight_XI[x, item]
            items[p] += 1
    return pack, rank


def replicate_experts(weight_XE: F64, slots: int) -> tuple[I64, I64, I64]:
    """``slots >= E`` physical experts: copies go to the most loaded per copy.

    Returns ``(slot_expert_XR, copy_rank_XR, copies_XE)``; slot ``e < E`` is expert ``e``.
    """
    X, E = weight_XE.shape
    slot_expert = np.tile(np.arange(slots, dtype=np.int64), (X, 1))
    rank = np.zeros((X, slots), dtype=np.int64)
    copies = np.ones((X, E), dtype=np.int64)
    rows = np.arange(X)
    for r in range(E, slots):
        hot = np.argmax(weight_XE / copies, axis=1)
        slot_expert[:, r] = hot
        rank[:, r] = copies[rows, hot]
        copies[rows, hot] += 1
    return slot_expert, rank, copies


def rebalance(weight_LE: F64, slots: int, groups: int, nodes: int, ranks: int) -> I64:
    """``[L, slots]`` logical expert of each physical slot (slot-major by rank).

    Hierarchical when ``groups % nodes == 0`` (EPLB's ``rebalance_experts``), else global.
    """
    if groups % nodes:
        groups = nodes = 1
    L, E = weight_LE.shape
    gsize, per_node = E // groups, slots // nodes
    per_rank = slots // ranks
    g_pack, g_rank = balanced_packing(weight_LE.reshape(L, groups, gsize).sum(-1), nodes)
    # logical expert -> "node-major" index, and its inverse
    log2m = ((g_pack * (groups // nodes) + g_rank) * gsize)[:, :, None] + np.arange(gsize)
    log2m = log2m.reshape(L, E)
    m2log = np.argsort(log2m, axis=1)
    w_m = np.take_along_axis(weight_LE, m2log, axis=1).reshape(L * nodes, E // nodes)
    phy2m, _, copies = replicate_experts(w_m, per_node)
    w_phy = np.take_along_axis(w_m / copies, phy2m, axis=1)
    pack, rank_in = balanced_packing(w_phy, ranks // nodes)
    pphy2phy = np.argsort(pack * per_rank + rank_in, axis=1)
    pphy2m = np.take_along_axis(phy2m, pphy2phy, axis=1).reshape(L, nodes, per_node)
    pphy2m = (pphy2m + (np.arange(nodes) * (E // nodes))[None, :, None]).reshape(L, slots)
    return np.take_along_axis(m2log, pphy2m, axis=1)


def build_placement(
    cfg: PlacementConfig, weight_LE: F64, ranks: int, nodes: int, n_group: int | None
) -> Placement:
    """The placement ``cfg`` asks for, from expected per-expert loads ``weight_LE``."""
    L, E = weight_LE.shape
    if cfg.kind == "contiguous":
        return contiguous(L, E, ranks)
    slots = E + cfg.redundant_experts
    if slots % ranks:
        raise ConfigError(
            f"experts + redundant copies ({slots}) must be a multiple of parallel.ep ({ranks})",
            field="placement.redundant_experts",
            value=cfg.redundant_experts,
        )
    groups, nodes_used = 1, 1
    if cfg.hierarchical:
        groups = cfg.num_groups or n_group or nodes
        if E % groups or groups % nodes:
            raise ConfigError(
                f"hierarchical placement needs expert groups that divide num_experts ({E}) "
                f"and spread evenly over the group's {nodes} node(s)",
                field="placement.num_groups",
                value=groups,
            )
        nodes_used = nodes
    return Placement(rebalance(weight_LE, slots, groups, nodes_used, ranks), ranks)


# -- splitting tokens over copies ---------------------------------------------------------
def split_counts(counts_GE: NDArray[np.integer], slot_expert_R: I64) -> I64:
    """Rows each source sends to each physical slot, ``[G, R]``; sums over copies are exact.

    Copy ``j`` (0-based, in slot order) of expert ``e`` with ``n`` copies gets
    ``c // n`` plus 1 when ``(j - g) mod n < c mod n`` for source ``g``.
    """
    c = np.rint(np.asarray(counts_GE)).astype(np.int64)
    G, E = c.shape
    n_E = np.bincount(slot_expert_R, minlength=E)
    j_R = _copy_index(slot_expert_R, E)
    n_R = n_E[slot_expert_R]
    c_GR = c[:, slot_expert_R]
    extra = (j_R[None, :] - np.arange(G)[:, None]) % n_R[None, :] < (c_GR % n_R[None, :])
    return c_GR // n_R[None, :] + extra


def _copy_index(slot_expert_R: I64, E: int) -> I64:
    """Which copy (0, 1, ...) of its expert each slot is, in slot order."""
    order = np.argsort(slot_expert_R, kind="stable")
    sorted_e = slot_expert_R[order]
    first = np.searchsorted(sorted_e, sorted_e, side="left")
    j = np.empty_like(slot_expert_R)
    j[order] = np.arange(len(order)) - first
    return j


def place_load(load: Load, slot_expert_R: I64, ranks: int, nodes: int, T: int) -> Load:
    """The physical load: per-slot rows, and distinct tokens per rank / node recomputed.

    Distinct tokens (read by the hierarchical dispatcher only) are recomputed from
    per-slot kept rows treating a token's slots as independent, as
    :meth:`LoadModel._distinct_from_counts` does for synthetic loads.
    """
    routed, kept, sent = (
        split_counts(a, slot_expert_R) for a in (load.routed_GE, load.kept_GE, load.sent_GE)
    )
    if load.tok_GP.shape[1] == 0:
        return Load(routed, kept, sent, load.tok_GP, load.tok_GNd)
    G = kept.shape[0]
    miss = 1.0 - np.minimum(kept / float(T), 1.0)
    miss_GP = miss.reshape(G, ranks, -1).prod(-1)
    miss_GNd = miss_GP.reshape(G, nodes, -1).prod(-1)
    return Load(routed, kept, sent, T * (1.0 - miss_GP), T * (1.0 - miss_GNd))


def memory_bytes_per_gpu(
    slots_per_rank: int, layers: int, D: int, F: int, dtype_bytes: float
) -> float:
    """Routed-expert weights one GPU holds: ``slots · layers · 3·D·F`` elements."""
    return float(slots_per_rank * layers * 3 * D * F * dtype_bytes)


class Placer:
    """A scenario's placement, built once from its expected loads; applies it to loads."""

    def __init__(self, scn: Scenario, topo: Topology, loads: LoadModel, layers: int) -> None:
        self.cfg, self.T = scn.placement, scn.workload.tokens_per_gpu
        self.P, self.Nd = topo.ep, topo.nodes_per_group
        self.n_group = scn.router.n_group
        self.m = scn.model
        self.layers = layers
        weight = loads.expected_loads(layers) if self.cfg.kind != "contiguous" else None
        self.set_weights(weight, layers)

    def set_weights(self, weight_LE: F64 | None, layers: int) -> None:
        """Re-place from per-layer loads ``weight_LE`` (None: contiguous)."""
        if weight_LE is None:
            self.placement = contiguous(layers, self.m.num_experts, self.P)
        else:
            self.placement = build_placement(self.cfg, weight_LE, self.P, self.Nd, self.n_group)
        self.identity = self.placement.contiguous

    def apply(self, load: Load, layer: int) -> Load:
        if self.identity:
            return load
        slots = self.placement.slot_expert_LR[layer % self.placement.slot_expert_LR.shape[0]]
        return place_load(load, slots, self.P, self.Nd, self.T)

    def details(self) -> dict[str, Any]:
        S = self.placement.slots_per_rank
        nbytes = memory_bytes_per_gpu(
            S, self.layers, self.m.hidden_size, self.m.moe_intermediate_size,
            DTYPE_BYTES[self.m.dtype],
        )  # fmt: skip
        return {
            "kind": self.cfg.kind,
            "redundant_experts": self.cfg.redundant_experts,
            "hierarchical": self.cfg.hierarchical,
            "experts_per_gpu": S,
            "expert_weight_bytes_per_gpu": nbytes,
            "max_copies": int(self.placement.copies_LE(self.m.num_experts).max()),
        }
