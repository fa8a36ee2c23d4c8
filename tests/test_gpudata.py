"""Measured GPU tables: importer on the installed aiconfigurator tables, fits, profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moesim.calibrate import gpu
from moesim.cli import main
from moesim.config.hardware import Calibration, CalibrationSource, Curve, GemmFit
from moesim.config.loader import load_hardware
from moesim.costs import CostModel
from moesim.errors import UserError

aic = pytest.importorskip("moesim.gpudata.aiconfigurator")
HAVE_TABLES = __import__("importlib").util.find_spec("aiconfigurator_core") is not None
needs_tables = pytest.mark.skipif(not HAVE_TABLES, reason="aiconfigurator-core not installed")
SRC = CalibrationSource(results=["synthetic"], device="synthetic", created="test")


def _small(kind: str, raw: pd.DataFrame) -> pd.DataFrame:
    if kind == "gemm":
        return raw[raw["m"].isin([64, 4096]) & raw["n"].isin([4096]) & raw["k"].isin([4096])]
    if kind == "moe":
        return raw[(raw["hidden_size"] == 7168) & (raw["num_tokens"] == 512)]
    return raw


@needs_tables
def test_import_real_h200_tables_units_and_provenance() -> None:
    imp = aic.import_system("h200_sxm", "trtllm", subset=_small)
    r = imp.rows
    assert imp.device_name == "NVIDIA H200"
    assert {"gemm", "moe", "collective", "deepep_ll", "deepep_normal"} <= set(r["suite"])
    # nccl: 268435456 half elements all-reduced on 8 GPUs (message bytes = 2x elements)
    raw = pd.read_parquet(aic.data_root() / imp.tables["nccl"])
    one = raw[
        (raw.op_name == "all_reduce") & (raw.num_gpus == 8) & (raw.nccl_dtype == "half")
    ].iloc[-1]
    row = r[
        (r.suite == "collective") & (r.op == "all_reduce") & (r.world == 8) & (r.dtype == "fp16")
    ]
    row = row[row.msg_bytes == one.message_size * 2.0]
    assert len(row) >= 1 and one.latency * 1e-3 in list(row.median_s)  # ms -> s, same rows
    g = r[(r.suite == "gemm") & (r["T"] == 4096) & (r.strategy == "bfloat16")].iloc[0]
    assert g.flops == 2.0 * 4096**3 and 300 < g.achieved_TFLOPs < 989  # below the bf16 peak
    assert set(r["source"]) == {f"aiconfigurator_core {aic.package_version()}"}
    assert (r["framework"] != "").all() and (r["kernel"] != "").all() and (r["table"] != "").all()
    assert set(r[r.suite == "gemm"]["framework"]) == {"trtllm"}


@needs_tables
def test_a100_has_no_deepep_and_says_so() -> None:
    imp = aic.import_system("a100_sxm", subset=lambda k, raw: raw.head(50))
    assert any("deepep_ll" in s for s in imp.skipped)
    assert imp.device_name.startswith("NVIDIA A100")


@needs_tables
def test_unknown_system_and_framework_list_what_exists() -> None:
    with pytest.raises(UserError, match=r"unknown system; available: .*h200_sxm"):
        aic.import_system("h900_sxm")
    with pytest.raises(UserError, match=r"--framework = 'jax'.*available: .*trtllm"):
        aic.import_system("h200_sxm", "jax")
    assert main(["import", "aiconfigurator", "--system", "nope"]) == 2


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install"):
        aic.data_root()


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    d = tmp_path / "x_sxm" / "gemm" / "trtllm" / "1.0"
    d.mkdir(parents=True)
    bad = pd.DataFrame(
        {"framework": ["T"], "version": ["1"], "device": ["G"], "kernel_source": ["k"], "m": [1]}
    )
    bad.to_parquet(d / "gemm_perf.parquet")
    with pytest.raises(UserError, match=r"gemm_perf.parquet: column 'gemm_dtype' missing"):
        aic.import_system("x_sxm", root=tmp_path)
    out = tmp_path / "out"
    assert not out.exists()  # nothing written


# -- fitted families on synthetic data with known parameters -------------------------


def _gemm_truth(m: np.ndarray, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    eff = 600e12 * m / (m + 128.0)
    return 5e-6 + np.maximum(2 * m * n * k / eff, (n * k * 2) / 3e12)


def test_gemm_grid_recovers_a_held_out_weight_shape() -> None:
    ms, ns, ks = (
        [1, 4, 16, 64, 256, 1024, 4096],
        [512, 1024, 2048, 4096, 8192],
        [512, 1024, 2048, 4096],
    )
    M, N, K = (a.ravel() for a in np.meshgrid(ms, ns, ks, indexing="ij"))
    rows = pd.DataFrame(
        {"T": M, "F": N, "D": K, "median_s": _gemm_truth(M * 1.0, N * 1.0, K * 1.0)}
    )
    held = (rows.F == 2048) & (rows.D == 1024)
    tab = gpu.gemm_grid(rows[~held])
    cm = CostModel(
        load_hardware("h200-sxm-spec").model_copy(
            update={"calibration": Calibration(source=SRC, gemm_table={"bf16": tab})}
        )
    )
    pred = cm.gemm_s(rows[held]["T"], 2048, 1024, "bf16")
    assert np.max(np.abs(pred / rows[held]["median_s"] - 1)) < 0.1
    # a measured point comes back exactly (5 significant digits)
    assert float(cm.gemm_s(64, 4096, 4096, "bf16")) == pytest.approx(
        _gemm_truth(64.0, 4096.0, 4096.0), rel=1e-4
    )


def _expert_rows(n: int, seed: int = 0) -> gpu.ExpertRows:
    """Random balanced fused-MoE rows over three model shapes (terms separable)."""
    rng = np.random.default_rng(seed)
    active = rng.integers(1, 33, n).astype(float)
    tok = np.exp(rng.uniform(0, np.log(2000), n))
    pick = rng.integers(0, 3, n)
    D = np.choose(pick, [4096.0, 7168.0, 2048.0])
    F = np.choose(pick, [1536.0, 2048.0, 512.0])
    return gpu.ExpertRows(
        active=active,
        tokens_e=tok,
        flops_e=6 * tok * D * F,
        wbytes_e=3 * D * F * 1.0,
        scan=active * tok * D,
        act_e=tok * 2 * (D + F) * 2,
    )


def _experts_truth(x: gpu.ExpertRows, act_ps: float) -> np.ndarray:
    per = 1e-6 + x.wbytes_e / 3000e9 + x.act_e * act_ps * 1e-12 + x.flops_e / 700e12
    return 20e-6 + 3e-12 * x.scan + x.active * per


@pytest.mark.parametrize("act_ps", [0.0, 0.5])
def test_experts_line_recovers_known_parameters(act_ps: float) -> None:
    x = _expert_rows(400)
    g = gpu.fit_experts_line(x, _experts_truth(x, act_ps))
    assert g.latency_us == pytest.approx(20.0, rel=0.05)
    assert g.weight_GBps == pytest.approx(3000.0, rel=0.05)
    assert g.scan_ps == pytest.approx(3.0, rel=0.1)
    assert g.activation_ps == pytest.approx(act_ps, abs=0.05)
    assert np.median(g.tflops.y) == pytest.approx(700.0, rel=0.05)


def test_experts_line_weight_bandwidth_bounded_by_hbm() -> None:
    """Weights read at 3 TB/s, HBM at 2 TB/s: the fit stops at the HBM figure."""
    x = _expert_rows(200, seed=1)
    g = gpu.fit_experts_line(x, _experts_truth(x, 0.5), hbm_GBps=2000.0)
    assert g.weight_GBps == pytest.approx(2000.0, rel=1e-3)


def test_experts_s_prices_activation_bytes() -> None:
    """Hand-computed: 2 experts of 100 rows, D=1000, F=500 -> 2*100*2*1500*2 = 1.2 MB
    at 0.5 ps/byte adds 0.6 us to the call."""
    fit = GemmFit(
        latency_us=0.0, tflops=Curve(x=[1.0], y=[1e9]), tflops_by="tokens", activation_ps=0.5
    )
    base = load_hardware("h200-sxm-spec")
    cal = Calibration(source=SRC, gemm={"bf16": fit})
    cm = CostModel(base.model_copy(update={"calibration": cal}))
    flops_s = 2 * 6 * 100 * 1000 * 500 / 1e21
    got = float(cm.experts_s([100.0, 100.0, 0.0], 1000, 500, "bf16"))
    assert got == pytest.approx(0.6e-6 + flops_s, rel=1e-9)


def _tile_bw(tiles: np.ndarray) -> np.ndarray:
    """Known weight bandwidth (GB/s) by the call's tiles: 1.2 TB/s at 20 tiles rising
    as tiles^0.25 to the 4 TB/s HBM figure (reached at ~2,500 tiles)."""
    return np.minimum(1200.0 * (tiles / 20.0) ** 0.25, 4000.0)


def _tiled_rows(n: int, seed: int = 2) -> tuple[gpu.ExpertRows, np.ndarray]:
    rng = np.random.default_rng(seed)
    active = rng.integers(1, 65, n).astype(float)
    tok = np.exp(rng.uniform(0, np.log(2000), n))
    pick = rng.integers(0, 3, n)
    D = np.choose(pick, [4096.0, 7168.0, 2048.0])
    F = np.choose(pick, [1536.0, 2048.0, 512.0])
    tiles_e = np.ceil(tok / 128) * (2 * F + D) / 128
    x = gpu.ExpertRows(
        active=active,
        tokens_e=tok,
        flops_e=6 * tok * D * F,
        wbytes_e=3 * D * F * 2.0,
        scan=active * tok * D,
        act_e=tok * 2 * (D + F) * 2,
        tiles_e=tiles_e,
    )
    per = 1e-6 + x.act_e * 0.3e-12 + x.flops_e / 700e12
    weights = active * x.wbytes_e / (_tile_bw(active * tiles_e) * 1e9)
    return x, 20e-6 + 3e-12 * x.scan + active * per + weights


def test_experts_line_recovers_weight_bandwidth_by_tiles() -> None:
    """Weights stream at a known bandwidth that grows with the call's tiles: the fitted
    curve follows it (never above HBM, never falling with more tiles) and the other
    terms come back."""
    x, t = _tiled_rows(1200)
    g = gpu.fit_experts_line(x, t, hbm_GBps=4000.0)
    assert g.weight_GBps_by_tiles is not None
    bw = g.weight_GBps_by_tiles
    assert max(bw.y) <= 4000.0 * 1.0001
    assert np.all(np.diff(bw.y) >= -1e-6 * max(bw.y))
    for tiles in (100.0, 400.0, 5000.0):
        got = float(np.interp(np.log(tiles), np.log(bw.x), bw.y))
        assert got == pytest.approx(float(_tile_bw(np.array(tiles))), rel=0.1), tiles
    assert g.latency_us == pytest.approx(20.0, rel=0.1)
    assert g.scan_ps == pytest.approx(3.0, rel=0.1)
    assert g.activation_ps == pytest.approx(0.3, abs=0.05)
    assert np.median(g.tflops.y) == pytest.approx(700.0, rel=0.1)
    assert g.weight_GBps == pytest.approx(bw.y[-1])


def test_experts_s_prices_weights_at_the_calls_tile_bandwidth() -> None:
    """Hand-computed: 2 experts of 100 rows, D=1024, F=512 in bf16: each has
    ceil(100/128) (2*512 + 1024)/128 = 16 tiles, the call 32; the curve gives
    1000 GB/s at 32 tiles (halfway in log between 500 at 16 and 1500 at 64), so
    2 x 3*1024*512*2 B = 6.29 MB take 6.291456 us."""
    fit = GemmFit(
        latency_us=0.0,
        tflops=Curve(x=[1.0], y=[1e9]),
        tflops_by="tokens",
        weight_GBps=2000.0,
        weight_GBps_by_tiles=Curve(x=[16.0, 64.0], y=[500.0, 1500.0]),
    )
    base = load_hardware("h200-sxm-spec")
    cm = CostModel(
        base.model_copy(update={"calibration": Calibration(source=SRC, gemm={"bf16": fit})})
    )
    flops_s = 2 * 6 * 100 * 1024 * 512 / 1e21
    got = float(cm.experts_s([100.0, 100.0, 0.0], 1024, 512, "bf16"))
    assert got == pytest.approx(2 * 3 * 1024 * 512 * 2 / 1000e9 + flops_s, rel=1e-9)


def _ep_table(slow: dict[int, float]) -> pd.DataFrame:
    """Balanced rows of one shape (64 experts) at EP 1..16: latency + work / EP, the
    configurations in ``slow`` multiplied by their factor."""
    rows = []
    for ep in (1, 2, 4, 8, 16):
        for T in (1, 16, 128, 1024, 4096):
            t = (20e-6 + 1e-7 * T + 2e-3 / ep * min(1.0, T * 8 / 64)) * slow.get(ep, 1.0)
            rows.append({"T": T, "D": 4096, "F": 1024, "E": 64, "K": 8, "world": ep, "median_s": t})
    return pd.DataFrame(rows)


def test_ep_rule_flags_configurations_slower_than_a_superset_of_their_work() -> None:
    """EP 4 at 3x its time is slower than EP 2 (whose rank holds twice its experts and
    rows) and is flagged, all its token counts; EP 8 at 1.05x (noise) is not."""
    rows = _ep_table({4: 3.0, 8: 1.05})
    mask, note = gpu.flag_ep_slower_than_subset(rows, "experts.bf16")
    assert set(rows[mask]["world"]) == {4}
    assert mask.sum() == 5
    assert "1 of 5 (shape, EP) configurations (5 of 25 rows)" in note
    assert "D4096 F1024 E64 K8 EP4" in note
    clean, none = gpu.flag_ep_slower_than_subset(_ep_table({}))
    assert not clean.any() and none == ""


def test_fit_all_neither_fits_nor_scores_flagged_rows_and_says_so() -> None:
    """A fused-MoE configuration the rule flags is left out of the fit and the family's
    error, and a note names it with the held-out error of all rows; with the rule off
    every row is fitted."""
    shapes = [(2048, 512), (4096, 1024), (3072, 768), (6144, 2048), (5120, 1536)]
    parts = []
    for D, F in shapes:
        r = _ep_table({4: 3.0} if D == 4096 else {})
        r["D"], r["F"] = D, F
        r["median_s"] *= D * F / (4096 * 1024)
        parts.append(r)
    df = pd.concat(parts, ignore_index=True).assign(
        suite="moe", op="moe", strategy="trtllm", dtype="bf16", split="balanced", msg_bytes=0.0
    )
    base = load_hardware("h200-sxm-spec")
    fit = gpu.fit_all(df, base, SRC)
    assert fit.rows["experts.bf16"] == len(df) - 5
    assert fit.errors["experts.bf16"].n == len(df) - 5
    err = fit.errors["experts.bf16"]
    assert err.flagged == 5 and err.mape_all is not None and err.mape_all > err.mape
    assert any("D4096 F1024 E64 K8 EP4" in n and "of all rows" in n for n in fit.notes)
    off = gpu.fit_all(df, base, SRC, flag_rows=False)
    assert off.rows["experts.bf16"] == len(df) and not off.notes


#: (D, F, E, K) of a synthetic fused-MoE table; the last two measured block-scaled only
RECIPE_SHAPES = [
    (2048, 768, 128, 8), (4096, 1536, 128, 8), (6144, 2048, 256, 8), (3072, 1024, 256, 8),
    (7168, 2048, 256, 8), (7168, 3072, 384, 6),
]  # fmt: skip
#: compute-bound peak of each recipe's kernel (TFLOP/s): block scales at 0.6x per-tensor
RECIPE_PEAK = {"fp8": 1400.0, "fp8_block": 840.0}


def _recipe_truth(rows: pd.DataFrame, peak: float) -> np.ndarray:
    """20 us + per active expert its FLOPs at ``peak m / (m + 64)`` and its weights at 3 TB/s."""
    x = gpu.expert_rows(rows, "fp8")
    rate = peak * 1e12 * x.tokens_e / (x.tokens_e + 64.0)
    return 20e-6 + x.active * (x.flops_e / rate + x.wbytes_e / 3e12)


def _recipe_table() -> pd.DataFrame:
    grid = [
        {"T": T, "D": D, "F": F, "E": E, "K": K, "world": ep}
        for D, F, E, K in RECIPE_SHAPES
        for ep in (1, 2, 4, 8)
        for T in (1, 8, 64, 256, 1024, 4096, 16384)
    ]
    parts = []
    for recipe, peak in RECIPE_PEAK.items():
        r = pd.DataFrame(grid)
        if recipe == "fp8":
            r = r[r["D"] != 7168]
        parts.append(r.assign(strategy=recipe, median_s=_recipe_truth(r, peak)))
    df = pd.concat(parts, ignore_index=True)
    return df.assign(suite="moe", op="moe", dtype="fp8", split="balanced", msg_bytes=0.0)


def test_block_scaled_fp8_experts_get_their_own_fit() -> None:
    """Per-tensor fp8 at a 1400 TFLOP/s peak on four shapes, block-scaled fp8 at 840 on
    those and two more (measured block-scaled only, as DeepSeek-V3's in the trtllm
    tables): ``experts.fp8_block`` recovers the block rate from its rows alone (a held-out
    D 7168 shape predicted from the others), ``experts.fp8`` keeps the fastest recipe of
    each configuration, and ``experts_s`` prices the recipe asked for."""
    df = _recipe_table()
    fit = gpu.fit_all(df, load_hardware("h200-sxm-spec"), SRC, workers=1)
    assert {"experts.fp8", "experts.fp8_block"} <= set(fit.errors)
    assert fit.rows["experts.fp8_block"] == int((df["strategy"] == "fp8_block").sum())
    assert fit.errors["experts.fp8_block"].mape < 0.03
    block = fit.parts.gemm["fp8_block"]
    big = float(np.interp(np.log(2048.0), np.log(block.tflops.x), block.tflops.y))
    assert big == pytest.approx(840.0 * 2048 / (2048 + 64), rel=0.05)
    cm = gpu.cost_model(load_hardware("h200-sxm-spec"), fit.parts, SRC)
    ds = df[(df["D"] == 7168) & (df["E"] == 256) & (df["world"] == 8) & (df["T"] == 16384)]
    m = gpu.tokens_lists(ds)[0]
    got = float(cm.experts_s(m, 7168, 2048, "fp8", scanned_rows=16384 * 8, recipe="fp8_block"))
    assert got == pytest.approx(float(ds["median_s"].iloc[0]), rel=0.05)
    # the default fp8 fit is the per-tensor kernel's where it was measured: faster here
    assert float(cm.experts_s(m, 7168, 2048, "fp8", scanned_rows=16384 * 8)) < 0.8 * got


def test_collective_regimes_recover_known_protocol_lines() -> None:
    """Three NCCL-like protocol lines (LL, LL128, Simple), the faster one measured at
    each size: latencies, bandwidths and the hand-overs come back."""
    from moesim.calibrate.gpu_forms import fit_regimes
    from moesim.costs.tables import regimes_s

    size = np.repeat(2.0 ** np.arange(9, 30), 2)
    lines = [(8e-6, 20e9), (14e-6, 150e9), (60e-6, 400e9)]
    ll, ll128, simple = (a + size / b for a, b in lines)
    t = np.minimum(np.minimum(ll, ll128), simple)
    fit = fit_regimes(size, t * (1 + 0.01 * np.tile([1, -1], size.size // 2)), 0.03)
    assert len(fit.regimes) == 3
    for r, (lat, bw) in zip(fit.regimes, lines, strict=True):
        assert r.latency_us == pytest.approx(lat * 1e6, rel=0.1)
        assert r.GBps == pytest.approx(bw / 1e9, rel=0.05)
    # hand-overs where the lines cross: LL/LL128 at ~138 kB, LL128/Simple at ~11 MB
    cross = [(14e-6 - 8e-6) / (1 / 20e9 - 1 / 150e9), (60e-6 - 14e-6) / (1 / 150e9 - 1 / 400e9)]
    ends = [r.upto_bytes for r in fit.regimes]
    assert ends[:2] == pytest.approx(cross, rel=0.1) and ends[2] is None
    assert float(regimes_s(fit.regimes, 1e7)) == pytest.approx(14e-6 + 1e7 / 150e9, rel=0.03)
    # the rendered curve prices what the regimes do at the measured sizes
    fit_curve = fit.model_copy(update={"regimes": []})
    from moesim.costs.tables import curve_s

    np.testing.assert_allclose(curve_s(fit_curve, size), curve_s(fit, size), rtol=0.02)


def test_deepep_ll_recovers_per_expert_and_per_sm_terms() -> None:
    from moesim.calibrate.gpu_forms import fit_deepep_ll
    from moesim.costs.model import deepep_bytes

    rng = np.random.default_rng(0)
    cfg = [(2048, 8, 128), (4096, 2, 8), (7168, 8, 256), (5120, 1, 16), (4096, 10, 512)]
    T = np.tile(2.0 ** np.arange(0, 11), len(cfg))
    D, K, E = (np.repeat([c[i] for c in cfg], 11).astype(float) for i in range(3))
    b = np.array(
        [
            float(deepep_bytes("dispatch", *a, 8))
            for a in zip(T, D.astype(int), K.astype(int), strict=True)
        ]
    )
    t = 8e-6 + 15e-9 * E + b / 400e9 + 250e-12 * T * K * D / np.minimum(E, 132)
    fit = fit_deepep_ll(T, D, K, E, b, t * (1 + 0.005 * rng.standard_normal(t.size)), 132, 0.03)
    assert fit.latency_us == pytest.approx(8.0, rel=0.05)
    assert fit.per_expert_us == pytest.approx(0.015, rel=0.1)
    assert fit.bandwidth_GBps.y[0] == pytest.approx(400.0, rel=0.1)
    assert fit.sm_ps == pytest.approx(250.0, rel=0.05)
    # the cost model folds the shape terms into one line exactly
    hw = load_hardware("h200-sxm-spec")
    src = CalibrationSource(results=["x"], device="x", created="now")
    cm = CostModel(
        hw.model_copy(update={"calibration": Calibration(source=src, deepep={"ll.dispatch": fit})})
    )
    got = cm.deepep_s("ll", "dispatch", 512.0, 4096, 2, 8, experts=8)
    want = fit.latency_us * 1e-6 + fit.per_expert_us * 8e-6 + 512 * 2 * 4096 * fit.sm_ps * 1e-12 / 8
    want += float(deepep_bytes("dispatch", 512.0, 4096, 2, 8)) / (fit.bandwidth_GBps.y[0] * 1e9)
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_deepep_normal_recovers_local_copies_and_per_hidden_latency() -> None:
    from moesim.calibrate.gpu_forms import fit_deepep_normal
    from moesim.costs.model import deepep_bytes, deepep_row_bytes

    cfg = [(2048, 8, 128), (4096, 2, 8), (7168, 8, 256), (5120, 1, 16), (6144, 4, 128)]
    T = np.tile(2.0 ** np.arange(0, 17), len(cfg))
    D, K, E = (np.repeat([c[i] for c in cfg], 17).astype(int) for i in range(3))
    b = np.array(
        [
            float(deepep_bytes("combine", t, d, k, 8, e, "normal"))
            for t, d, k, e in zip(T, D, K, E, strict=True)
        ]
    )
    row = np.array([deepep_row_bytes("combine", int(d)) for d in D])
    B = b + 1.5 * T * row
    t = 20e-6 + 3e-9 * D + B / 250e9
    fit = fit_deepep_normal(D.astype(float), T, row, b, t, 0.03)
    assert fit.latency_us == pytest.approx(20.0, rel=0.1)
    assert fit.per_hidden_ns == pytest.approx(3.0, rel=0.15)
    assert fit.local_copies == pytest.approx(1.5, rel=0.1)
    assert np.median(fit.bandwidth_GBps.y) == pytest.approx(250.0, rel=0.1)


def test_shape_folds_hold_out_whole_shapes() -> None:
    rows = pd.DataFrame(
        {"D": [1, 1, 2, 2, 3, 3], "K": [8] * 6, "E": [8] * 6, "median_s": [1, 2, 3, 4, 5, 6]}
    )
    ids = gpu.shape_folds(rows, ("D", "K", "E"), folds=3)
    for d in (1, 2, 3):
        assert len(set(ids[d == rows.D])) == 1
    assert len(set(ids)) == 3


# -- profiles: names, round trip, ranges -------------------------------------------------


def test_measured_profile_by_plain_name_spec_by_suffix() -> None:
    measured = load_hardware("h200-sxm")
    spec = load_hardware("h200-sxm-spec")
    assert measured.calibration is not None and measured.calibration.source.measured_by
    assert spec.calibration is None and spec.name == "h200-sxm"
    for name in ("h100-sxm", "b200", "a100-sxm-80gb"):
        assert load_hardware(name).calibration is not None, name


@needs_tables
def test_profile_round_trip(tmp_path: Path) -> None:
    from moesim.calibrate import calibrate, write_profile
    from moesim.measure.results import write_results

    def sub(kind: str, raw: pd.DataFrame) -> pd.DataFrame:
        if kind == "gemm":
            keep = raw["n"].isin([1024, 4096]) & raw["k"].isin([1024, 4096]) & (raw["m"] <= 1024)
            return raw[keep]
        if kind == "moe":
            return raw[(raw["hidden_size"] == 2048) & (raw["moe_ep_size"] <= 4)]
        if kind == "deepep_normal":
            return raw[(raw["dispatch_sms"] == 24) & (raw["hidden_size"] <= 4096)]
        if kind == "nccl":
            return raw[raw["op_name"] == "all_reduce"]
        return raw

    imp = aic.import_system(
        "h200_sxm", subset=sub, kinds=("gemm", "moe", "nccl", "deepep_ll", "deepep_normal")
    )
    res = write_results(imp.rows, tmp_path / "t.parquet", {"complete": True})
    rep = calibrate([res], base=load_hardware("h200-sxm-spec"), name="rt")
    out = write_profile(rep.profile, tmp_path / "rt.yaml")
    back = load_hardware(str(out))
    assert back == rep.profile
    a, b = CostModel(rep.profile), CostModel(back)
    assert float(a.gemm_s(100, 2000, 3000, "bf16")) == float(b.gemm_s(100, 2000, 3000, "bf16"))
    assert float(a.collective_s("all_reduce", 8, 1e6)) == float(
        b.collective_s("all_reduce", 8, 1e6)
    )
    assert back.calibration is not None and "gemm.bf16" in back.calibration.errors
    assert "aiconfigurator_core" in (back.calibration.source.measured_by or "")
    # measured range: 8 GPUs is inside, 64 is 8x above; tokens beyond 1e6 flagged
    assert a.out_of_range("collective.all_reduce", gpus=8) == []
    far = a.out_of_range("collective.all_reduce", gpus=64)
    assert far and far[0]["factor"] == pytest.approx(8.0)


def test_simulate_lists_out_of_range_phases() -> None:
    from moesim.config.loader import load_scenario
    from moesim.simulate import simulate

    scn = load_scenario("scenarios/mixtral-8x7b-8xh100.yaml")
    res = simulate(scn, load_hardware("h100-sxm"), seed=0)
    items = res.details["out_of_range"]
    assert isinstance(items, list)
    assert all({"phase", "axis", "factor", "lo", "hi"} <= set(i) for i in items)
    assert simulate(scn, load_hardware("h100-sxm-spec"), seed=0).details["out_of_range"] == []


def test_scenario_expert_recipe_prices_the_block_scaled_fit() -> None:
    """An fp8 model on the measured H200 profile: ``expert_recipe: fp8_block`` prices the
    experts by the block-scaled fit (slower on Hopper at prefill token counts) and reads
    that family's measured range; the default keeps the fastest fp8 recipe's fit."""
    from moesim.config.loader import load_scenario
    from moesim.simulate import simulate

    sets = ["model.dtype=fp8", "workload.tokens_per_gpu=4096"]
    hw = load_hardware("h200-sxm")
    fast = simulate(load_scenario("scenarios/mixtral-8x7b-8xh100.yaml", sets), hw, seed=0)
    blk = load_scenario(
        "scenarios/mixtral-8x7b-8xh100.yaml", [*sets, "model.expert_recipe=fp8_block"]
    )
    block = simulate(blk, hw, seed=0)
    assert block.phases_s["experts"] > 1.2 * fast.phases_s["experts"]
    assert fast.phases_s["dispatch"] == pytest.approx(block.phases_s["dispatch"])
    fams = {i["family"] for i in block.details["out_of_range"] if i["phase"] == "experts"}
    assert fams <= {"experts.fp8_block"}


def test_spec_shape_efficiency_penalises_small_gemms() -> None:
    hw = load_hardware("mi300x")
    assert hw.gpu.gemm_shape is not None
    cm = CostModel(hw)
    big = 2 * 8192**3 / float(cm.gemm_s(8192, 8192, 8192, "bf16"))
    skinny = 2 * 200 * 8192 * 8192 / float(cm.gemm_s(200, 8192, 8192, "bf16"))
    assert skinny < big  # tile padding (200 of 256 rows) and partial waves


def test_deepep_normal_sends_a_token_once_per_rank() -> None:
    from moesim.costs.model import deepep_bytes

    row = 2.0 * 4096
    # top-1: one copy, off-rank with probability 7/8, as in low-latency mode
    assert float(deepep_bytes("combine", 10, 4096, 1, 8, 64, "normal")) == pytest.approx(
        10 * row * 7 / 8
    )
    assert float(deepep_bytes("combine", 10, 4096, 1, 8, 64, "ll")) == pytest.approx(
        10 * row * 7 / 8
    )
    # every expert chosen: every other rank gets the token exactly once
    assert float(deepep_bytes("combine", 10, 4096, 64, 8, 64, "normal")) == pytest.approx(
        10 * row * 7
    )


def test_low_latency_dispatch_on_measured_profile_follows_deepep_fit() -> None:
    """Uniform rows on one node: the priced coflow is exactly the DeepEP fit's time."""
    from moesim.config.loader import load_scenario
    from moesim.costs.tables import curve_s
    from moesim.simulate.plan import CommPricer
    from moesim.simulate.topology import build_topology
    from moesim.simulate.traffic import flat_links

    sets = ["dispatcher=low_latency", "workload.mode=decode", "workload.tokens_per_gpu=64"]
    scn = load_scenario("scenarios/mixtral-8x7b-8xh100.yaml", sets)
    hw = load_hardware("h200-sxm")
    topo, cm = build_topology(scn, hw), CostModel(hw)
    rows_XL = flat_links(np.full((topo.num_groups, 8, 8), 16.0), topo)
    cf = CommPricer(hw, cm, topo, "low_latency").price(rows_XL, 8192.0, op="dispatch")
    fit = cm.deepep_fit("ll", "dispatch")
    assert fit is not None
    want = float(curve_s(fit, 7 * 16.0 * 8192.0))  # bytes a rank sends to the 7 others
    assert float(cf.latency_X[0] + cf.solo_X[0]) == pytest.approx(want, rel=1e-9)
    # with the scenario's shape the shape terms fold in (Mixtral: D 4096, top-2, 8 experts)
    shaped = CommPricer(hw, cm, topo, "low_latency", (4096, 2, 8, 8, {"dispatch": 8192.0}))
    cf = shaped.price(rows_XL, 8192.0, op="dispatch")
    line = cm.deepep_line("ll", "dispatch", 4096, 2, 8, experts=8, row=8192.0)
    assert line is not None
    want_shaped = float(curve_s(line, 7 * 16.0 * 8192.0))
    assert float(cf.latency_X[0] + cf.solo_X[0]) == pytest.approx(want_shaped, rel=1e-9)
    spec = CommPricer(hw, cm, topo, "alltoall").price(rows_XL, 8192.0, op="dispatch")
    assert float(spec.latency_X[0] + spec.solo_X[0]) != pytest.approx(want, rel=1e-3)


