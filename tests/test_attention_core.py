"""Measured attention core: the importer, the fit, the profile and the simulator's use of it.

B = sequences, S = sequence length, H = query heads, hd = head dim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim import api
from moesim.calibrate import gpu
from moesim.calibrate.gpu_forms import ATTN_KNOTS_PER_DECADE, _log_knots, fit_attention
from moesim.config.hardware import AttentionFit, Calibration, CalibrationSource
from moesim.config.loader import load_hardware
from moesim.costs import CostModel, tables, work
from moesim.measure.results import frame_from_columns
from moesim.model import ops
from moesim.simulate.dense import dense_costs
from moesim.simulate.program import with_core_backward
from moesim.simulate.ranges import out_of_range

SCN = Path(__file__).resolve().parents[1] / "scenarios"
SRC = CalibrationSource(results=["synthetic"], device="synthetic", created="test")
HAVE_TABLES = __import__("importlib").util.find_spec("aiconfigurator_core") is not None
needs_tables = pytest.mark.skipif(not HAVE_TABLES, reason="aiconfigurator-core not installed")

# a grid of calls like the collector's: B x S x (H, KV, hd) shapes
B_GRID = [1, 4, 16, 64]
S_GRID = [16, 64, 256, 1024, 4096, 16384]
SHAPES = [(8, 8, 64), (16, 4, 64), (32, 8, 128), (8, 1, 128), (64, 8, 128), (24, 24, 128)]


def _calls() -> pd.DataFrame:
    rows = [
        (b, s, h, kv, hd) for b in B_GRID for s in S_GRID for h, kv, hd in SHAPES if b * s <= 65536
    ]
    return pd.DataFrame(rows, columns=["B", "S", "H", "KV", "hd"]).astype(float)


def _truth(c: pd.DataFrame) -> AttentionFit:
    """A fit on the knots :func:`fit_attention` places for ``c``, with log rate linear in
    log S and log tiles (no curvature: the smoothing penalty costs it nothing)."""
    ks = _log_knots(c["S"].to_numpy(), ATTN_KNOTS_PER_DECADE)
    kt = _log_knots(work.attention_tiles(c["B"], c["S"], c["H"]), ATTN_KNOTS_PER_DECADE)
    kh = np.unique(c["hd"].to_numpy())
    grid = [float(500.0 * (s / ks[-1]) ** 0.3 * (h / 128.0) ** 0.2) for s in ks for h in kh]
    occ = [float((t / kt[-1]) ** 0.15) for t in kt]
    return AttentionFit(
        latency_us=8.0,
        bytes_ps=0.3,
        seq=list(ks),
        head_dim=list(kh),
        tflops=grid,
        tiles=list(kt),
        occupancy=occ,
    )


def _seconds(fit: AttentionFit, c: pd.DataFrame) -> np.ndarray:
    return tables.attention_s(fit, c["B"], c["S"], c["H"], c["KV"], c["hd"], c["hd"])


def test_fit_recovers_known_latency_bytes_and_rates() -> None:
    c = _calls()
    truth = _truth(c)
    t = _seconds(truth, c)
    got = fit_attention(*(c[k].to_numpy() for k in ("B", "S", "H", "KV", "hd", "hd")), t, 0.03)
    assert got.latency_us == pytest.approx(truth.latency_us, rel=0.02)
    assert got.bytes_ps == pytest.approx(truth.bytes_ps, rel=0.02)
    assert got.seq == truth.seq and got.tiles == truth.tiles
    assert np.allclose(got.tflops, truth.tflops, rtol=0.01)
    assert np.allclose(got.occupancy, truth.occupancy, rtol=0.01)


def _attention_rows(c: pd.DataFrame, t: np.ndarray) -> pd.DataFrame:
    """``c`` as imported results rows (:mod:`moesim.gpudata.aiconfigurator`'s mapping)."""
    df = pd.DataFrame(
        {
            "suite": "attention",
            "op": "context",
            "split": "causal",
            "dtype": "bf16",
            "strategy": "kv_bf16",
            "T": (c["B"] * c["S"]).astype(int),
            "F": c["S"].astype(int),
            "E": c["H"].astype(int),
            "K": c["KV"].astype(int),
            "D": c["hd"].astype(int),
            "median_s": t,
        }
    )
    return frame_from_columns(df)


def test_family_holds_out_whole_shapes_and_predicts_them() -> None:
    """Held out by (H, KV, hd), every B and S of a shape predicted by a fit that never saw
    it; the family's ranges record what was measured."""
    c = _calls()
    rows = _attention_rows(c, _seconds(_truth(c), c))
    fams = [f for f in gpu.families(rows) if f.name.startswith("attention.")]
    assert [f.name for f in fams] == ["attention.bf16"]
    sel = fams[0].rows(rows)
    folds = gpu.shape_folds(sel, fams[0].shape)
    for _, g in sel.assign(fold=folds).groupby(["E", "K", "D"]):
        assert g["fold"].nunique() == 1  # a shape is never split over folds
    fit = gpu.fit_all(rows, load_hardware("h200-sxm-spec"), SRC, workers=1)
    assert fit.errors["attention.bf16"].mape < 0.02
    assert fit.parts.ranges["attention.bf16"]["seq"] == [16.0, 16384.0]


def _profile(fits: dict[str, AttentionFit], ranges: dict[str, dict[str, list[float]]]) -> CostModel:
    hw = load_hardware("h100-sxm-spec")
    cal = Calibration(source=SRC, attention=fits, ranges=ranges)
    return CostModel(hw.model_copy(update={"calibration": cal}))


@pytest.mark.parametrize(("tp", "cp"), [(1, 1), (2, 1), (4, 2)])
def test_call_shape_carries_the_gpus_core_flops(tp: int, cp: int) -> None:
    """The kernel call a GPU runs, times its share, is its T tokens' core FLOPs."""
    m = api.load_scenario(SCN / "mixtral-8x7b-8xh100.yaml").model
    call = ops.attention_call(m, 4096.0, tp, cp)
    assert call is not None
    flops = work.attention_core_flops(call.batch, call.seq, call.heads, call.d_qk, call.d_v)
    want, _ = ops.attention_core(m, 4096.0, 2.0, causal=True)
    assert float(flops) * call.share == pytest.approx(want)


@pytest.mark.parametrize(
    ("name", "key"),
    [("mixtral-8x7b-8xh100.yaml", "bf16"), ("deepseek-v3-256xh800.yaml", "mla.bf16")],
)
def test_calibrated_profile_prices_the_core_from_the_fit(name: str, key: str) -> None:
    """GQA on the ``bf16`` fit, MLA on ``mla.bf16``: the core is the fit's time of the
    GPU's call; without the kind's fit it stays on the FLOPs."""
    scn = api.load_scenario(SCN / name)
    m, T, par = scn.model, scn.workload.tokens_per_gpu, scn.parallel
    fit = _truth(_calls())
    cost = _profile({key: fit}, {})
    call = ops.attention_call(m, T, par.tp, par.cp)
    assert call is not None and m.dense is not None and m.dense.num_sliding_layers == 0
    want = tables.attention_s(fit, *call[:6]) * call.share
    assert dense_costs(scn, cost)["attn_core"] == pytest.approx(float(want))
    other = "mla.bf16" if key == "bf16" else "bf16"
    flops_only = dense_costs(scn, _profile({other: fit}, {}))["attn_core"]
    assert flops_only == pytest.approx(
        dense_costs(scn, CostModel(load_hardware("h100-sxm-spec")))["attn_core"]
    )
    assert flops_only != pytest.approx(float(want))


def test_decode_keeps_the_core_on_its_bytes() -> None:
    """The tables measure the causal prefill kernel: a decode step's core is not priced
    from them."""
    scn = api.load_scenario(SCN / "mixtral-8x7b-8xh100.yaml", overrides=["workload.mode=decode"])
    fit = _truth(_calls())
    spec = dense_costs(scn, CostModel(load_hardware("h100-sxm-spec")))["attn_core"]
    assert dense_costs(scn, _profile({"bf16": fit}, {}))["attn_core"] == pytest.approx(spec)


def test_out_of_range_marks_a_sequence_beyond_the_measured_ones() -> None:
    scn = api.load_scenario(SCN / "mixtral-8x7b-8xh100.yaml")
    S = scn.model.dense.seq_length if scn.model.dense else 0
    ranges = {"attention.bf16": {"seq": [16.0, S / 4], "tokens": [16.0, 1e9]}}
    cost = _profile({"bf16": _truth(_calls())}, ranges)
    items = [o for o in out_of_range(scn, cost.hw) if o["family"] == "attention.bf16"]
    assert [(o["phase"], o["axis"]) for o in items] == [("dense", "seq")]
    assert items[0]["factor"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    ("part", "gemm", "want"), [("B", 2.0, 2 * 3 + 2.5), ("Bi", 1.0, 3 + 2.5), ("W", 1.0, 3.0)]
)
def test_core_backward_is_two_and_a_half_forwards_of_input_gradients(
    part: str, gemm: float, want: float
) -> None:
    """Projections 3 s and core 1 s forward: the core's 2.5x backward is all input
    gradients (B and Bi), the projections' weight gradients are W."""
    c = {"dense": 4.0, "attn_core": 1.0}
    assert with_core_backward(c, "dense", gemm, part) == pytest.approx(want)


def test_profile_round_trip(tmp_path: Path) -> None:
    from moesim.calibrate import write_profile

    fit = _truth(_calls())
    cost = _profile({"bf16": fit}, {"attention.bf16": {"seq": [16.0, 16384.0]}})
    out = write_profile(cost.hw.model_copy(update={"name": "rt"}), tmp_path / "rt.yaml")
    back = load_hardware(str(out))
    assert back.calibration is not None and back.calibration.attention == {"bf16": fit}
    a = cost.attention_s(8, 2048, 32, 8, 128, 128, "bf16")
    b = CostModel(back).attention_s(8, 2048, 32, 8, 128, 128, "bf16")
    assert a is not None and b is not None and float(a) == float(b)


@needs_tables
def test_import_real_attention_tables() -> None:
    """H200 context attention and MLA: ms -> s, the call's tokens and causal FLOPs,
    provenance; below the bf16 peak."""
    aic = pytest.importorskip("moesim.gpudata.aiconfigurator")

    def small(kind: str, raw: pd.DataFrame) -> pd.DataFrame:
        return raw[(raw["batch_size"] == 4) & (raw["isl"] == 4096)]

    imp = aic.import_system("h200_sxm", kinds=("attention", "mla"), subset=small)
    r = imp.rows
    raw = pd.read_parquet(aic.data_root() / imp.tables["attention"])
    one = raw[
        (raw.batch_size == 4) & (raw.isl == 4096) & (raw.num_heads == 32)
        & (raw.num_key_value_heads == 8) & (raw.head_dim == 128) & (raw.window_size == 0)
        & (raw.attn_dtype == "bfloat16") & (raw.kv_cache_dtype == "bfloat16")
    ].iloc[0]  # fmt: skip
    row = r[(r.op == "context") & (r.E == 32) & (r.K == 8) & (r.D == 128) & (r.split == "causal")]
    row = row[(row.dtype == "bf16") & (row.strategy == "kv_bf16")].iloc[0]
    assert row.median_s == one.latency * 1e-3 and row["T"] == 4 * 4096 and row.F == 4096
    assert row.flops == 4 * 32 * 4096**2 * 256 and 100 < row.achieved_TFLOPs < 989
    mla = r[r.op == "context_mla"]
    assert len(mla) and (mla.D == 192).all() and (mla.K == mla.E).all()
    assert set(r["suite"]) == {"attention"} and (r["table"] != "").all()
    assert {"causal", "causal_window128"} <= set(r["split"])


def test_missing_attention_column_is_named(tmp_path: Path) -> None:
    aic = pytest.importorskip("moesim.gpudata.aiconfigurator")
    from moesim.errors import UserError

    d = tmp_path / "x_sxm" / "attention" / "trtllm" / "1.0"
    d.mkdir(parents=True)
    bad = pd.DataFrame(
        {"framework": ["T"], "version": ["1"], "device": ["G"], "kernel_source": ["k"], "isl": [1]}
    )
    bad.to_parquet(d / "context_attention_perf.parquet")
    (tmp_path / "x_sxm" / "gemm" / "trtllm").mkdir(parents=True)
    with pytest.raises(UserError, match=r"context_attention_perf.parquet: column 'batch_size'"):
        aic.import_system("x_sxm", root=tmp_path, kinds=("attention",))
