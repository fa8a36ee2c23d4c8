"""TP / SP, CP, expert TP, MoE Parallel Folding and recompute in the simulator, on paper.

Round-number hardware (tests/sim_builders.py): fp32, 100 GB/s HBM and
NVLink, no latency. T = 8 tokens per GPU, D = 64.
"""

from __future__ import annotations

import numpy as np
import pytest
from sim_builders import hardware, scenario, with_collectives

from moesim.costs.model import CostModel
from moesim.errors import ConfigError
from moesim.simulate import simulate
from moesim.simulate.plan import build_plan
from moesim.simulate.topology import build_topology

T, D, B = 8, 64, 4
NVLINK = 100e9
ATTN = ("model.dense={num_attention_heads: 4, num_key_value_heads: 4, head_dim: 16, "
        "seq_length: 64}")  # fmt: skip


def _plan(scn, hw):
    return build_plan(scn, hw, build_topology(scn, hw), scn.workload.seed)


def _log(res, name: str) -> float:
    return dict(res.event_log)[name]


def test_tp_adds_its_all_gather_and_reduce_scatter_and_nothing_else() -> None:
    """tp=2: AG + RS of one T x D shard each way, 2 x 8*64*4 B / 100 GB/s = 40.96 ns."""
    hw = hardware()
    one = simulate(scenario(), hw, trace=True)
    two = simulate(scenario("parallel.tp=2"), hw, trace=True)
    tp_s = 2 * T * D * B / NVLINK
    assert _log(two, "dispatch.start") - _log(one, "dispatch.start") == pytest.approx(tp_s)
    assert two.step_time_s - one.step_time_s == pytest.approx(tp_s, rel=1e-9)
    assert two.phases_s["tp_comm"] == pytest.approx(tp_s)
    # same tokens per GPU through the experts: the miscount of issue 13 is gone
    assert two.details["tokens_per_step"] == one.details["tokens_per_step"] == 2 * T
    assert two.phases_s["experts"] == one.phases_s["experts"]


def test_tp_in_training_pays_its_collectives_forward_and_backward() -> None:
    hw = hardware()
    two = simulate(scenario("workload.mode=training", "parallel.tp=2"), hw)
    block = 2 * T * D * B / NVLINK
    assert two.phases_s["tp_comm"] == pytest.approx(block)
    assert two.backward_phases_s["tp_comm"] == pytest.approx(block)
    assert two.step_breakdown_s["critical_gpu"]["exposed_tp"] == pytest.approx(2 * block)
    assert two.bytes_per_gpu["by_kind"]["tp"]["scaleup"] == pytest.approx(2 * 2 * T * D * B)


def test_measured_collectives_price_a_tp_group_inside_a_node() -> None:
    """tp=2 with measured all-gather (5 us + b / 2 GB/s) and reduce-scatter (3 us +
    b / 1 GB/s) of the 2-GPU group: one block is both, of the T x D message (2048 B),
    forward and backward alike; the bytes on the links stay the ring's."""
    fits = {"all_gather__2": (5.0, 2.0), "reduce_scatter__2": (3.0, 1.0)}
    hw = with_collectives(hardware(), **fits)
    two = simulate(scenario("workload.mode=training", "parallel.tp=2"), hw)
    msg = T * D * B
    block = (5e-6 + msg / 2e9) + (3e-6 + msg / 1e9)
    assert two.phases_s["tp_comm"] == pytest.approx(block, rel=1e-9)
    assert two.backward_phases_s["tp_comm"] == pytest.approx(block, rel=1e-9)
    assert two.bytes_per_gpu["by_kind"]["tp"]["scaleup"] == pytest.approx(2 * 2 * T * D * B)
    # one of the two kinds missing: the links price the block, as without any fit
    half = with_collectives(hardware(), all_gather__2=(5.0, 2.0))
    spec = simulate(scenario("workload.mode=training", "parallel.tp=2"), half)
    assert spec.phases_s["tp_comm"] == pytest.approx(2 * T * D * B / NVLINK)


