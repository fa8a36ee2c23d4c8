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
        *_memory_rows(r),
        ("dispatcher", f"{d['dispatcher']} ({d['dispatch_dtype']} → {d['combine_dtype']})"),
        ("simulation events", f"{d['sim_events']:,}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _memory_rows(r: Any) -> list[tuple[str, str]]:
    m = r.memory
    if not m:
        return []
    verdict = "fits" if r.fits else "[bold red]DOES NOT FIT[/]"
    return [
        ("peak memory", f"{m['peak_GiB']:.1f} of {m['hbm_GiB']:.1f} GiB: {verdict}"),
        ("  held by", f"GPU {m['peak_gpu']}, pipeline stage {m['peak_stage']}"),
    ]


STEP_PARTS = {
    "compute": "compute (incl. comm SM share)",
    "exposed_ep": "exposed EP all-to-all",
    "exposed_tp": "exposed TP (and expert TP)",
    "exposed_cp": "exposed CP ring",
    "exposed_dp": "exposed DP (gradient sync)",
    "exposed_pp": "exposed PP sends",
    "bubble": "pipeline bubble",
    "optimizer": "optimizer step",
}


def step_table(r: Any) -> Table:
    """Where the step goes: compute, exposed communication per kind, bubble."""
    table = Table(title="Where the step goes", title_justify="left")
    for col in ("part", "critical GPU", "share", "mean over GPUs"):
        table.add_column(col, justify="left" if col == "part" else "right")
    crit = r.step_breakdown_s.get("critical_gpu", {})
    mean = r.step_breakdown_s.get("mean", {})
    step = r.step_time_s or 1.0
    for key, label in STEP_PARTS.items():
        c = crit.get(key, 0.0)
        table.add_row(label, _time(c), f"{100 * c / step:.1f} %", _time(mean.get(key, 0.0)))
    table.add_row("step", _time(r.step_time_s), "100 %", _time(r.step_time_s))
    d, b = r.details, r.bytes_per_gpu
    sched = (
        f"{d.get('pp_schedule')} over {d.get('pp')} ranks, {d.get('micro_batches')} micro-batches"
    )
    table.caption = (
        f"{sched}; bubble {100 * r.bubble_fraction:.1f} % of the step (mean); bytes per GPU: "
        f"{_bytes(b.get('scaleup', 0.0))} scale-up, {_bytes(b.get('network', 0.0))} network"
    )
    return table


def phases_table(r: Any) -> Table:
    """Critical-path seconds per MoE layer, forward and backward, with shares."""
    table = Table(title="Per MoE layer (critical path, mean)", title_justify="left")
    for col in ("phase", "forward", "share", "backward"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    per_layer = {k: v for k, v in r.phases_s.items() if k != "grad_sync"}
    total = sum(per_layer.values()) or 1.0
    from moesim.simulate.ranges import marks

    outside = marks(r.details.get("out_of_range", []))
    for name, sec in per_layer.items():
        bwd = r.backward_phases_s.get(name)
        label = f"{name} ⚠ outside measured range: {outside[name]}" if name in outside else name
        table.add_row(
            label, _time(sec), f"{100 * sec / total:.1f} %", "—" if bwd is None else _time(bwd)
        )
    table.add_row("gradient sync (step, summed)", _time(r.phases_s.get("grad_sync", 0.0)), "", "")
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


PART_TITLES = {
    "params": "parameters",
    "grads": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations (attention, norms, dense FFN)",
    "moe_tokens": "MoE received + returned rows",
    "moe_expert_act": "MoE expert intermediates, router, shared",
    "transient": "backward working set",
    "dispatcher": "dispatcher buffers",
    "kv_cache": "KV cache",
    "reserve": "allocator / framework reserve",
}


def memory_table(r: Any) -> Table:
    """The peak GPU's memory by part, its HBM and whether it fits (red when it does not)."""
    m = r.memory
    verdict = "[green]fits[/]" if r.fits else "[bold red]DOES NOT FIT[/]"
    title = (
        f"Memory: peak {m['peak_GiB']:.1f} of {m['hbm_GiB']:.1f} GiB HBM on GPU "
        f"{m['peak_gpu']}, stage {m['peak_stage']}: {verdict}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for key, value in m["parts_GiB"].items():
        if value > 0:
            table.add_row(PART_TITLES.get(key, key), f"{value:.2f}")
    style = "green" if r.fits else "bold red"
    table.add_row("headroom", f"[{style}]{m['headroom_GiB']:.2f}[/]")
    table.add_row("mean / min over GPUs", f"{m['mean_GiB']:.1f} / {m['min_GiB']:.1f}")
    table.add_row("rows received by one GPU: peak", f"{m['recv_rows_peak']:,.0f}")
    table.add_row("  mean over GPUs", f"{m['recv_rows_mean']:,.0f}")
    table.add_row("  bound (capacity or dropless)", f"{m['recv_rows_bound']:,.0f}")
    inflight = ", ".join(f"{v:g}" for v in m["inflight_micro_batches"][:8])
    table.add_row(f"in flight per stage ({m['schedule']})", inflight)
    return table


def render_result(r: Any, trace_path: str | None = None) -> None:
    """Print the summary, phase, layer and memory tables of a simulation."""
    render(summary_table(r))
    render(step_table(r))
    render(phases_table(r))
    render(layers_table(r))
    if r.memory:
        render(memory_table(r))
    if trace_path:
        console.print(f"Chrome trace written to {trace_path} (open in https://ui.perfetto.dev)")
