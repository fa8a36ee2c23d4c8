"""TP / SP, CP, expert TP, MoE Parallel Folding and recompute in the simulator, on paper.

Round-number hardware (tests/test_sim_support.py): fp32, 100 GB/s HBM and
NVLink, no latency. T = 8 tokens per GPU, D = 64.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_sim_support import hardware, scenario

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
    one = simulate(scenario("workload.mode=training"), hw)
    two = simulate(scenario("workload.mode=training", "parallel.tp=2"), hw)
    diff = two.details["stage_time_s"] - one.details["stage_time_s"]
    assert diff == pytest.approx(2 * 2 * T * D * B / NVLINK, rel=1e-9)
    assert two.backward_phases_s["tp_comm"] == pytest.approx(2 * T * D * B / NVLINK)


def test_full_recompute_reruns_the_forward_before_the_backward() -> None:
    hw = hardware()
    fwd = simulate(scenario(), hw).step_time_s  # prefill = one layer's forward
    base = ["workload.mode=training"]
    none = simulate(scenario(*base), hw).details["stage_time_s"]
    full = simulate(scenario(*base, "workload.recompute_granularity=full"), hw)
    assert full.details["stage_time_s"] - none == pytest.approx(fwd, rel=1e-9)


def test_selective_recompute_of_core_attention_adds_the_core() -> None:
    hw = hardware()
    base = ["workload.mode=training", ATTN]
    none = simulate(scenario(*base), hw)
    sel = simulate(scenario(*base, "workload.recompute_granularity=selective"), hw)
    core = sel.details["compute_s"]["attn_core"]
    # 4 heads x (16 + 16) x 2 FLOPs x 32 mean keys x 8 tokens at 1 TFLOP/s
    assert core == pytest.approx(4 * 32 * 2 * 32 * T / 1e12)
    assert sel.details["stage_time_s"] - none.details["stage_time_s"] == pytest.approx(core)


def test_cp_ring_exposes_what_the_attention_core_does_not_hide() -> None:
    """cp=2: K and V of the rank's T tokens (4 heads x 32) go one hop: 4096 B -> 40.96 ns."""
    hw = hardware()
    scn = scenario(ATTN, "parallel.cp=2")
    c = _plan(scn, hw).compute_s
    ring = T * 4 * 32 * B / NVLINK
    assert c["cp_comm"] == pytest.approx(max(0.0, ring - c["attn_core"]))
    assert c["cp_comm_bwd"] == pytest.approx(max(0.0, 2 * ring - 2 * c["attn_core"]))
    one = simulate(scenario(ATTN), hw, trace=True)
    two = simulate(scn, hw, trace=True)
    delay = _log(two, "dispatch.start") - _log(one, "dispatch.start")
    assert delay == pytest.approx(c["cp_comm"], abs=1e-15)


def test_expert_tp_groups_are_strided_and_run_their_peers_rows() -> None:
    hw = hardware(gpus_per_node=4)
    scn = scenario("cluster.gpus_per_node=4", "parallel.etp=2")
    topo = build_topology(scn, hw)
    assert [list(topo.group_gpus(g)) for g in range(2)] == [[0, 2], [1, 3]]
    plan = _plan(scn, hw)
    flat = scenario("cluster.gpus_per_node=4")  # same loads (same seed), etp = 1
    base = _plan(flat, hw).work[0][0]
    w = plan.work[0][0]
    cost = CostModel(hw)
    assert w.etp_s_G.shape == (4,)
    # each GPU runs both ETP ranks' rows for its 2 local experts on F/2 = 64
    from moesim.simulate.loads import LoadModel

    load = LoadModel(scn, topo, scn.workload.seed, 1).load(0, 0)
    recv_GL = load.sent_GE.reshape(2, 2, 4).sum(1).reshape(4, 2).astype(float)
    rows = recv_GL.reshape(1, 2, 2, 2).sum(1, keepdims=True)
    rows = np.broadcast_to(rows, (1, 2, 2, 2)).reshape(4, 2)
    assert np.allclose(w.experts_s_G, cost.experts_s(rows, D, 64, "fp32"))
    own = recv_GL.sum(-1).reshape(1, 2, 2).max(1)
    expected = 2 * np.repeat(own, 2, axis=0).reshape(4) * D * B / NVLINK
    assert np.allclose(w.etp_s_G, expected)
    assert not base.etp_s_G.any()


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
