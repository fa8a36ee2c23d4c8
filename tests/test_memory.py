"""Per-GPU memory: closed forms (Megatron-Core optimizer table, Korthikanti et al.
activations, DeepEP buffers, pipeline in-flight counts) and hand-computed loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sim_builders import hardware, scenario

from moesim.config.scenario import MemoryConfig
from moesim.simulate import simulate
from moesim.simulate.memory import (
    GiB,
    attention_bytes,
    deepep_low_latency_bytes,
    ffn_bytes,
    inflight_micro_batches,
    korthikanti_layer_bytes,
    kv_cache_bytes,
    recv_bound_rows,
    stage_layers,
    state_bytes_per_param,
)

# Megatron-Core docs (distributed optimizer): bytes per parameter, non-distributed and
# distributed over d data-parallel ranks, for (param dtype, grad dtype)
MEGATRON_TABLE = [
    ("fp16", "fp16", 20.0, lambda d: 4 + 16 / d),
    ("bf16", "fp32", 18.0, lambda d: 6 + 12 / d),
    ("fp32", "fp32", 16.0, lambda d: 8 + 8 / d),
]


@pytest.mark.parametrize(("param", "grad", "plain", "dist"), MEGATRON_TABLE)
@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_bytes_per_parameter_match_megatron_table(param, grad, plain, dist, d) -> None:
    mem = MemoryConfig(param_dtype=param, grad_dtype=grad)
    assert sum(state_bytes_per_param(mem, "bf16", d, distributed=False)) == plain
    assert sum(state_bytes_per_param(mem, "bf16", d)) == pytest.approx(dist(d), rel=1e-12)


def test_sgd_keeps_one_moment() -> None:
    mem = MemoryConfig(param_dtype="fp32", optimizer="sgd")
    assert state_bytes_per_param(mem, "fp32", 4, distributed=False) == (4.0, 4.0, 4.0)


def _training(*extra: str):
    # 1 MoE layer, E = 4 experts of D = 64, F = 128 on ep = 2 over 4 GPUs (edp 2, dp 4), fp32
    return scenario("cluster.gpus_per_node=4", "workload.mode=training", *extra)


def test_expert_and_non_expert_state_shard_over_their_own_groups() -> None:
    res = simulate(_training(), hardware(gpus_per_node=4))
    parts = res.memory["parts_GiB"]
    expert = 2 * 3 * 64 * 128  # E/ep = 2 local experts of 3 D x F matrices
    other = 64 * 4 + 2 * 64  # the router and the layer's two norms (no attention, no shared)
    assert parts["params"] * GiB == pytest.approx(4 * (expert + other))  # fp32 params
    assert parts["grads"] * GiB == pytest.approx(4 * (expert + other))  # fp32 grads
    # Adam moments (no master copy of fp32 weights): experts over dp = 2, the rest over dp*ep = 4
    assert parts["optimizer"] * GiB == pytest.approx(8 * expert / 2 + 8 * other / 4)
    whole = simulate(_training("training.distributed_optimizer=false"), hardware(gpus_per_node=4))
    assert whole.memory["parts_GiB"]["optimizer"] * GiB == pytest.approx(8 * (expert + other))


def test_dualpipe_holds_two_stages_of_parameters() -> None:
    base = ("parallel.pp=2", "workload.micro_batches=4", "model.num_moe_layers=2")
    hw = hardware(gpus_per_node=4)
    one = simulate(_training(*base), hw).memory
    two = simulate(_training(*base, "parallel.pp_schedule=dualpipe"), hw).memory
    assert two["inflight_micro_batches"] == [3.0, 3.0]  # PP + 1
    assert two["parts_GiB"]["params"] == pytest.approx(2 * one["parts_GiB"]["params"])


@pytest.mark.parametrize(
    ("schedule", "pp", "vpp", "mbs", "layers"),
    [("1f1b", 4, 1, 8, 4), ("1f1b", 4, 1, 2, 4), ("zb_h1", 4, 1, 8, 4),
     ("interleaved", 4, 2, 8, 8), ("dualpipe", 4, 1, 8, 8)],
)  # fmt: skip
def test_walking_issue_12_schedules_gives_the_closed_forms(schedule, pp, vpp, mbs, layers) -> None:
    """Megatron / Korthikanti (1F1B, interleaved), ZB-H1 and the DeepSeek-V3 report (PP + 1)."""
    scn = scenario(
        "workload.mode=training", f"parallel.pp={pp}", "parallel.ep=1", "cluster.gpus_per_node=4",
        f"parallel.pp_schedule={schedule}", f"parallel.vpp={vpp}", f"workload.micro_batches={mbs}",
        f"model.num_moe_layers={layers}",
    )  # fmt: skip
    walked = simulate(scn, hardware(gpus_per_node=4)).memory["inflight_micro_batches"]
    assert walked == inflight_micro_batches(schedule, pp, vpp, mbs).tolist()


# -- Korthikanti et al. 2022, eq. (1)-(5): bytes per layer --------------------------
SHAPES = [(2048, 1, 4096, 32, 1), (2048, 4, 12288, 96, 8), (4096, 2, 7168, 64, 4)]


@pytest.mark.parametrize(("s", "b", "h", "a", "t"), SHAPES)
def test_activations_per_layer_match_korthikanti(s, b, h, a, t) -> None:
    sbh = s * b * h
    full = sbh * (34 + 5 * a * s / h) / t  # tensor + sequence parallel
    assert korthikanti_layer_bytes(s, b, h, a, tp=t) == pytest.approx(full, rel=1e-12)
    selective = sbh * 34 / t
    assert korthikanti_layer_bytes(s, b, h, a, tp=t, selective=True) == pytest.approx(selective)
    no_sp = sbh * (10 + 24 / t + 5 * a * s / (h * t))  # tensor parallel only
    assert korthikanti_layer_bytes(s, b, h, a, tp=t, sp=False) == pytest.approx(no_sp)


def test_attention_and_mlp_parts_separately() -> None:
    s, b, h, a = 1024, 2, 1024, 16
    sbh = s * b * h
    attn = attention_bytes(s * b, h, a, a, h // a, s)
    assert attn == pytest.approx(11 * sbh + 5 * a * s * s * b + 4 * sbh)  # + the two norms
    assert ffn_bytes(s * b, h, 4 * h) == pytest.approx(19 * sbh)


def test_full_recompute_keeps_each_layers_input() -> None:
    hw, four = hardware(gpus_per_node=4), "model.num_moe_layers=4"
    base = simulate(_training("workload.recompute_granularity=selective", four), hw).memory
    full = simulate(_training("workload.recompute_granularity=full", four), hw).memory
    # 4 layer inputs of T x D fp32; the MoE parts of one layer at a time, rebuilt in backward
    assert full["parts_GiB"]["activations"] * GiB == pytest.approx(4 * 8 * 64 * 4)
    assert full["parts_GiB"]["moe_tokens"] < base["parts_GiB"]["moe_tokens"] / 3
    assert full["peak_GiB"] < base["peak_GiB"]


# -- pipeline schedules --------------------------------------------------------------
def test_micro_batches_in_flight_per_schedule() -> None:
    assert inflight_micro_batches("1f1b", 4, 1, 8).tolist() == [4, 3, 2, 1]
    assert inflight_micro_batches("1f1b", 4, 1, 2).tolist() == [2, 2, 2, 1]
    assert inflight_micro_batches("zb_h1", 4, 1, 8).tolist() == [4, 4, 4, 4]
    assert inflight_micro_batches("dualpipe", 4, 1, 8).tolist() == [5] * 4  # PP + 1
    # interleaved, first stage: p (1 + (p - 1) / (p v)) stage-micro-batches (Korthikanti 4.2.3)
    p, v = 4, 2
    assert inflight_micro_batches("interleaved", p, v, 16)[0] == pytest.approx(
        p * (1 + (p - 1) / (p * v))
    )
    assert inflight_micro_batches("1f1b", 1, 1, 8).tolist() == [1]


def test_pipeline_stages_split_the_layer_stack() -> None:
    scn = scenario(
        "model.num_moe_layers=5", "model.dense={num_attention_heads: 1, num_key_value_heads: 1, "
        "head_dim: 64, seq_length: 8, num_dense_layers: 1}", "parallel.pp=3",
        "cluster.gpus_per_node=6",
    )  # fmt: skip
    assert stage_layers(scn) == [(1, 1), (0, 2), (0, 2)]  # issue 12's even split


def test_first_1f1b_stage_holds_p_micro_batches() -> None:
    pp = scenario(
        "cluster.gpus_per_node=4", "parallel.pp=2", "workload.mode=training",
        "workload.micro_batches=4", "model.num_moe_layers=2",
    )  # fmt: skip
    res = simulate(pp, hardware(gpus_per_node=4))
    assert res.memory["inflight_micro_batches"] == [2.0, 1.0]
    assert res.memory["peak_stage"] == 0


# -- MoE buffers from the loads ------------------------------------------------------
def _hot(tmp_path: Path, *extra: str):
    """8 tokens on each of 2 GPUs (ep 2, 4 experts, k 1): 7 to expert 0, 1 to expert 3."""
    ids = np.array([[0]] * 7 + [[3]], dtype=np.int64)
    np.save(tmp_path / "ids.npy", np.concatenate([ids, ids]))
    return scenario(
        "workload.routing.distribution=trace", f"workload.routing.trace={tmp_path / 'ids.npy'}",
        "workload.mode=training", *extra,
    )  # fmt: skip


def test_receive_buffer_follows_hand_computed_loads(tmp_path: Path) -> None:
    res = simulate(_hot(tmp_path), hardware())
    m = res.memory
    # GPU 0 (experts 0, 1) receives 7 rows from each source, GPU 1 (experts 2, 3) 1 from each
    assert m["recv_rows_peak"] == 14 and m["recv_rows_mean"] == 8 and m["peak_gpu"] == 0
    D, F, b = 64, 128, 4
    # saved rows on GPU 0: 14 received + its own 8 returned; intermediates 14 * 3F + T E fp32
    assert m["parts_GiB"]["moe_tokens"] * GiB == pytest.approx((14 + 8) * D * b)
    assert m["parts_GiB"]["moe_expert_act"] * GiB == pytest.approx(14 * 3 * F * b + 8 * 4 * 4)
    assert m["parts_GiB"]["transient"] * GiB == pytest.approx(14 * (D + F) * b)
    assert m["parts_GiB"]["dispatcher"] * GiB == pytest.approx(8 * D * b)  # its send buffer
    per_gpu = np.array(m["per_gpu_GiB"]) * GiB
    assert per_gpu[0] - per_gpu[1] == pytest.approx(12 * D * b + 12 * 3 * F * b + 12 * (D + F) * b)


def test_capacity_factor_bounds_the_receive_buffer(tmp_path: Path) -> None:
    dropless = simulate(_hot(tmp_path), hardware()).memory
    capped = simulate(_hot(tmp_path, "router.capacity_factor=1.0"), hardware()).memory
    assert dropless["recv_rows_bound"] == 2 * 8 * 1  # ep * T * min(k, E/ep)
    # capacity ceil(8 * 1 / 4) = 2 per expert per source: GPU 0 gets 2 of expert 0 from each
    assert capped["recv_rows_bound"] == 2 * 2 * 2 and capped["recv_rows_peak"] == 4
    assert capped["peak_GiB"] < dropless["peak_GiB"]


def test_recv_bound_of_sequence_capacity_domains() -> None:
    scn = scenario(
        "router.capacity_factor=1.0", "router.capacity_per=sequence", "router.sequence_length=4"
    )
    # two sequences of 4 tokens per GPU, capacity ceil(4 / 4) = 1 per expert each
    assert recv_bound_rows(scn) == (2 * 2 * 2.0, "capacity factor")


def test_deepep_low_latency_buffer_by_hand() -> None:
    T, h, E = 128, 7168, 256
    disp, comb = 16 + 2 * h, 2 * h  # bf16 message beats fp8 + scales
    expected = 2 * (E * T * comb + E * T * disp + E * 4)
    assert deepep_low_latency_bytes(T, h, E) == expected
    scn = scenario("dispatcher=low_latency")
    res = simulate(scn, hardware())
    assert res.memory["parts_GiB"]["dispatcher"] * GiB == deepep_low_latency_bytes(8, 64, 4)


def test_kv_cache_for_decode() -> None:
    scn = scenario(
        "workload.mode=decode", "workload.tokens_per_gpu=4", "workload.micro_batches=2",
        "model.dense={num_attention_heads: 8, num_key_value_heads: 2, head_dim: 16, "
        "seq_length: 1024}", "model.dtype=bf16",
    )  # fmt: skip
    # 4 sequences x 2 micro-batches x 1024 tokens x K and V x 2 heads x 16 x 2 bytes, per layer
    assert kv_cache_bytes(scn, 3) == 3 * 8 * 1024 * 2 * 2 * 16 * 2
    res = simulate(scn, hardware())
    assert res.memory["parts_GiB"]["kv_cache"] * GiB == kv_cache_bytes(scn, 1)
    assert res.memory["parts_GiB"]["grads"] == 0 and res.memory["parts_GiB"]["optimizer"] == 0


def test_fits_against_hbm_and_reserve() -> None:
    res = simulate(_training(), hardware(gpus_per_node=4))
    assert res.fits and res.to_dict()["fits"] is True
    peak = res.memory["peak_GiB"]
    hw = hardware(gpus_per_node=4)
    tight = simulate(_training(f"memory.reserve_GiB={80 - 2 * peak}"), hw)
    assert tight.memory["parts_GiB"]["reserve"] == pytest.approx(80 - 2 * peak)
    assert tight.fits and tight.memory["headroom_GiB"] == pytest.approx(peak)
    over = simulate(_training(f"memory.reserve_GiB={80 - peak / 2}"), hw)
    assert not over.fits and over.memory["headroom_GiB"] == pytest.approx(-peak / 2)


# -- the real layer: measured peak vs predicted -----------------------------------------
def test_real_layer_peak_memory_within_15_percent_of_the_prediction() -> None:
    from moesim.validation.memory import tiny_cases, validate_memory

    report = validate_memory(tiny_cases()).to_dict()
    for row in report["cases"]:
        assert row["measured_bytes"] > 0 and row["events"] > 0
        assert row["predicted_rows"] == row["kept_rows"]  # the same routing as the layer
        assert abs(row["error"]) <= 0.15, row["label"]
    dropless, capped = report["cases"]
    assert capped["kept_rows"] < dropless["kept_rows"]
    assert capped["measured_bytes"] < dropless["measured_bytes"]


def test_validate_memory_flag_prints_json(tmp_path: Path, capsys) -> None:
    import json

    from moesim.cli import main

    assert main(["validate", "--memory", "--tiny", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"cases", "median_abs_error", "max_abs_error", "tolerance", "method"}
    assert len(list(tmp_path.glob("memory-*.json"))) == 1


# -- feasibility in compare and sweep ----------------------------------------------------
TINY = "scenarios/tiny-cpu.yaml"


def test_compare_marks_and_drops_variants_that_do_not_fit(capsys) -> None:
    import json

    from moesim.cli import main

    argv = ["compare", TINY, "--vary", "memory.reserve_GiB=0,100"]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["fits"] for v in doc["variants"]] == [True, False]
    assert [v["p_oom"] for v in doc["variants"]] == [0.0, 1.0]
    assert main([*argv, "--json", "--feasible-only"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [v["variant"] for v in doc["variants"]] == [{"memory.reserve_GiB": 0}]
    assert doc["infeasible_dropped"] == ["reserve_GiB=100"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "fits" in table and "yes" in table and "NO" in table and "peak mem." in table


def test_probability_of_oom_over_seeds_and_ranking() -> None:
    from moesim.explore.summary import VariantSummary, feasible
    from moesim.explore.variants import Variant

    def runs(*fits: bool) -> list[dict]:
        return [{"seed": i, "result": {"fits": f}} for i, f in enumerate(fits)]

    some = VariantSummary(Variant(0, {}), runs(True, False, True, False, True), {})
    none = VariantSummary(Variant(1, {}), runs(True, True), {})
    assert some.p_oom == pytest.approx(0.4) and not some.fits
    assert none.p_oom == 0.0 and none.fits
    assert feasible([some, none]) == ([none], [some])


def test_sweep_feasible_only_drops_rows(tmp_path: Path, capsys) -> None:
    from moesim.cli import main

    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"scenario: {Path(TINY).resolve()}\naxes:\n  memory.reserve_GiB: [0, 100]\n", "utf-8"
    )
    argv = ["sweep", str(sweep), "--out", str(tmp_path / "out"), "--no-plots"]
    assert main([*argv, "--feasible-only"]) == 0
    out = capsys.readouterr().out
    assert "1 that do not fit dropped" in out
    import pandas as pd

    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["fits"].tolist() == [True, False]
    assert summary["oom"].tolist() == [0.0, 1.0] and "memory_peak_GiB" in summary


# -- issue 13's parameter counts, recompute modules, MLA ------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _dsv3(*extra: str):
    from moesim.config.loader import load_pair

    return load_pair(REPO / "scenarios/deepseek-v3-256xh800.yaml", list(extra))


def test_stage_parameters_are_issue_13_counts_per_rank() -> None:
    from moesim.model import count_params, params_per_rank
    from moesim.simulate.memory import stage_params

    scn, _ = _dsv3("parallel.pp=1")
    got = stage_params(scn, 0, *stage_layers(scn)[0])
    want = params_per_rank(scn)
    assert got.expert == pytest.approx(want.expert, rel=1e-12)
    assert got.other == pytest.approx(want.non_expert + want.embedding, rel=1e-12)
    scn, _ = _dsv3("parallel.pp=4", "model.vocab_size=129280", "model.mtp_num_layers=1")
    c, stages = count_params(scn.model), stage_layers(scn)
    per = [stage_params(scn, s, *layers) for s, layers in enumerate(stages)]
    mtp_experts = c.experts / scn.model.num_moe_layers  # one MTP module's routed experts
    assert sum(p.expert for p in per) * scn.parallel.ep == pytest.approx(c.experts + mtp_experts)
    assert sum(p.other for p in per) == pytest.approx(c.with_mtp - c.experts - mtp_experts)
    assert per[0].other > per[1].other  # the embedding on the first stage
    # tied: the last stage holds its own copy of the table, as many parameters as the
    # untied LM head (V x D); without the copy it would hold V x D fewer
    tied = scn.model_copy(update={"model": scn.model.model_copy(
        update={"tie_word_embeddings": True})})  # fmt: skip
    t_first, t_last = stage_params(tied, 0, *stages[0]), stage_params(tied, 3, *stages[3])
    assert t_first.other == pytest.approx(per[0].other)
    assert t_last.other == pytest.approx(per[3].other)


def test_moe_act_and_full_recompute_shrink_the_expert_intermediates(tmp_path: Path) -> None:
    base = simulate(_hot(tmp_path), hardware()).memory["parts_GiB"]
    act = simulate(
        _hot(tmp_path, "workload.recompute_granularity=selective",
             "workload.recompute_modules=[moe_act]"), hardware(),
    ).memory["parts_GiB"]  # fmt: skip
    F, b = 128, 4
    # GPU 0 runs 14 rows: 3F per row fused, 2F (fc1's output only) with moe_act recompute
    assert (base["moe_expert_act"] - act["moe_expert_act"]) * GiB == pytest.approx(14 * F * b)


def test_mla_kv_cache_is_the_compressed_latent() -> None:
    mla = (
        "model.dense={num_attention_heads: 128, num_key_value_heads: 128, head_dim: 192, "
        "seq_length: 4096, num_dense_layers: 3, dense_intermediate_size: 18432, attention: mla, "
        "q_lora_rank: 1536, kv_lora_rank: 512, qk_nope_head_dim: 128, qk_rope_head_dim: 64, "
        "v_head_dim: 128}"
    )
    scn, _ = _dsv3(
        "workload.mode=decode", "workload.tokens_per_gpu=32", "workload.micro_batches=1", mla
    )
    d = scn.model.dense
    assert d is not None and d.kind == "mla"
    width = d.kv_lora_rank + d.qk_rope_head_dim  # 512 + 64
    assert kv_cache_bytes(scn, 1) == 32 * d.seq_length * width * 2


# -- shipped scenarios -----------------------------------------------------------------------
DOES_NOT_FIT = {"mixtral-8x7b-8xh100"}  # kept as the example of a layout that does not fit


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(p.stem, marks=pytest.mark.slow) if "2048" in p.stem else p.stem
        for p in sorted((REPO / "scenarios").glob("*.yaml"))
    ],
)
def test_shipped_scenarios_fit_unless_marked(name: str) -> None:
    from moesim.config.loader import load_pair

    scn, hw = load_pair(REPO / "scenarios" / f"{name}.yaml", [])
    res = simulate(scn, hw)
    assert res.fits == (name not in DOES_NOT_FIT), res.memory["peak_GiB"]


def test_deepseek_v3_layouts_on_256_gpus_fit_only_with_pp4_and_full_recompute() -> None:
    def fits(pp: int, recompute: str) -> bool:
        scn, hw = _dsv3(f"parallel.pp={pp}", f"workload.recompute_granularity={recompute}")
        return simulate(scn, hw).fits

    assert not fits(1, "full") and not fits(2, "full") and not fits(4, "none")
    assert fits(4, "full")


@pytest.mark.gpu
def test_real_layer_peak_on_cuda_from_the_allocator_statistics() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from moesim.validation.memory import tiny_cases, validate_memory

    report = validate_memory(tiny_cases(), device="cuda").to_dict()
    for row in report["cases"]:
        assert row["predicted_rows"] == row["kept_rows"]
        assert abs(row["error"]) <= 0.15, row["label"]
