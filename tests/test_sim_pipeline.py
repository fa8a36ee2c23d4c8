"""Pipeline schedules, sends and gradient buckets on cases worked out on paper.

One MoE layer per virtual stage, one expert (every token to it, so every GPU has
the same work), no expert parallelism: a pass of one virtual stage takes F
(forward), B (backward) or W (its weight-gradient part), read off the cost model.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from sim_builders import hardware, scenario, with_collectives

from moesim.errors import ConfigError
from moesim.simulate import simulate
from moesim.simulate.plan import build_plan
from moesim.simulate.schedules import build_pipeline
from moesim.simulate.topology import build_topology

FREE_SENDS = "node.scaleup.link_GBps=1e12"
ROW_BYTES = 64 * 4  # hidden 64, fp32


def _scn(p: int, m: int, sched: str, *extra: str, v: int = 1, layers: int | None = None):
    stages = p * v * (2 if sched == "dualpipev" else 1)
    return scenario(
        f"cluster.gpus_per_node={p}", "parallel.ep=1", f"parallel.pp={p}", f"parallel.vpp={v}",
        f"parallel.pp_schedule={sched}", f"model.num_moe_layers={layers or stages}",
        "model.num_experts=1", "workload.mode=training", f"workload.micro_batches={m}",
        "workload.optimizer_bytes_per_param=0", *extra,
    )  # fmt: skip


def _passes() -> tuple[float, float, float]:
    """F, B, W of one layer on one GPU, from the plan's per-op seconds."""
    scn, hw = _scn(1, 1, "1f1b"), hardware(gpus_per_node=1)
    plan = build_plan(scn, hw, build_topology(scn, hw), 0)
    c, w = plan.compute_s, plan.work[0][0]
    experts = float(w.experts_s_G[0] + w.regroup_s_G[0])
    mem = c["gate"] + c["permute"] + c["unpermute"] + c["norm"]  # norms: memory-bound, 1x
    return mem + experts, mem + 2 * experts, float(w.experts_s_G[0])


#: (schedule, p, m, v, published bubble in F, B, W of one virtual stage, F&B = F + B)
BUBBLES: list[tuple[str, int, int, int, Callable[[int, int, float, float, float], float]]] = [
    ("1f1b", 4, 8, 1, lambda p, v, F, B, W: (p - 1) * (F + B)),
    ("1f1b", 3, 5, 1, lambda p, v, F, B, W: (p - 1) * (F + B)),
    # per-rank passes are v times one stage's: (p-1)(vF + vB)/v
    ("interleaved", 4, 8, 2, lambda p, v, F, B, W: (p - 1) * (v * F + v * B) / v),
    ("interleaved", 2, 4, 3, lambda p, v, F, B, W: (p - 1) * (v * F + v * B) / v),
    ("zb_h1", 4, 8, 1, lambda p, v, F, B, W: (p - 1) * (F + B - 2 * W)),
    ("dualpipe", 4, 8, 1, lambda p, v, F, B, W: (p / 2 - 1) * ((F + B) + B - 3 * W)),
    ("dualpipe", 8, 16, 1, lambda p, v, F, B, W: (p / 2 - 1) * ((F + B) + B - 3 * W)),
    # DualPipeV on p ranks is DualPipe on 2p ranks folded in a V
    ("dualpipev", 4, 8, 1, lambda p, v, F, B, W: (p - 1) * ((F + B) + B - 3 * W)),
]


@pytest.mark.parametrize(("sched", "p", "m", "v", "formula"), BUBBLES)
def test_bubble_matches_the_published_formula(sched, p, m, v, formula) -> None:
    F, B, W = _passes()
    res = simulate(_scn(p, m, sched, v=v), hardware(FREE_SENDS, gpus_per_node=p))
    chunks = 2 if sched in ("dualpipev",) else v
    work = m * chunks * (F + B)  # every rank runs each micro-batch through its chunks
    assert res.step_time_s - work == pytest.approx(formula(p, v, F, B, W), rel=1e-6)
    # the bubble is what the step has beyond each GPU's compute (nothing else is exposed)
    parts = res.step_breakdown_s["mean"]
    assert parts["compute"] == pytest.approx(work, rel=1e-9)
    assert parts["bubble"] == pytest.approx(res.step_time_s - work, rel=1e-4)
    assert res.bubble_fraction == pytest.approx(parts["bubble"] / res.step_time_s)


