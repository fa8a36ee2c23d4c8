"""The published step rows' attention core by parts: measured table vs FLOPs, 2x vs 2.5x backward.

For each training-step row of ``moesim/validation/published.yaml`` (or the rows whose
id contains ARG) prints the GPU's attention-core call (``model/ops.attention_call``),
its forward seconds in one full-attention layer on the profile's measured attention
fit and by its FLOPs on the dense fit / spec roofline (with the TFLOP/s each
implies), then the row's metric with each of the two changes alone and both: the
core priced from the table, and its backward at 2.5x the forward (FlashAttention's
FLOP count) instead of the GEMMs' 2x.

Run: ``python benchmarks/attention_by_parts.py [ID_PART]``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from moesim.config.base import DTYPE_BYTES
from moesim.config.loader import load_hardware
from moesim.costs import CostModel, work
from moesim.model import ops
from moesim.simulate import dense, program
from moesim.validation.published import _value, load_published

STEP_METRICS = ("model_tflops_per_gpu", "tokens_per_s_per_gpu", "mfu_percent")


@contextmanager
def pricing(table: bool, core_bwd: float) -> Iterator[None]:
    """The core on the table (or its FLOPs) and its backward at ``core_bwd`` x forward."""
    saved = dense._core_table_s, program.CORE_OVER_GEMM
    if not table:
        dense._core_table_s = lambda *a, **k: None  # type: ignore[assignment]
    program.CORE_OVER_GEMM = core_bwd / dense.BACKWARD_FACTOR["dense"]
    try:
        yield
    finally:
        dense._core_table_s, program.CORE_OVER_GEMM = saved


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    rows = [r for r in load_published().rows if r.metric in STEP_METRICS and only in r.id]
    for row in rows:
        scn = row.scenario
        hw, m, par = load_hardware(scn.hardware), scn.model, scn.parallel
        cost, T = CostModel(hw), scn.workload.tokens_per_gpu
        call = ops.attention_call(m, T, par.tp, par.cp)
        assert call is not None and m.dense is not None
        dt = "bf16" if m.dtype == "fp8" else m.dtype
        _, cb = ops.attention_core(m, T, DTYPE_BYTES[m.dtype], causal=True)
        # one full-attention layer (sliding-window layers stay on their FLOPs either way)
        f = float(work.attention_core_flops(*call[:3], call.d_qk, call.d_v)) * call.share
        flops_s = float(cost.dense_s(f, cb, dt))
        table = cost.attention_s(*call[:6], dt, mla=m.dense.kind == "mla")
        table_s = float(table) * call.share if table is not None else float("nan")
        shape = f"B {call.batch:g} x S {call.seq} x H {call.heads:g} (KV {call.kv_heads:g})"
        print(
            f"{row.id} on {hw.name}: call {shape}, d {call.d_qk}/{call.d_v}, share {call.share:g}"
        )
        rates = [f"{s * 1e3:.3f} ms ({f / s / 1e12:.0f} TFLOP/s)" for s in (table_s, flops_s)]
        print(f"  core forward, one full-attention layer: table {rates[0]}, FLOPs {rates[1]}")
        cells = []
        for table_on, bwd in ((False, 2.0), (True, 2.0), (False, 2.5), (True, 2.5)):
            with pricing(table_on, bwd):
                v = _value(row, scn, None)
            name = f"{'table' if table_on else 'FLOPs'} {bwd:g}x"
            cells.append(f"{name}: {v:.4g} ({v / row.published - 1:+.1%})")
        print(f"  {row.metric} (published {row.published:g}): " + ", ".join(cells))


if __name__ == "__main__":
    main()
