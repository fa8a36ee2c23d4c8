"""Bytes (or rows) each link of a group carries in one dispatch, per dispatcher.

Legend: X = groups (batched), P = EP ranks, Nd = nodes of a group, L = links
(see :mod:`moesim.simulate.topology`). Everything is in *rows* (one token's
hidden vector); multiply by ``hidden_size * dtype bytes`` for bytes. The
combine of a dispatch loads the same links in the other direction:
``demand_XL[..., topo.swap_L]``.

Dispatchers (registered in :data:`moesim.simulate.plan.DISPATCH_ROWS`):

- ``alltoall``: every (token, expert) copy goes straight from its source to
  the expert's GPU: NVLink inside a node, NIC (+ uplinks) across nodes.
- ``allgather``: every GPU receives every other GPU's tokens of the group and
  selects locally (rows given by the caller are all ``T``).
- ``hierarchical`` (DeepEP normal): a token crosses the network once per
  target *node*, to the GPU with the sender's local rank there, which forwards
  it over NVLink once per target GPU of that node.
- ``low_latency`` (DeepEP low-latency): one message per (token, expert) copy,
  like ``alltoall``: to a peer of the same node it is a warp copy over NVLink
  (``nvshmemi_get_p2p_ptr`` non-null: DeepEP's default
  ``allow_nvlink_for_low_latency_mode=True``), to other nodes an IBGDA RDMA
  put. It differs from ``alltoall`` in needing no split-size exchange
  (fixed-size receive buffers; see :mod:`moesim.simulate.plan`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from moesim.simulate.topology import Topology

F64 = NDArray[np.float64]


def node_onehot_PNd(topo: Topology) -> F64:
    """``[P, Nd]`` 1.0 where rank ``p`` sits on node ``n`` of its group."""
    return (topo.node_of_P[:, None] == np.arange(topo.nodes_per_group)[None, :]).astype(float)


def flat_links(rows_XPP: F64, topo: Topology) -> F64:
    """Link rows ``[X, L]`` when rank ``s`` sends ``rows_XPP[x, s, d]`` rows to rank ``d``.

    Same-node rows take NVLink, other rows the NICs (and uplinks); a rank's rows
    to itself stay in its memory.
    """
    same = topo.same_node_PP()
    off = ~np.eye(topo.ep, dtype=bool)
    cross = rows_XPP * ~same
    nvl = rows_XPP * (same & off)
    nic = cross
    M = node_onehot_PNd(topo)
    up_out = cross.sum(-1) @ M
    up_in = cross.sum(-2) @ M
    parts = [nvl.sum(-1), nvl.sum(-2), nic.sum(-1), nic.sum(-2), up_out, up_in]
    return np.concatenate(parts, axis=-1)


def hierarchical_links(tok_XPP: F64, tok_XPNd: F64, topo: Topology) -> F64:
    """Link rows ``[X, L]`` of DeepEP-style two-hop dispatch.

    ``tok_XPP[x, s, d]``: distinct tokens source rank ``s`` needs on rank ``d``;
    ``tok_XPNd[x, s, n]``: distinct tokens ``s`` needs on node ``n`` (RDMA once each).
    """
    X, P = tok_XPP.shape[0], topo.ep
    Nd, gpn = topo.nodes_per_group, topo.ranks_per_node  # EP ranks on one node
    same = topo.same_node_PP()
    off = ~np.eye(P, dtype=bool)
    direct = tok_XPP * (same & off)
    su_out, su_in = direct.sum(-1), direct.sum(-2)
    nic_out = np.zeros((X, P))
    nic_in = np.zeros((X, P))
    up_out = np.zeros((X, Nd))
    up_in = np.zeros((X, Nd))
    if Nd > 1:
        cross_PNd = topo.node_of_P[:, None] != np.arange(Nd)[None, :]
        rdma = tok_XPNd * cross_PNd
        nic_out = rdma.sum(-1)
        # the receiver of (s, n) is the GPU of node n with s's local rank
        nic_in = rdma.reshape(X, Nd, gpn, Nd).sum(1).transpose(0, 2, 1).reshape(X, P)
        up_out = rdma.reshape(X, Nd, gpn, Nd).sum(axis=(2, 3))
        up_in = rdma.sum(1)
        local = np.arange(P) % gpn
        fwd = ~same & (local[:, None] != local[None, :])
        hop = tok_XPP * fwd
        su_in = su_in + hop.sum(-2)
        W = hop @ node_onehot_PNd(topo)  # [X, P(s), N(n)] rows forwarded on node n for s
        su_out = su_out + W.reshape(X, Nd, gpn, Nd).sum(1).transpose(0, 2, 1).reshape(X, P)
    return np.concatenate([su_out, su_in, nic_out, nic_in, up_out, up_in], axis=-1)