def test_two_stage_1f1b_with_sends_event_log_by_hand() -> None:
    """Rank 0: F0 F1 B0 B1; rank 1: F0 B0 F1 B1; a send takes c = T rows / NVLink and
    moves once its receiver has posted the receive (rendezvous, as it needs the input):
    rank 0's second activation waits for rank 1 to finish B0."""
    F, B, _ = _passes()
    c = 8 * ROW_BYTES / 100e9
    res = simulate(_scn(2, 2, "1f1b"), hardware(gpus_per_node=2), trace=True)
    log = sorted(res.event_log, key=lambda e: (e[1], e[0]))
    expected = sorted(
        [
            ("pp_send_fwd.start", F), ("pp_send_fwd.end", F + c),
            ("pp_send_fwd.start", 2 * F + B + c), ("pp_send_fwd.end", 2 * F + B + 2 * c),
            ("g1:pp_send_bwd.start", 2 * F + B + c), ("g1:pp_send_bwd.end", 2 * F + B + 2 * c),
            ("g1:pp_send_bwd.start", 3 * F + 2 * B + 2 * c),
            ("g1:pp_send_bwd.end", 3 * F + 2 * B + 3 * c),
        ],
        key=lambda e: (e[1], e[0]),
    )  # fmt: skip
    assert [n for n, _ in log] == [n for n, _ in expected]
    assert [t for _, t in log] == pytest.approx([t for _, t in expected], rel=1e-12)
    assert res.step_time_s == pytest.approx(3 * F + 3 * B + 3 * c, rel=1e-12)
    # rank 0 waits B + 2c for the first gradient after its forwards, then F + c for the
    # second: c of each is the send after it started (exposed PP), the rest is rank
    # 1's compute and the forward send before it (bubble)
    r0 = _gpu_breakdown(res, 0)
    assert r0["exposed_pp"] == pytest.approx(2 * c, rel=1e-9)
    assert r0["bubble"] == pytest.approx(F + B + c, rel=1e-9)
    # rank 0 sends two activations, rank 1 two gradients: two sends per GPU
    assert res.bytes_per_gpu["by_kind"]["pp"]["scaleup"] == pytest.approx(2 * 8 * ROW_BYTES)


def test_interleaved_sends_move_as_issued() -> None:
    """Receives posted ahead (interleaved, Megatron's overlap_p2p_comm): no rendezvous,
    the by-hand eager case: rank 0's second activation leaves at 2F."""
    F, B, _ = _passes()
    c = 8 * ROW_BYTES / 100e9
    res = simulate(_scn(2, 2, "interleaved"), hardware(gpus_per_node=2),
                   trace=True)  # fmt: skip
    starts = sorted(t for n, t in res.event_log if n == "pp_send_fwd.start")
    assert starts == pytest.approx([F, 2 * F], rel=1e-12)
    assert res.step_time_s == pytest.approx(3 * F + 3 * B + 2 * c, rel=1e-12)


def _gpu_breakdown(res, gpu: int) -> dict[str, float]:
    assert res.details["critical_gpu"] in (0, 1)
    if res.details["critical_gpu"] == gpu:
        return res.step_breakdown_s["critical_gpu"]
    pytest.skip("critical GPU is the other one")  # pragma: no cover


#: one layer's parameters on a GPU: router (64 x 1) + one expert (3 x 64 x 128)
LAYER_PARAMS = 64 + 64 + 3 * 64 * 128  # router, post-attention RMSNorm, expert


