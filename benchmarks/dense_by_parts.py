"""A published row's dense GEMMs by parts: each GEMM on the measured table vs the spec FLOPs.

For one ``moesim/validation/published.yaml`` row (default the Qwen3-30B-A3B H100 row)
prints, per dense GEMM of one micro-batch (attention projections, LM head): its
TP-sharded shape, the measured table's time (and the grid's nearest measured point,
the figure it is checked against), and the time the FLOPs got at the spec's flat
efficiency before; then the step's phases (forward + backward seconds summed over
layers, critical GPU) with each pricing, so the change shows part by part.

Run: ``python benchmarks/dense_by_parts.py [ROW_ID]``.
"""

from __future__ import annotations

import sys

import numpy as np

from moesim.config.loader import load_hardware
from moesim.costs import CostModel
from moesim.model import ops
from moesim.simulate import dense, simulate
from moesim.validation.published import load_published


def _nearest(tab, m: float, n: float, k: float) -> tuple[tuple[int, int, int], float]:
    """The grid point nearest in log and its measured microseconds."""
    idx = [int(np.argmin(np.abs(np.log(np.asarray(ax, float)) - np.log(q))))
           for ax, q in ((tab.m, m), (tab.n, n), (tab.k, k))]  # fmt: skip
    flat = (idx[0] * len(tab.n) + idx[1]) * len(tab.k) + idx[2]
    return (tab.m[idx[0]], tab.n[idx[1]], tab.k[idx[2]]), tab.latency_us[flat]


def main() -> None:
    row_id = sys.argv[1] if len(sys.argv) > 1 else "mbridge-qwen3-30b-a3b-16xh100-tokens"
    row = next(r for r in load_published().rows if r.id == row_id)
    scn = row.scenario
    hw = load_hardware(scn.hardware)
    cost = CostModel(hw)
    m, T, tp, dt = scn.model, scn.workload.tokens_per_gpu, scn.parallel.tp, scn.model.dtype
    assert m.dense is not None and hw.calibration is not None
    tab = cost._gemm_table(dt, None)
    assert tab is not None, f"{scn.hardware} has no {dt} GEMM table"
    print(f"{row_id} on {hw.name}: T = {T} tokens per GPU, tp = {tp}, {dt}")
    print(f"{'GEMM':10} {'m x n x k':>22} {'table us':>9} {'TF/s':>6} "
          f"{'nearest measured':>24} {'flat us':>8} {'TF/s':>6}")  # fmt: skip
    named = [("qkv", "o"), ("head",)]
    groups = [ops.attention_gemms(m.dense, m.hidden_size), ops.lm_head_gemms(m)]
    for names, gemms in zip(named, groups, strict=True):
        for name, g in zip(names, gemms, strict=True):
            mq, nq, kq = ops.sharded(g, T, tp)
            t = float(cost.gemm_s(mq, nq, kq, dt))
            flops = 2.0 * mq * nq * kq
            flat = float(cost.dense_s(flops, (mq * kq + kq * nq + mq * nq) * 1.0, dt))
            pt, us = _nearest(tab, mq, nq, kq)
            print(f"{name:10} {f'{mq:.0f} x {nq:.0f} x {kq:.0f}':>22} {t * 1e6:9.1f} "
                  f"{flops / t / 1e12:6.0f} {f'{pt[0]}x{pt[1]}x{pt[2]}: {us:.1f}':>24} "
                  f"{flat * 1e6:8.1f} {flops / flat / 1e12:6.0f}")  # fmt: skip
    after = simulate(scn, hw)
    table_gemms = dense._gemms_s
    dense._gemms_s = lambda *a, **k: None  # the FLOPs path: the pricing before
    try:
        before = simulate(scn, hw)
    finally:
        dense._gemms_s = table_gemms
    print(f"\n{'phase (ms, one MoE layer fwd)':30} {'flat':>9} {'table':>9} {'change':>8}")
    for p, a in after.phases_s.items():
        b = before.phases_s.get(p, 0.0)
        if a or b:
            ch = f"{a / b - 1:+8.1%}" if b else ""
            print(f"{p:30} {b * 1e3:9.3f} {a * 1e3:9.3f} {ch}")
    print(f"\n{'step on the critical GPU (s)':30} {'flat':>9} {'table':>9}")
    sb, sa = before.step_breakdown_s["critical_gpu"], after.step_breakdown_s["critical_gpu"]
    for k, a in sa.items():
        print(f"{k:30} {sb.get(k, 0.0):9.4f} {a:9.4f}")
    print(f"{'step':30} {before.step_time_s:9.4f} {after.step_time_s:9.4f} "
          f"{after.step_time_s / before.step_time_s - 1:+8.1%}")  # fmt: skip
    print(
        f"{'tokens/s/GPU (published ' + str(row.published) + ')':30} "
        f"{before.throughput_tokens_per_s / scn.cluster.num_gpus:9.0f} "
        f"{after.throughput_tokens_per_s / scn.cluster.num_gpus:9.0f}"
    )


if __name__ == "__main__":
    main()
