"""Rich tables for ``moesim simulate``: summary, per-phase and per-layer breakdown."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from moesim.report.tables import console, render

MAX_LAYER_ROWS = 24


def _time(seconds: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns" if seconds else "0"


def _bytes(n: float) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} B"


def summary_table(r: Any) -> Table:
    """The headline numbers (ARCHITECTURE.md#contracts) of one ``SimResult``."""
    d = r.details
    table = Table(title=f"{r.scenario} on {r.hardware} (seed {r.seed})", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("step time", _time(r.step_time_s)),
        ("throughput", f"{r.throughput_tokens_per_s:,.0f} tok/s"),
        ("dispatch (one layer, one micro-batch)", _time(r.dispatch_time_s)),
        ("  of which split-size exchange", _time(d.get("split_exchange_s", 0.0))),
        ("combine (one layer, one micro-batch)", _time(r.combine_time_s)),
        ("all-to-all share of step (exposed)", f"{100 * r.alltoall_fraction:.1f} %"),
        ("dispatch bytes per GPU", _bytes(r.dispatch_bytes_per_gpu)),
        ("dropped assignments", f"{100 * r.drop_fraction:.2f} %"),
        ("expert load imbalance (max/mean)", f"{r.load_imbalance:.2f}x"),
        ("GPU load imbalance (max/mean)", f"{r.gpu_load_imbalance:.2f}x"),
        (
            "GPU compute utilisation (mean/min/max)",
            "/".join(f"{100 * r.gpu_utilization[k]:.0f}%" for k in ("mean", "min", "max")),
        ),
        ("GPUs / EP groups / mode", f"{d['num_gpus']} / {d['ep_groups']} / {d['mode']}"),
        ("dispatcher", f"{d['dispatcher']} ({d['dispatch_dtype']} → {d['combine_dtype']})"),
        ("simulation events", f"{d['sim_events']:,}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def phases_table(r: Any) -> Table:
    """Critical-path seconds per MoE layer, forward and backward, with shares."""
    table = Table(title="Per MoE layer (critical path, mean)", title_justify="left")
    for col in ("phase", "forward", "share", "backward"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    per_layer = {k: v for k, v in r.phases_s.items() if k != "grad_allreduce"}
    total = sum(per_layer.values()) or 1.0
    for name, sec in per_layer.items():
        bwd = r.backward_phases_s.get(name)
        table.add_row(
            name, _time(sec), f"{100 * sec / total:.1f} %", "—" if bwd is None else _time(bwd)
        )
    table.add_row("grad all-reduce (step)", _time(r.phases_s.get("grad_allreduce", 0.0)), "", "")
    return table


def layers_table(r: Any) -> Table:
    """Forward seconds per phase for each MoE layer (first and last when there are many)."""
    table = Table(
        title="Per layer (forward, mean over micro-batches and EP groups)", title_justify="left"
    )
    cols = [
        "layer",
        "dispatch",
        "experts",
        "combine",
        "dense",
        "shared_experts",
        "expert_imbalance",
    ]
    for col in cols:
        table.add_column(col.replace("_", "\n"), justify="right")
    rows = r.layers
    if len(rows) > MAX_LAYER_ROWS:
        half = MAX_LAYER_ROWS // 2
        rows = [*rows[:half], None, *rows[-half:]]
    for row in rows:
        if row is None:
            table.add_row(*["…"] * len(cols))
            continue
        cells = [str(int(row["layer"]))]
        cells += [_time(row[c]) for c in cols[1:-1]]
        cells.append(f"{row['expert_imbalance']:.2f}x")
        table.add_row(*cells)
    return table


def render_result(r: Any, trace_path: str | None = None) -> None:
    """Print the summary, phase and layer tables of a simulation."""
    render(summary_table(r))
    render(phases_table(r))
    render(layers_table(r))
    if trace_path:
        console.print(f"Chrome trace written to {trace_path} (open in https://ui.perfetto.dev)")