@pytest.mark.parametrize("overlap", [True, False])
def test_gradient_buckets_overlap_the_last_backward(overlap: bool) -> None:
    """dp=2, two layers, one bucket per layer: reduce-scatters of r, all-gathers of a."""
    F, B, _ = _passes()
    scn = scenario(
        "cluster.gpus_per_node=2", "parallel.ep=1", "parallel.dp=2", "model.num_moe_layers=2",
        "model.num_experts=1", "workload.mode=training", "workload.micro_batches=1",
        "workload.optimizer_bytes_per_param=0",
        f"training.bucket_size_params={LAYER_PARAMS}", f"training.overlap_grad_reduce={overlap}",
        "training.overlap_param_gather=false",
    )  # fmt: skip
    res = simulate(scn, hardware(gpus_per_node=2))
    # each GPU moves half of a bucket's fp32 gradients (params) over 100 GB/s NVLink
    r = a = LAYER_PARAMS * 4 / 2 / 100e9
    assert r < B  # layer 1's bucket hides under layer 0's backward
    exposed = (r if overlap else 2 * r) + 2 * a
    assert res.step_time_s == pytest.approx(2 * (F + B) + exposed, rel=1e-9)
    assert res.step_breakdown_s["mean"]["exposed_dp"] == pytest.approx(exposed, rel=1e-9)
    # durations summed: overlapped, a bucket's router + norm (128 params) and expert gradients
    # share the link, so their 256 B end at twice their time alone and the
    # experts' at r; one after the other (blocking) they take r together
    router = 128 * 4 / 2 / 100e9
    sync = 2 * r + 2 * a + (2 * 2 * router if overlap else 0.0)
    assert res.phases_s["grad_sync"] == pytest.approx(sync, rel=1e-9)
    assert res.bytes_per_gpu["by_kind"]["dp"]["scaleup"] == pytest.approx(
        2 * LAYER_PARAMS * 4 / 2 * 2
    )


def test_bf16_reduce_halves_the_gradient_bytes() -> None:
    base = ("cluster.gpus_per_node=2", "parallel.ep=1", "parallel.dp=2", "workload.mode=training",
            "training.overlap_param_gather=false", "model.dtype=bf16")  # fmt: skip
    fp32 = simulate(scenario(*base), hardware(gpus_per_node=2))
    bf16 = simulate(scenario(*base, "training.grad_reduce_dtype=bf16"), hardware(gpus_per_node=2))
    g32 = fp32.bytes_per_gpu["by_kind"]["dp"]["scaleup"]
    g16 = bf16.bytes_per_gpu["by_kind"]["dp"]["scaleup"]
    # the fp32 reduce-scatter moves twice the bf16 all-gather's bytes; in bf16 both are equal
    assert g16 == pytest.approx(g32 * 2 / 3)


def test_comm_sms_slow_the_compute_that_overlaps_a_bucket() -> None:
    extra = ("cluster.gpus_per_node=2", "parallel.ep=1", "parallel.dp=2", "model.num_moe_layers=2",
             "model.num_experts=1", "workload.mode=training", "training.overlap_param_gather=false",
             f"training.bucket_size_params={LAYER_PARAMS}")  # fmt: skip
    hw = hardware(gpus_per_node=2)
    free = simulate(scenario(*extra), hw, trace=True)
    taxed = simulate(scenario(*extra, "training.comm_sm_fraction=0.2"), hw, trace=True)
    # layer 0's backward ops start while layer 1's bucket reduce-scatter runs: the first
    # (unpermute) of them is slowed; the later ones start after the bucket is done
    assert taxed.details["comm_sm_slowdown_s"] > 0
    assert taxed.step_time_s > free.step_time_s
    marked = {e["name"] for e in taxed.trace_events if "[SMs shared]" in e.get("name", "")}
    assert marked and all(n.endswith("_bwd [SMs shared]") for n in marked)


@pytest.mark.parametrize(
    ("sched", "p", "m", "field"),
    [
        ("dualpipe", 3, 6, "parallel.pp"),  # odd number of ranks
        ("dualpipe", 4, 6, "workload.micro_batches"),  # fewer than 2p micro-batches
        ("dualpipev", 4, 7, "workload.micro_batches"),
        ("interleaved", 4, 6, "workload.micro_batches"),  # not a multiple of p
    ],
)
def test_a_schedule_that_cannot_run_the_layout_says_why(sched, p, m, field) -> None:
    with pytest.raises(ConfigError) as err:
        build_pipeline(sched, p, 2 if sched == "interleaved" else 1, m, True)
    assert err.value.field == field and "use" in str(err.value)


