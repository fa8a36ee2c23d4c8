"""Cluster layout and the links a collective loads.

Legend: G = GPUs, P = EP ranks in one group (``parallel.ep``), Nd = nodes one
EP group spans, L = links of one group, E = experts.

GPUs are numbered node-major (``gpu = node * gpus_per_node + local``). EP
groups are blocks of ``ep`` GPUs, strided by ``etp`` (MoE Parallel Folding puts
expert TP innermost: the ``etp * ep`` GPUs of a block hold ``etp`` EP groups,
group ``g`` = block ``g // etp``, offset ``g % etp``); expert ``e`` lives on rank
``e // (E / ep)`` of every group (contiguous placement). Each group owns a
*link space* of ``L = 4P + 2Nd`` links, in this order::

    scale-up egress [P] | scale-up ingress [P] | NIC egress [P] | NIC ingress [P]
    | node uplink out [Nd] | node uplink in [Nd]

Uplinks model a fat-tree leaf per node whose uplink capacity is the node's NIC
bandwidth divided by the oversubscription (a rail-optimised fabric has no
uplink bottleneck: capacity is infinite). Groups never share a link, so every
group is an independent network domain; this needs ``ep`` to be a multiple or
a divisor of ``gpus_per_node`` (checked by :func:`build_topology`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from moesim.config.hardware import HardwareProfile
from moesim.config.scenario import Scenario
from moesim.errors import ConfigError

F64 = NDArray[np.float64]
I64 = NDArray[np.int64]

#: link kinds of a group's link space, in order
LINK_KINDS = ("su_out", "su_in", "nic_out", "nic_in", "up_out", "up_in")


@dataclass(frozen=True)
class Topology:
    """Where GPUs sit and what each group's links can carry (bytes/s)."""

    num_gpus: int
    gpus_per_node: int
    ep: int
    num_groups: int
    nodes_per_group: int  # Nd
    etp: int
    node_of_P: I64  # node index (within the group) of each EP rank
    cap_L: F64  # achievable bytes/s of every link of one group
    swap_L: I64  # permutation of the link space that swaps egress and ingress

    @property
    def num_links(self) -> int:
        return 4 * self.ep + 2 * self.nodes_per_group

    @property
    def ranks_per_node(self) -> int:
        """EP ranks of one group on one node (``gpus_per_node / etp`` when spanning nodes)."""
        return min(self.ep, max(1, self.gpus_per_node // self.etp))

    def group_rows(self, group: int) -> slice:
        """Rows of group ``group`` in the simulator's group-major ``[G]`` arrays."""
        return slice(group * self.ep, (group + 1) * self.ep)

    def group_gpus(self, group: int) -> I64:
        """GPU ids of EP group ``group`` (ranks strided by ``etp``)."""
        block, offset = divmod(group, self.etp)
        first = block * self.ep * self.etp + offset
        return first + self.etp * np.arange(self.ep, dtype=np.int64)

    def same_node_PP(self) -> NDArray[np.bool_]:
        return self.node_of_P[:, None] == self.node_of_P[None, :]

    def tier_slices(self) -> dict[str, slice]:
        """Link-space slices per tier (``scaleup`` ports, ``scaleout`` NIC ports + uplinks)."""
        P = self.ep
        return {"scaleup": slice(0, 2 * P), "scaleout": slice(2 * P, self.num_links)}


def build_topology(scn: Scenario, hw: HardwareProfile) -> Topology:
    """The cluster of ``scn`` on ``hw``; ConfigError for layouts groups cannot own alone."""
    gpn, ep, etp = scn.cluster.gpus_per_node, scn.parallel.ep, scn.parallel.etp
    span = ep * etp
    if scn.cluster.nodes > 1 and span % gpn and gpn % span:
        what = "parallel.ep" if etp == 1 else "parallel.ep * parallel.etp"
        raise ConfigError(
            f"must be a multiple or a divisor of cluster.gpus_per_node ({gpn}) on more than "
            "one node, so that EP groups own whole nodes",
            field=what,
            value=span,
        )
    n_nodes = max(1, span // gpn)
    node_of = (etp * np.arange(ep) // gpn).astype(np.int64)
    return Topology(
        num_gpus=scn.cluster.num_gpus,
        gpus_per_node=gpn,
        ep=ep,
        num_groups=scn.cluster.num_gpus // ep,
        nodes_per_group=n_nodes,
        etp=etp,
        node_of_P=node_of,
        cap_L=_capacities(hw, ep, n_nodes, min(ep, max(1, gpn // etp))),
        swap_L=_swap_index(ep, n_nodes),
    )


def _capacities(hw: HardwareProfile, P: int, Nd: int, gpus_here: int) -> F64:
    su, nic = spec_bandwidths(hw)
    so = hw.scaleout
    if so.topology == "fat_tree":
        up = gpus_here * so.nic_GBps * 1e9 * so.efficiency / so.oversubscription
    else:
        up = np.inf
    return np.concatenate([np.full(2 * P, su), np.full(2 * P, nic), np.full(2 * Nd, up)])


def spec_bandwidths(hw: HardwareProfile) -> tuple[float, float]:
    """Achievable scale-up and NIC bytes/s per GPU per direction from the spec figures."""
    su = hw.node.scaleup
    so = hw.scaleout
    return su.link_GBps * 1e9 * su.efficiency, so.nic_GBps * 1e9 * so.efficiency


def _swap_index(P: int, Nd: int) -> I64:
    blocks = [np.arange(P) + P, np.arange(P), np.arange(P) + 3 * P, np.arange(P) + 2 * P]
    up = 4 * P
    blocks += [np.arange(Nd) + up + Nd, np.arange(Nd) + up]
    return np.concatenate(blocks).astype(np.int64)