@needs_tables
def test_cli_import_writes_a_results_file_calibrate_reads(tmp_path: Path) -> None:
    from moesim.calibrate.results import load

    assert main(["import", "aiconfigurator", "--system", "a100_sxm", "--out", str(tmp_path)]) == 0
    files = list((tmp_path / "nvidia-a100-sxm4-80gb").glob("aiconfigurator-a100_sxm-*.parquet"))
    assert len(files) == 1
    df, _, _ = load(files)
    assert {"gemm", "moe", "collective"} <= set(df["suite"])
    assert (df["device_name"] == "NVIDIA A100-SXM4-80GB").all()


def test_profiles_json_marks_measured_and_spec(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["profiles", "--json"]) == 0
    by_name = {p["lookup_name"]: p["provenance_kind"] for p in json.loads(capsys.readouterr().out)}
    assert by_name["h200-sxm"]["kind"] == "measured"
    assert "aiconfigurator_core" in by_name["h200-sxm"]["from"]
    assert by_name["h200-sxm-spec"]["kind"] == "spec"
    assert by_name["mi300x"]["kind"] == "spec"


def test_shipped_measured_profiles_never_run_expert_gemms_past_peak() -> None:
    """The fused-MoE rate curve is bounded by the dtype's dense peak (it once reached
    1,290 TFLOP/s on H100 bf16 when the other terms traded time with the curve)."""
    from pathlib import Path

    from moesim.config.loader import load_hardware

    root = Path(__file__).resolve().parents[1] / "hardware_profiles" / "calibrated"
    paths = sorted(root.glob("*-measured.yaml"))
    assert len(paths) >= 4
    for path in paths:
        hw = load_hardware(str(path))
        gemm = hw.calibration.gemm if hw.calibration else {}
        dtype_of = dict(gpu.EXPERT_RECIPES.values())  # fp8_block: the fp8 peak
        for key, fit in gemm.items():
            peak = hw.gpu.peak_tflops[dtype_of.get(key, key)]
            assert max(fit.tflops.y) <= peak * 1.0001, (path.name, key)


@needs_tables
def test_fit_all_in_worker_processes_gives_the_fit_of_one_process() -> None:
    """The families fitted in forked workers: the same parts, errors and notes, in the
    same order, as fitted one after another here (the collectives of the real H200
    tables: nine families)."""
    imp = aic.import_system("h200_sxm", "trtllm", subset=_small)
    rows = imp.rows[imp.rows["suite"] == "collective"]
    base = load_hardware("h200-sxm-spec")
    one = gpu.fit_all(rows, base, SRC, workers=1)
    two = gpu.fit_all(rows, base, SRC, workers=2)
    assert len(one.errors) >= 9
    assert list(two.errors) == list(one.errors) and two.errors == one.errors
    assert two.parts.collectives == one.parts.collectives
    assert two.rows == one.rows and two.notes == one.notes