def test_layers_that_do_not_split_over_the_stages_are_rejected() -> None:
    with pytest.raises(ConfigError, match=re.escape("split over 4 virtual stages (pp=2 x vpp=2)")):
        simulate(_scn(2, 4, "interleaved", v=2, layers=6), hardware(gpus_per_node=2))
    # uneven stages: the first holds one layer, the five others do not split over three
    with pytest.raises(ConfigError, match="pp_first_stage_layers"):
        simulate(_scn(4, 4, "1f1b", "parallel.pp_first_stage_layers=1", layers=6),
                 hardware(gpus_per_node=4))  # fmt: skip
    # 1 + 3 + 3 + 3 = 10 layers split
    res = simulate(_scn(4, 4, "1f1b", "parallel.pp_first_stage_layers=1", layers=10),
                   hardware(FREE_SENDS, gpus_per_node=4))  # fmt: skip
    F, B, _ = _passes()
    # the longest stage (3 layers) sets the pace: 1F1B of 4 micro-batches over stages 1,3,3,3
    assert res.step_time_s > 4 * 3 * (F + B)


def test_every_rank_runs_every_task_once() -> None:
    for sched, p, m, v in [(s, p, m, v) for s, p, m, v, _ in BUBBLES]:
        pipe = build_pipeline(sched, p, v, m, True)
        tasks = [t for slots in pipe.slots for slot in slots for lane in slot for t in lane]
        kinds = np.array([t[0] for t in tasks])
        assert len(tasks) == len(set(tasks))
        assert (kinds == "F").sum() == m * pipe.stages
        assert ((kinds == "B") | (kinds == "Bi")).sum() == m * pipe.stages
        assert (kinds == "W").sum() == (kinds == "Bi").sum()


def test_traffic_matrix_and_link_utilisation_by_hand(tmp_path) -> None:
    """Every token to expert 0 (GPU 0): GPU 1 sends its 8 rows; prefill, one layer."""
    np.save(tmp_path / "ids.npy", np.zeros((16, 1), dtype=np.int64))
    scn = scenario(
        "workload.routing.distribution=trace", f"workload.routing.trace={tmp_path / 'ids.npy'}"
    )
    res = simulate(scn, hardware(), traffic=True)
    t = res.traffic
    assert t is not None and t["dispatch_gpus"] == [0, 1]
    assert t["dispatch_bytes"] == [[8 * ROW_BYTES, 0.0], [8 * ROW_BYTES, 0.0]]
    # NVLink out of GPU 1: the dispatch rows; out of GPU 0: the combine sends them back
    # (the split-size exchange before the dispatch is priced as a delay, not on links)
    step = res.step_time_s
    su_out = t["link_utilization"]["su_out"][0]
    assert su_out[1] == pytest.approx(8 * ROW_BYTES / (100e9 * step), rel=1e-9)
    assert su_out[0] == pytest.approx(8 * ROW_BYTES / (100e9 * step), rel=1e-9)
    assert t["link_utilization_max"]["nic_out"] == 0.0


