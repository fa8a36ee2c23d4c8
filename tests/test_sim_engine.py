"""The engine end to end: hand-checked event logs, monotonic sanity, every scenario."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moesim.config import load_hardware, load_pair
from moesim.costs.model import CostModel
from moesim.simulate import PHASES, simulate
from moesim.simulate.plan import build_plan
from moesim.simulate.topology import build_topology

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = sorted(p.name for p in (REPO / "scenarios").glob("*.yaml"))
BIG = {"deepseek-v3-2048xh800.yaml", "balancing-deepseek-v3-256xh800.yaml"}  # slow: 200 steps
ROW_BYTES = 64 * 4  # hidden 64, fp32
#: split-size exchange before an alltoall dispatch: E/P = 2 int64 counts to the one peer
EXCHANGE_BYTES = 2 * 8
EXCHANGE_S = EXCHANGE_BYTES / 100e9  # over 100 GB/s NVLink, no latency


def _log(res, name: str) -> float:
    return dict(res.event_log)[name]


@pytest.mark.parametrize("slowdown", [1.0, 3.0])
def test_a_straggler_delays_the_dispatch_and_the_combine(
    make_scenario: Any, make_hardware: Any, slowdown: float
) -> None:
    scn = make_scenario(f"workload.stragglers=[{{gpu: 1, compute_slowdown: {slowdown}}}]")
    hw = make_hardware()
    res = simulate(scn, hw, trace=True)
    plan = build_plan(scn, hw, build_topology(scn, hw), scn.workload.seed)
    w = plan.work[0][0]
    c, exp = plan.compute_s, w.experts_s_G + w.regroup_s_G
    before = (c["norm"] + c["gate"] + c["permute"]) * slowdown  # GPU 1 is the last one ready
    assert _log(res, "dispatch.start") == pytest.approx(before, rel=1e-12)
    experts_end = max(exp[0], exp[1] * slowdown)
    expected = _log(res, "dispatch.end") + experts_end
    assert _log(res, "combine.start") == pytest.approx(expected, rel=1e-12)
    assert [name for name, _ in res.event_log] == [
        "dispatch.start", "dispatch.end", "combine.start", "combine.end",
    ]  # fmt: skip


def _all_to_expert_zero(make_scenario: Any, tmp_path: Path, *extra: str):
    np.save(tmp_path / "ids.npy", np.zeros((16, 1), dtype=np.int64))
    return make_scenario(
        "workload.routing.distribution=trace", f"workload.routing.trace={tmp_path / 'ids.npy'}",
        *extra,
    )  # fmt: skip


def test_dropless_vs_capacity_limited_layer(
    make_scenario: Any, make_hardware: Any, tmp_path: Path
) -> None:
    hw = make_hardware()
    cost = CostModel(hw)
    dropless = simulate(_all_to_expert_zero(make_scenario, tmp_path), hw)
    limited = simulate(
        _all_to_expert_zero(make_scenario, tmp_path, "router.capacity_factor=1.0"), hw
    )
    # every token picks expert 0 (on GPU 0); capacity ceil(8 * 1 / 4 * 1.0) = 2 per source
    assert dropless.drop_fraction == 0.0
    assert limited.drop_fraction == 0.75
    # GPU 1 sends its 8 (or 2) rows to GPU 0 over 100 GB/s NVLink
    assert dropless.dispatch_time_s == pytest.approx(EXCHANGE_S + 8 * ROW_BYTES / 100e9, rel=1e-12)
    assert limited.dispatch_time_s == pytest.approx(EXCHANGE_S + 2 * ROW_BYTES / 100e9, rel=1e-12)
    assert dropless.dispatch_bytes_per_gpu == 8 * ROW_BYTES / 2
    e = cost.experts_s(np.array([[16.0, 0.0], [4.0, 0.0]]), 64, 128, "fp32")
    # GPU 0 sorts its 16 (or 4) received rows by local expert and back: two gathers,
    # each reading and writing 256 B rows plus an 8 B index, at 100 GB/s
    regroup = [2 * (2 * m * ROW_BYTES + 8 * m) / 100e9 for m in (16, 4)]
    assert dropless.phases_s["experts"] == pytest.approx(e[0] + regroup[0], rel=1e-12)
    assert limited.phases_s["experts"] == pytest.approx(e[1] + regroup[1], rel=1e-12)
    assert dropless.details["regroup_s"] == pytest.approx(regroup[0] / 2, rel=1e-12)
    assert dropless.load_imbalance == 4.0  # all on one of four experts
    assert dropless.gpu_load_imbalance == 2.0


@pytest.mark.parametrize(
    ("overrides", "regrouped"),
    [
        ((), True),
        (("dispatcher=low_latency",), False),  # DeepEP LL delivers rows expert-major
        (("model.num_experts=2",), False),  # one expert per rank: nothing to sort
    ],
)
def test_regroup_only_for_alltoall_with_several_local_experts(
    make_scenario: Any, make_hardware: Any, overrides: tuple[str, ...], regrouped: bool
) -> None:
    hw = make_hardware()
    scn = make_scenario(*overrides)
    plan = build_plan(scn, hw, build_topology(scn, hw), scn.workload.seed)
    w = plan.work[0][0]
    assert bool((w.regroup_s_G > 0).all()) is regrouped
    assert bool((w.regroup_s_G == 0).all()) is not regrouped
    res = simulate(scn, hw)
    gemm = float(np.max(w.experts_s_G))
    assert (res.phases_s["experts"] > gemm) is regrouped


def test_padding_to_capacity_sends_and_computes_full_buffers(
    make_scenario: Any, make_hardware: Any, tmp_path: Path
) -> None:
    hw = make_hardware()
    padded = simulate(
        _all_to_expert_zero(
            make_scenario, tmp_path, "router.capacity_factor=1.0", "router.pad_to_capacity=true"
        ),
        hw,
    )
    assert padded.drop_fraction == 0.75
    # GPU 1 sends capacity (2) rows for each of GPU 0's two experts
    assert padded.dispatch_time_s == pytest.approx(EXCHANGE_S + 4 * ROW_BYTES / 100e9, rel=1e-12)


def test_same_seed_same_json_and_another_seed_other_numbers() -> None:
    scn, hw = load_pair(REPO / "scenarios/tiny-cpu.yaml")
    a = json.dumps(simulate(scn, hw).to_dict())
    b = json.dumps(simulate(scn, hw).to_dict())
    c = simulate(scn, hw, seed=1).to_dict()
    assert a == b
    assert c["step_time_s"] != json.loads(a)["step_time_s"]


def _qwen(*extra: str):
    return load_pair(
        REPO / "scenarios/qwen3-30b-a3b-16xh100.yaml",
        ["model.num_moe_layers=3", "workload.tokens_per_gpu=2048", *extra],
    )


def test_more_bandwidth_is_never_slower() -> None:
    scn, _ = _qwen()
    steps = []
    for scale in (0.5, 1.0, 2.0, 8.0):
        hw = load_hardware(
            "h100-sxm",
            [f"scaleout.nic_GBps={50 * scale}", f"node.scaleup.link_GBps={450 * scale}"],
        )
        steps.append(simulate(scn, hw).step_time_s)
    assert steps == sorted(steps, reverse=True)
    assert steps[0] > steps[-1]


def test_larger_capacity_factor_never_drops_more() -> None:
    drops = [
        simulate(*_qwen(f"router.capacity_factor={cf}")).drop_fraction
        for cf in (0.5, 1.0, 1.25, 2.0, "null")
    ]
    assert drops == sorted(drops, reverse=True)
    assert drops[0] > 0.1 and drops[-1] == 0.0


def test_more_skew_never_less_imbalance() -> None:
    res = [simulate(*_qwen(f"workload.routing.zipf_exponent={a}")) for a in (0.0, 0.4, 0.8, 1.2)]
    imb = [r.load_imbalance for r in res]
    assert imb == sorted(imb)
    assert [r.gpu_load_imbalance for r in res] == sorted(r.gpu_load_imbalance for r in res)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather", "hierarchical", "low_latency"])
def test_every_dispatcher_runs_on_two_nodes(dispatcher: str) -> None:
    res = simulate(*_qwen(f"dispatcher={dispatcher}"))
    assert res.dispatch_time_s > 0 and res.combine_time_s > 0


def test_hierarchical_moves_fewer_network_bytes_than_flat_with_many_experts_per_node() -> None:
    flat = simulate(*_qwen("dispatcher=alltoall"))
    hier = simulate(*_qwen("dispatcher=hierarchical"))
    assert hier.dispatch_time_s < flat.dispatch_time_s


def test_fp8_dispatch_about_halves_dispatch_bytes() -> None:
    bf16 = simulate(*_qwen())
    fp8 = simulate(*_qwen("model.dispatch_dtype=fp8"))
    # fp8 rows carry one fp32 scale per 128 elements: (2048 + 16 * 4) / (2 * 2048)
    ratio = (2048 + 64) / 4096
    assert fp8.dispatch_bytes_per_gpu == pytest.approx(bf16.dispatch_bytes_per_gpu * ratio)
    assert fp8.combine_time_s == pytest.approx(bf16.combine_time_s)


def test_overlapping_two_micro_batches_hides_communication() -> None:
    serial = simulate(*_qwen("workload.micro_batches=2"))
    overlap = simulate(*_qwen("workload.micro_batches=2", "workload.overlap_micro_batches=true"))
    assert overlap.step_time_s < serial.step_time_s


def test_pipeline_and_tensor_parallel_scenario_runs() -> None:
    scn, hw = load_pair(
        REPO / "scenarios/qwen3-30b-a3b-16xh100.yaml",
        ["parallel.ep=4", "parallel.pp=2", "parallel.tp=2", "model.num_moe_layers=4",
         "workload.tokens_per_gpu=1024", "workload.micro_batches=4"],
    )  # fmt: skip
    res = simulate(scn, hw)
    assert res.details["moe_layers_per_stage"] == 2
    assert res.details["pp_schedule"] == "1f1b" and res.details["pp"] == 2
    assert 0 < res.bubble_fraction < 1
    assert res.bytes_per_gpu["by_kind"]["pp"]["network"] > 0  # the two stages are two nodes


@pytest.mark.parametrize("distribution", ["lognormal", "dirichlet", "router"])
def test_other_load_sources_run(distribution: str) -> None:
    scn, hw = load_pair(
        REPO / "scenarios/tiny-cpu.yaml",
        [f"workload.routing.distribution={distribution}", "workload.routing.source_skew=0.5",
         "router.capacity_factor=1.0"],
    )  # fmt: skip
    res = simulate(scn, hw)
    assert 0 < res.drop_fraction < 1 and res.load_imbalance > 1


@pytest.mark.parametrize(
    "name", [n if n not in BIG else pytest.param(n, marks=pytest.mark.slow) for n in SCENARIOS]
)
def test_every_shipped_scenario_simulates(name: str) -> None:
    scn, hw = load_pair(REPO / "scenarios" / name)
    d = simulate(scn, hw).to_dict()
    for key in ("step_time_s", "throughput_tokens_per_s", "dispatch_time_s", "combine_time_s",
                "alltoall_fraction", "dispatch_bytes_per_gpu", "drop_fraction",
                "load_imbalance", "gpu_load_imbalance"):  # fmt: skip
        assert np.isfinite(d[key]) and d[key] >= 0, key
    assert d["step_time_s"] > 0 and 0 <= d["alltoall_fraction"] <= 1
    assert set(PHASES) <= set(d["phases_s"])
    json.dumps(d)


def test_calibrated_alltoall_fit_prices_a_lone_coflow_as_the_fit(
    make_scenario: Any, make_hardware: Any, tmp_path: Path
) -> None:
    from moesim.config.hardware import Calibration, CalibrationSource, CommFit, Curve

    fit = CommFit(latency_us=2.0, bandwidth_GBps=Curve(x=[1.0, 1e6], y=[1.0, 1.0]))
    cal = Calibration(
        source=CalibrationSource(results=[], device="test", created="now"),
        alltoall={"scaleup": fit},
    )
    hw = make_hardware().model_copy(update={"calibration": cal})
    res = simulate(_all_to_expert_zero(make_scenario, tmp_path), hw)
    # counts first (2 us + 16 B / 1 GB/s), then GPU 1 sends 8 rows (2048 B) to GPU 0:
    # 2 us + 2048 B / 1 GB/s on the busiest link
    exchange = 2e-6 + EXCHANGE_BYTES / 1e9
    assert res.dispatch_time_s == pytest.approx(exchange + 2e-6 + 8 * ROW_BYTES / 1e9, rel=1e-12)


def test_decode_with_low_latency_dispatch_and_no_expert_parallelism() -> None:
    decode = simulate(*_qwen("workload.mode=decode", "workload.tokens_per_gpu=64",
                             "dispatcher=low_latency"))  # fmt: skip
    assert decode.backward_phases_s == {} and decode.phases_s["grad_sync"] == 0.0
    assert decode.dispatch_time_s > 5e-6  # latency-bound: at least one NIC latency
    no_ep = simulate(*_qwen("parallel.ep=1", "parallel.dp=16"))
    assert no_ep.dispatch_time_s == 0.0 and no_ep.step_time_s > 0


@pytest.mark.parametrize(("per", "drop"), [("batch", 0.0), ("sequence", 0.5)])
def test_capacity_per_sequence_counts_each_sequence_separately(
    make_scenario: Any, make_hardware: Any, tmp_path, per, drop
) -> None:
    # 8 tokens per GPU: the first sequence of 4 all to expert 0, the second all to expert 1
    np.save(tmp_path / "ids.npy", np.array([[0]] * 4 + [[1]] * 4, dtype=np.int64))
    scn = make_scenario(
        "model.num_experts=2", "workload.routing.distribution=trace",
        f"workload.routing.trace={tmp_path / 'ids.npy'}", "router.capacity_factor=1.0",
        "router.drop_policy=position", f"router.capacity_per={per}", "router.sequence_length=4",
    )  # fmt: skip
    assert simulate(scn, make_hardware()).drop_fraction == drop


def test_per_token_ids_in_chunks_of_gpus_give_the_same_loads(monkeypatch) -> None:
    from moesim.simulate import loads

    scn, hw = load_pair(
        REPO / "scenarios/tiny-cpu.yaml",
        ["workload.routing.distribution=router", "router.capacity_factor=1.0"],
    )
    whole = simulate(scn, hw).to_dict()
    monkeypatch.setattr(loads, "IDS_PER_CHUNK", scn.workload.tokens_per_gpu * 2)  # 1 GPU each
    chunked = simulate(scn, hw).to_dict()
    assert chunked == whole


def test_ep_groups_that_straddle_nodes_are_refused(make_scenario: Any, make_hardware: Any) -> None:
    from moesim.errors import ConfigError

    scn = make_scenario("cluster.nodes=3", "cluster.gpus_per_node=2", "parallel.ep=3",
                        "model.num_experts=6")  # fmt: skip
    with pytest.raises(ConfigError, match=r"parallel\.ep = 3: must be a multiple or a divisor"):
        simulate(scn, make_hardware())


def test_one_layer_event_log_worked_out_on_paper(
    make_scenario: Any, make_hardware: Any, tmp_path: Path
) -> None:
    """fp32, D=64, F=128, E=4, 8 tokens per GPU all routed to expert 0 (on GPU 0).

    Roofline at 1 TFLOP/s and 100 GB/s, no launch cost, NVLink 100 GB/s:
    2 RMSNorms (no attention): 2 x 8 x 64 x 4 B read + written each -> 2 x 40.96 ns
    gate   3552 B (x, W, scores, ids)        -> 35.52 ns
    permute 4160 B                          -> 41.60 ns
    dispatch: counts, 2 x 8 B to the peer    -> 0.16 ns
              then GPU 1 sends 8 rows of 256 B -> 20.48 ns
    experts on GPU 0: 16 rows; weights 98304 B + activations 24576 B -> 1228.8 ns
      + regroup of the 16 received rows (2 local experts), there and back:
        2 x (16 x 256 B read + written + 16 x 8 B index) = 16640 B -> 166.4 ns
    combine: 8 rows back (splits known)     -> 20.48 ns
    unpermute 4192 B                        -> 41.92 ns
    """
    res = simulate(_all_to_expert_zero(make_scenario, tmp_path), make_hardware(), trace=True)
    ns = [(name, round(t * 1e9, 6)) for name, t in res.event_log]
    assert ns == [
        ("dispatch.start", 159.04),
        ("dispatch.end", 179.68),
        ("combine.start", 1574.88),
        ("combine.end", 1595.36),
    ]
    assert res.step_time_s == pytest.approx(1637.28e-9, rel=1e-12)  # + unpermute 41.92


def test_every_scenario_dispatcher_has_a_traffic_model() -> None:
    from moesim.config.scenario import DISPATCHERS
    from moesim.simulate.plan import DISPATCH_ROWS
    from moesim.simulate.routing import DISTRIBUTIONS

    assert tuple(DISPATCH_ROWS) == DISPATCHERS
    synthetic = {"uniform", "zipf", "lognormal", "dirichlet"}
    assert set(DISTRIBUTIONS) == synthetic  # plus "trace" and "router", read per token


def test_fp8_models_price_the_attention_core_in_bf16() -> None:
    """On the spec profile (no GEMM table): projections by their FLOPs in fp8, the
    flash-attention core in bf16 (the measured-table path: tests/test_dense_gemms.py)."""
    from moesim.config.loader import load_hardware
    from moesim.costs import work

    scn, _ = _qwen("model.dtype=fp8")
    hw = load_hardware("h100-sxm-spec")
    plan = build_plan(scn, hw, build_topology(scn, hw), 0)
    d, T, cost = scn.model.dense, scn.workload.tokens_per_gpu, CostModel(hw)
    assert d is not None
    shape = (2048, d.num_attention_heads, d.num_key_value_heads, d.head_dim)
    total = work.attention_flops(T, *shape, d.seq_length)
    proj = work.attention_flops(T, *shape, 0)
    nbytes = work.attention_bytes(T, *shape, 1.0)
    expected = cost.dense_s(proj, nbytes, "fp8") + cost.dense_s(total - proj, 0.0, "bf16")
    assert plan.compute_s["dense"] == pytest.approx(float(expected), rel=1e-12)


def test_split_exchange_by_hand_on_two_nodes(make_scenario: Any, make_hardware: Any) -> None:
    """EP4 on 2 nodes x 2 GPUs, E = 8: every rank sends 2 int64 counts (16 B) to each peer.

    Same-node peer: 16 B over 100 GB/s NVLink (0.16 ns); two remote peers: 32 B
    through one 10 GB/s NIC (3.2 ns), after the 5 us NIC latency.
    """
    from moesim.simulate.plan import CommPricer, split_exchange_s

    hw = make_hardware("scaleout.latency_us=5.0")
    for dispatcher, want in [("alltoall", 5e-6 + 3.2e-9), ("hierarchical", 5e-6 + 3.2e-9),
                             ("low_latency", 0.0), ("allgather", 0.0)]:  # fmt: skip
        scn = make_scenario("cluster.nodes=2", "parallel.ep=4", "model.num_experts=8",
                       f"dispatcher={dispatcher}")  # fmt: skip
        topo = build_topology(scn, hw)
        got = split_exchange_s(scn, topo, CommPricer(hw, CostModel(hw), topo))
        assert got == pytest.approx([want], rel=1e-12), dispatcher
        plan = build_plan(scn, hw, topo, 0)
        w = plan.work[0][0]
        assert w.dispatch.latency_X[0] == pytest.approx(w.combine.latency_X[0] + want, rel=1e-12)
        res = simulate(scn, hw).to_dict()
        assert res["details"]["split_exchange_s"] == pytest.approx(want, rel=1e-12)


def test_low_latency_dispatch_inside_a_node_goes_over_nvlink(
    make_scenario: Any, make_hardware: Any, tmp_path: Path
) -> None:
    """DeepEP LL on one node: GPU 1's 8 rows reach GPU 0 over 100 GB/s NVLink, no exchange."""
    res = simulate(
        _all_to_expert_zero(make_scenario, tmp_path, "dispatcher=low_latency"), make_hardware()
    )
    assert res.dispatch_time_s == pytest.approx(8 * ROW_BYTES / 100e9, rel=1e-12)
    assert res.combine_time_s == pytest.approx(8 * ROW_BYTES / 100e9, rel=1e-12)


