"""Dense GEMMs by shape on a measured GEMM table: shapes, TP sharding, the grid's edges."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim import api
from moesim.config.hardware import Calibration, CalibrationSource, GemmTable
from moesim.config.loader import load_hardware
from moesim.costs import CostModel
from moesim.costs.tables import table_s
from moesim.model import ops
from moesim.model.flops import attention_proj_flops
from moesim.simulate.dense import dense_costs

SCN = Path(__file__).resolve().parents[1] / "scenarios"
RATE = 500e12  # FLOP/s of the synthetic table


def _table(rate: float = RATE) -> GemmTable:
    """A 2 x 2 x 2 grid of GEMMs at one rate: ``t = 2 m n k / rate`` (log-linear, so the
    interpolation is exact)."""
    m, n, k = [64, 8192], [256, 16384], [256, 8192]
    lat = [2.0 * a * b * c / rate * 1e6 for a in m for b in n for c in k]
    return GemmTable(m=m, n=n, k=k, latency_us=lat)


def test_table_is_exact_inside_and_scales_linearly_past_its_top() -> None:
    tab = _table()
    assert float(table_s(tab, 1000, 3000, 700)) == pytest.approx(2 * 1000 * 3000 * 700 / RATE)
    # 4x the largest n and 2x the largest m: 8x the time of the grid's corner
    corner = float(table_s(tab, 8192, 16384, 8192))
    assert float(table_s(tab, 16384, 65536, 8192)) == pytest.approx(8 * corner)
    # below the grid: the edge's time (launch and tile bound), not less
    assert float(table_s(tab, 1, 256, 256)) == pytest.approx(float(table_s(tab, 64, 256, 256)))


@pytest.mark.parametrize("name", ["mixtral-8x7b-8xh100.yaml", "deepseek-v3-256xh800.yaml"])
def test_attention_gemms_carry_the_projection_flops(name: str) -> None:
    """GQA (Mixtral) and MLA with a q LoRA (DeepSeek-V3): the GEMMs' 2 n k per token
    add up to the FLOP model's projections."""
    m = api.load_scenario(SCN / name).model
    assert m.dense is not None
    flops = sum(2.0 * n * k for n, k, _ in ops.attention_gemms(m.dense, m.hidden_size))
    assert flops == attention_proj_flops(m.dense, m.hidden_size)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_measured_table_prices_projections_ffn_and_head_by_shape(tp: int) -> None:
    """On a one-rate table every GEMM takes its FLOPs / rate, at any TP sharding: the
    projections take T x proj FLOPs / rate, the shared-expert FFN 6 T D F / rate plus
    its activation pass, the LM head 2 T D V / rate plus loss and embedding passes."""
    scn = api.load_scenario(SCN / "mixtral-8x7b-8xh100.yaml", overrides=[f"parallel.tp={tp}"])
    hw = load_hardware("h100-sxm-spec")
    src = CalibrationSource(results=["synthetic"], device="synthetic", created="test")
    cal = Calibration(source=src, gemm_table={"bf16": _table()})
    cost = CostModel(hw.model_copy(update={"calibration": cal}))
    m, T = scn.model, scn.workload.tokens_per_gpu
    assert m.dtype == "bf16" and m.dense is not None
    c = dense_costs(scn, cost)
    proj = c["dense"] - c["attn_core"]
    assert proj == pytest.approx(T * attention_proj_flops(m.dense, m.hidden_size) / RATE)
    V, D = m.vocab_size or 0, m.hidden_size
    mem = float(cost.memory_s("loss", ops.loss_bytes(m, T, 2.0)))
    mem += float(cost.memory_s("embedding", ops.embedding_bytes(m, T, 2.0)))
    assert c["head"] == pytest.approx(2.0 * T * D * V / RATE + mem)
    spec = dense_costs(scn, CostModel(hw))
    assert spec["dense"] != pytest.approx(c["dense"])  # the table, not the roofline, priced it