NO_OPT = ("workload.mode=training", "workload.optimizer_bytes_per_param=0")


def test_full_recompute_reruns_the_forward_before_the_backward() -> None:
    hw = hardware()
    fwd = simulate(scenario(), hw).step_time_s  # prefill = one layer's forward
    none = simulate(scenario(*NO_OPT), hw).step_time_s
    full = simulate(scenario(*NO_OPT, "workload.recompute_granularity=full"), hw)
    assert full.step_time_s - none == pytest.approx(fwd, rel=1e-9)
    assert full.phases_s["dispatch"] > 0 and "dispatch_recompute.start" in dict(
        simulate(scenario(*NO_OPT, "workload.recompute_granularity=full"), hw, trace=True).event_log
    )


def test_selective_recompute_of_core_attention_adds_the_core() -> None:
    hw = hardware()
    none = simulate(scenario(*NO_OPT, ATTN), hw)
    sel = simulate(scenario(*NO_OPT, ATTN, "workload.recompute_granularity=selective"), hw)
    core = sel.details["compute_s"]["attn_core"]
    # 4 heads x (16 + 16) x 2 FLOPs x 32 mean keys x 8 tokens at 1 TFLOP/s
    assert core == pytest.approx(4 * 32 * 2 * 32 * T / 1e12)
    assert sel.step_time_s - none.step_time_s == pytest.approx(core)


def test_cp_ring_runs_beside_the_attention_and_exposes_the_rest() -> None:
    """cp=2: K and V of the rank's T tokens (4 heads x 32) go one hop: 4096 B.

    On a 1 GB/s NVLink the ring (4.096 us) outlasts the attention; the TP/next op
    waits for the later of the two.
    """
    hw = hardware("node.scaleup.link_GBps=1")
    one = simulate(scenario(ATTN), hw, trace=True)
    two = simulate(scenario(ATTN, "parallel.cp=2"), hw, trace=True)
    ring = T * 4 * 32 * B / 1e9
    dense = two.details["compute_s"]["dense"]
    assert two.phases_s["cp_comm"] == pytest.approx(ring)
    delay = _log(two, "dispatch.start") - _log(one, "dispatch.start")
    assert delay == pytest.approx(ring - dense, rel=1e-9)
    fast = simulate(scenario(ATTN, "parallel.cp=2"), hardware(), trace=True)
    base = simulate(scenario(ATTN), hardware(), trace=True)
    hidden = _log(fast, "dispatch.start") - _log(base, "dispatch.start")
    assert hidden == pytest.approx(0.0, abs=1e-15)  # 40.96 ns ring < the attention


def test_expert_tp_groups_are_strided_and_run_their_peers_rows() -> None:
    hw = hardware(gpus_per_node=4)
    scn = scenario("cluster.gpus_per_node=4", "parallel.etp=2")
    topo = build_topology(scn, hw)
    assert [list(topo.group_gpus(g)) for g in range(2)] == [[0, 2], [1, 3]]
    w = _plan(scn, hw).work[0][0]
    base = _plan(scenario("cluster.gpus_per_node=4"), hw).work[0][0]
    cost = CostModel(hw)
    # each GPU runs both ETP ranks' rows for its 2 local experts on F/2 = 64
    from moesim.simulate.loads import LoadModel

    load = LoadModel(scn, topo, scn.workload.seed, 1).load(0, 0)
    recv_GL = load.sent_GE.reshape(2, 2, 4).sum(1).reshape(4, 2).astype(float)
    rows = recv_GL.reshape(1, 2, 2, 2).sum(1, keepdims=True)
    rows = np.broadcast_to(rows, (1, 2, 2, 2)).reshape(4, 2)
    assert np.allclose(w.experts_s_G, cost.experts_s(rows, D, 64, "fp32"))
    # AG + RS: 2 (etp - 1) R D b out of (and into) each GPU's NVLink port, R = the
    # most rows one of its ETP pair received
    own = recv_GL.sum(-1).reshape(1, 2, 2).max(1)
    expected = 2 * np.repeat(own, 2, axis=0).reshape(2, 2) * D * B
    assert w.etp is not None and base.etp is None
    assert np.allclose(w.etp.demand_XL[:, :2], expected)
    assert np.allclose(w.etp.demand_XL[:, 2:4], expected)
    res = simulate(scn, hw)
    assert res.phases_s["etp_comm"] > 0