def test_a_compute_slowdown_below_one_is_a_faster_gpu(
    make_scenario: Any, make_hardware: Any
) -> None:
    """Every GPU at 0.5x: every compute op takes half the profile's time."""
    hw = make_hardware()
    base = simulate(make_scenario(), hw)
    fast = simulate(make_scenario(
        "workload.stragglers=[{gpu: 0, compute_slowdown: 0.5}, {gpu: 1, compute_slowdown: 0.5}]"
    ), hw)  # fmt: skip
    want = 0.5 * base.step_breakdown_s["mean"]["compute"]
    assert fast.step_breakdown_s["mean"]["compute"] == pytest.approx(want, rel=1e-9)


#: the 2048-GPU scenario cut to 256 GPUs: PP4 DualPipe, EP64, SMs shared with comm
SMALL_DS = ["cluster.nodes=32", "parallel.pp=4", "model.num_moe_layers=8",
            "parallel.pp_last_stage_layers=null", "workload.micro_batches=8"]  # fmt: skip


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # DualPipe, SMs shared with the dispatch, combine and gradient buckets
        ["workload.stragglers=[{gpu: 3, compute_slowdown: 1.7}, {gpu: 70, compute_slowdown: 0.8}]"],
        ["training.comm_sm_fraction=0.0", "parallel.pp_schedule=1f1b"],
    ],
)
def test_compute_chains_in_one_pass_give_the_times_op_by_op(overrides, monkeypatch) -> None:
    """The engine prices a task's consecutive compute ops in one numpy pass
    (``GroupSim.compute_run``); cut into single ops it must give the very same floats."""
    from moesim.simulate import engine

    scn, hw = load_pair(REPO / "scenarios" / "deepseek-v3-2048xh800.yaml", SMALL_DS + overrides)
    fused = simulate(scn, hw)
    assert any(c is not None for c in _first_task_segments(scn, hw))  # chains to fuse
    monkeypatch.setattr(engine, "_segments", lambda ops: [(i, None) for i in range(len(ops))])
    single = simulate(scn, hw)
    assert fused.step_time_s == single.step_time_s
    assert fused.phases_s == single.phases_s
    assert fused.backward_phases_s == single.backward_phases_s
    assert fused.step_breakdown_s == single.step_breakdown_s
    assert fused.details["comm_sm_slowdown_s"] == single.details["comm_sm_slowdown_s"]
    if scn.training.comm_sm_fraction > 0:
        assert fused.details["comm_sm_slowdown_s"] > 0


