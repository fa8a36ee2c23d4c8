"""Coflow fluid model and link demands: hand-computable cases, checked exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import simpy

from moesim.simulate.network import FluidNetwork, maxmin_rates
from moesim.simulate.topology import build_topology
from moesim.simulate.traffic import flat_links, hierarchical_links

GB = 1e9

# rows rank s sends to rank d on 2 nodes x 2 GPUs (ranks 0,1 on node 0; 2,3 on node 1)
ROWS = np.array([[0, 10, 20, 30], [5, 0, 15, 25], [1, 2, 0, 3], [4, 6, 8, 0]], dtype=float)[None]


def _run(flows: list[tuple[str, float, list[float], float]], cap: list[float]) -> list:
    """Start (name, at, demand, latency) coflows; return the (name, end time) log."""
    env = simpy.Environment()
    net = FluidNetwork(env, np.array(cap))
    log: list[tuple[str, float]] = []

    def start(name: str, at: float, demand: list[float], latency: float):
        yield env.timeout(at)
        yield net.transfer("d", np.array(demand), latency)
        log.append((name, env.now))

    for f in flows:
        env.process(start(*f))
    env.run()
    return log


def test_one_coflow_takes_its_bottleneck_plus_latency() -> None:
    assert _run([("a", 0.0, [1 * GB, 3 * GB], 0.5)], [1 * GB, 2 * GB]) == [("a", 2.0)]


def test_two_coflows_sharing_one_link_split_it_fairly() -> None:
    log = _run([("A", 0.0, [1 * GB], 0.0), ("B", 0.0, [2 * GB], 0.0)], [1 * GB])
    assert log == [("A", 2.0), ("B", 3.0)]


def test_a_late_coflow_slows_the_first_only_while_both_run() -> None:
    # A alone moves 1 GB by t=1, then both get 0.5 GB/s: A ends at 3, B has 1 GB left -> 4
    log = _run([("A", 0.0, [2 * GB], 0.0), ("B", 1.0, [2 * GB], 0.0)], [1 * GB])
    assert log == [("A", 3.0), ("B", 4.0)]


def test_coflows_on_disjoint_links_do_not_interact() -> None:
    log = _run([("A", 0.0, [1 * GB, 0], 0.0), ("B", 0.0, [0, 3 * GB], 0.0)], [1 * GB, 1 * GB])
    assert log == [("A", 1.0), ("B", 3.0)]


@pytest.mark.parametrize(
    ("demand", "cap", "expected"),
    [
        ([[1, 1], [0, 1]], [1, 3], [1.0, 2.0]),  # A frozen by link 0, B takes the rest of link 1
        ([[1, 1], [1, 0], [0, 1]], [1, 1], [0.5, 0.5, 0.5]),
        ([[2, 1], [0, 1]], [2, 2], [4 / 3, 4 / 3]),  # link 1 saturates first, for both
    ],
)
def test_maxmin_rates_progressive_filling(demand, cap, expected) -> None:
    x = maxmin_rates(np.array(demand, dtype=float), np.array(cap, dtype=float))
    assert x == pytest.approx(expected)


def _topo(make_scenario: Any, make_hardware: Any, **hw_over: str):
    scn = make_scenario("cluster.nodes=2", "parallel.ep=4")
    return build_topology(scn, make_hardware(*[f"{k}={v}" for k, v in hw_over.items()]))


def test_flat_alltoall_on_two_nodes_loads_links_as_worked_out(
    make_scenario: Any, make_hardware: Any
) -> None:
    topo = _topo(
        make_scenario,
        make_hardware,
    )
    links = flat_links(ROWS, topo)[0]
    P = 4
    assert links[:P].tolist() == [10, 5, 3, 8]  # NVLink egress
    assert links[P : 2 * P].tolist() == [5, 10, 8, 3]  # NVLink ingress
    assert links[2 * P : 3 * P].tolist() == [50, 40, 3, 10]  # NIC egress
    assert links[3 * P : 4 * P].tolist() == [5, 8, 35, 55]  # NIC ingress
    assert links[4 * P :].tolist() == [90, 13, 13, 90]  # node uplinks out, in


@pytest.mark.parametrize(("oversub", "expected_s"), [(1.0, 55e-3 / 10), (4.0, 90e-3 / 5)])
def test_flat_alltoall_time_is_the_busiest_link(
    make_scenario: Any, make_hardware: Any, oversub: float, expected_s: float
) -> None:
    # 1 MB rows; NIC 10 GB/s; uplinks 2 x 10 GB/s / oversubscription
    topo = _topo(make_scenario, make_hardware, **{"scaleout.oversubscription": str(oversub)})
    demand = flat_links(ROWS, topo)[0] * 1e6
    log = _run([("a2a", 0.0, list(demand), 0.0)], list(topo.cap_L))
    assert log[0][1] == pytest.approx(expected_s, rel=1e-12)


def test_hierarchical_dispatch_crosses_the_network_once_per_node(
    make_scenario: Any, make_hardware: Any
) -> None:
    topo = _topo(
        make_scenario,
        make_hardware,
    )
    tok_PN = np.array([[10, 40], [5, 30], [3, 3], [9, 8]], dtype=float)[None]
    links = hierarchical_links(ROWS, tok_PN, topo)[0]
    P = 4
    assert links[:P].tolist() == [12, 9, 33, 23]  # NVLink egress: direct + forwarded
    assert links[P : 2 * P].tolist() == [9, 12, 23, 33]
    assert links[2 * P : 3 * P].tolist() == [40, 30, 3, 9]  # RDMA once per target node
    assert links[3 * P : 4 * P].tolist() == [3, 9, 40, 30]  # to the same local rank there
    assert links[4 * P :].tolist() == [70, 12, 12, 70]


def test_combine_is_the_dispatch_reversed(make_scenario: Any, make_hardware: Any) -> None:
    topo = _topo(
        make_scenario,
        make_hardware,
    )
    links = flat_links(ROWS, topo)[0]
    reverse = flat_links(ROWS.transpose(0, 2, 1), topo)[0]
    assert links[topo.swap_L].tolist() == reverse.tolist()