def test_model_flops_and_mfu_follow_the_formula() -> None:
    hw = hardware()
    res = simulate(scenario("workload.mode=training"), hw)
    n_matmul = 3 * D * 128 + D * 4  # top-1 expert (SwiGLU) + router; no attention, no vocab
    assert res.details["model_flops_per_token"] == 6 * n_matmul
    tokens_per_gpu_s = res.throughput_tokens_per_s / 2
    assert res.model_tflops_per_gpu == pytest.approx(tokens_per_gpu_s * 6 * n_matmul / 1e12)
    assert res.mfu == pytest.approx(res.model_tflops_per_gpu / 1.0)  # fp32 peak 1 TFLOP/s


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["parallel.dp=3"], "attention layers: tp*cp*dp*pp = 3 must equal cluster GPUs"),
        (["parallel.cp=3"], "attention layers: tp*cp*pp = 3 must divide cluster GPUs"),
        (["parallel.etp=4", "model.moe_intermediate_size=128"],
         "MoE layers: etp*ep*edp*pp must equal cluster GPUs (1x2 = 2), but etp*ep*pp = 8"),
        (["parallel.tp=2", "parallel.sp=false"], "parallel.sp = False: must be true with tp > 1"),
        (["parallel.tp=2", "parallel.ep=1", ATTN.replace("4, num_key", "3, num_key")
          .replace("num_key_value_heads: 4", "num_key_value_heads: 3")],
         "parallel.tp = 2: must divide model.dense.num_attention_heads (3)"),
    ],
)  # fmt: skip
def test_folding_errors_say_which_products_must_match(overrides, needle) -> None:
    with pytest.raises(ConfigError) as err:
        scenario(*overrides)
    assert needle in str(err.value)


def test_etp_groups_must_own_whole_nodes() -> None:
    scn = scenario("cluster.nodes=3", "cluster.gpus_per_node=2", "parallel.ep=3",
                   "model.num_experts=6", "parallel.etp=1")  # fmt: skip
    with pytest.raises(ConfigError, match=r"parallel\.ep = 3: must be a multiple"):
        simulate(scn, hardware())


def test_compare_tp_on_fixed_gpus_costs_only_its_collectives(capsys) -> None:
    """`compare --vary parallel.tp=1,2` on tiny-cpu's 4 GPUs: same tokens, same compute;
    the step grows by what the TP collectives expose (issue 13: TP used to be charged
    all T tokens per GPU and throughput counted them once per TP group)."""
    import json

    from moesim.cli import main

    argv = ["compare", "scenarios/tiny-cpu.yaml", "--vary", "parallel.tp=1,2",
            "--set", "workload.mode=prefill", "--json"]  # fmt: skip
    assert main(argv) == 0
    one, two = (v["result"] for v in json.loads(capsys.readouterr().out)["variants"])
    assert one["details"]["tokens_per_step"] == two["details"]["tokens_per_step"]
    c1, c2 = (r["step_breakdown_s"]["critical_gpu"] for r in (one, two))
    assert c2["compute"] == pytest.approx(c1["compute"], rel=1e-12)
    assert c1["exposed_tp"] == 0 < c2["exposed_tp"]
    exposed = (c2["exposed_tp"] + c2["exposed_ep"]) - (c1["exposed_tp"] + c1["exposed_ep"])
    assert two["step_time_s"] - one["step_time_s"] == pytest.approx(exposed, rel=1e-9)
    assert two["throughput_tokens_per_s"] < one["throughput_tokens_per_s"]