def test_simulate_cli_writes_traffic_json_and_heatmaps(tmp_path) -> None:
    from moesim.cli import main

    out = tmp_path / "traffic"
    assert main(["simulate", "scenarios/tiny-cpu.yaml", "--traffic", str(out), "--json"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "traffic.json", "dispatch_matrix.png", "link_utilization.png",
    }  # fmt: skip


def test_dualpipe_pairs_hide_one_micro_batch_all_to_all_under_the_other() -> None:
    """Same layout and work, EP over two NIC-linked GPUs: pairing F and B hides a2a."""
    base = ("cluster.nodes=4", "cluster.gpus_per_node=1", "parallel.ep=2", "parallel.pp=2",
            "model.num_moe_layers=4", "workload.mode=training", "workload.micro_batches=8",
            "workload.tokens_per_gpu=64")  # fmt: skip
    hw = hardware(gpus_per_node=1)
    serial = simulate(scenario(*base, "parallel.pp_schedule=zb_h1"), hw)
    paired = simulate(scenario(*base, "parallel.pp_schedule=dualpipev",
                               "model.num_moe_layers=8"), hw)  # fmt: skip
    # per micro-batch and layer, the same all-to-alls; paired, less of them is exposed
    ep_s = serial.step_breakdown_s["mean"]["exposed_ep"] / 4
    ep_p = paired.step_breakdown_s["mean"]["exposed_ep"] / 8
    assert ep_p < 0.8 * ep_s


def test_a_measured_all_reduce_prices_a_dp_group_inside_a_node() -> None:
    """dp=2 on one node, no distributed optimizer: each bucket part's all-reduce takes the
    measured fit's ``latency + buffer / bandwidth``; across two nodes the fit (measured
    inside a node) does not apply and the links price it."""
    extra = ("parallel.ep=1", "parallel.dp=2", "model.num_moe_layers=1", "model.num_experts=1",
             "workload.mode=training", "workload.micro_batches=1",
             "workload.optimizer_bytes_per_param=0", "training.distributed_optimizer=false",
             "training.overlap_grad_reduce=false")  # fmt: skip
    fits = {"all_reduce__2": (50.0, 1.0)}
    res = simulate(scenario("cluster.gpus_per_node=2", *extra),
                   with_collectives(hardware(gpus_per_node=2), **fits))  # fmt: skip
    dense, expert = (LAYER_PARAMS - 3 * 64 * 128) * 4, 3 * 64 * 128 * 4  # fp32 buffers
    sync = 2 * 50e-6 + (dense + expert) / 1e9
    assert res.phases_s["grad_sync"] == pytest.approx(sync, rel=1e-9)
    assert res.step_breakdown_s["mean"]["exposed_dp"] == pytest.approx(sync, rel=1e-9)
    # the bytes on the links are the ring's (2 (g-1)/g of the buffer), not the fit's
    assert res.bytes_per_gpu["by_kind"]["dp"]["scaleup"] == pytest.approx(dense + expert)
    two_nodes = ("cluster.nodes=2", "cluster.gpus_per_node=1", *extra)
    spec = simulate(scenario(*two_nodes), hardware(gpus_per_node=1))
    fitted = simulate(scenario(*two_nodes), with_collectives(hardware(gpus_per_node=1), **fits))
    assert fitted.phases_s["grad_sync"] == pytest.approx(spec.phases_s["grad_sync"], rel=1e-9)
    assert fitted.phases_s["grad_sync"] != pytest.approx(sync, rel=1e-3)


def test_tied_embeddings_all_reduce_between_the_first_and_last_stage() -> None:
    """pp 2 (1F1B), dp 1, tied embeddings of 512 x 64: after the step the two stages
    all-reduce the table's fp32 gradient, ``50 us + 512 x 64 x 4 B / 1 GB/s`` by the
    measured fit. Rank 1 finishes first and waits for rank 0 (bubble, as without the
    embedding); the all-reduce is exposed on both and adds its time to the step.
    DualPipeV holds both ends on one rank: nothing to exchange."""
    tied = ("model.vocab_size=512", "model.tie_word_embeddings=true")
    hw = with_collectives(hardware(FREE_SENDS, gpus_per_node=2), all_reduce__2=(50.0, 1.0))
    base = simulate(_scn(2, 2, "1f1b", "model.vocab_size=512"), hw)
    res = simulate(_scn(2, 2, "1f1b", *tied), hw)
    ar = 50e-6 + 512 * 64 * 4 / 1e9
    assert res.step_time_s == pytest.approx(base.step_time_s + ar, rel=1e-9)
    assert res.phases_s["grad_sync"] == pytest.approx(ar, rel=1e-9)
    for which in ("mean", "critical_gpu"):
        got, was = res.step_breakdown_s[which], base.step_breakdown_s[which]
        assert got["exposed_dp"] == pytest.approx(ar, rel=1e-9)
        assert got["bubble"] == pytest.approx(was["bubble"], rel=1e-9)
    # a ring of two: each GPU sends half the table twice
    assert res.bytes_per_gpu["by_kind"]["dp"]["scaleup"] == pytest.approx(512 * 64 * 4)
    v_base = simulate(_scn(2, 4, "dualpipev", "model.vocab_size=512"), hw)
    v_tied = simulate(_scn(2, 4, "dualpipev", *tied), hw)
    assert v_tied.step_time_s == pytest.approx(v_base.step_time_s, rel=1e-12)
    assert v_tied.step_breakdown_s["mean"]["exposed_dp"] == 0.0