def _first_task_segments(scn: Any, hw: Any) -> list[Any]:
    from moesim.simulate import engine
    from moesim.simulate.core import _plan
    from moesim.simulate.program import Program

    plan, pipe, layout = _plan(scn, hw, 0)
    ops = Program(plan, pipe, layout).task_ops(pipe.slots[0][0][0][0])
    return [c for _, c in engine._segments(ops)]


def test_loads_drawn_ahead_on_a_thread_change_no_number(monkeypatch) -> None:
    """Each (layer, micro-batch) load is a function of its seed: drawn a micro-batch
    ahead on the worker thread, or when the engine asks, the step is the same."""
    from moesim.simulate import loads

    scn, hw = load_pair(REPO / "scenarios" / "deepseek-v3-2048xh800.yaml", SMALL_DS)
    asked: list[tuple[int, int]] = []
    real = loads.AheadLoads.ahead

    def spy(self, layer: int, mb: int) -> None:
        asked.append((layer, mb))
        real(self, layer, mb)

    drawn: list[int] = []
    real_load = loads.LoadModel.load

    def on_thread(self, layer: int, mb: int) -> Any:
        drawn.append(threading.get_ident())
        return real_load(self, layer, mb)

    monkeypatch.setattr(loads, "AHEAD_MIN_CELLS", 0)  # this small step draws ahead too
    monkeypatch.setattr(loads.AheadLoads, "ahead", spy)
    monkeypatch.setattr(loads.LoadModel, "load", on_thread)
    ahead = simulate(scn, hw)
    assert asked and len(set(drawn)) == 2  # drawn on the engine's thread and the worker
    monkeypatch.setattr(loads.AheadLoads, "start", lambda self: None)  # no thread: all now
    now = simulate(scn, hw)
    assert ahead.to_dict() | {"provenance": None} == now.to_dict() | {"provenance": None}
