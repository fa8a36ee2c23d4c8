"""Tables for ``moesim validate``: EP layer predicted vs measured, and vs published figures."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from moesim.phases import MOE_LAYER_PHASES as PHASES
from moesim.report.tables import Footnotes, console, render


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"


def _err(e: float, limit: float | None = None) -> str:
    text = f"{e:+.1%}"
    if limit is not None and abs(e) > limit:
        return f"[red]{text}[/red]"
    return text


def ep_table(result: dict[str, Any], world: int) -> Table:
    """One row per case: configuration, measured / predicted end to end (ms), error."""
    table = Table(
        title=f"EP layer on {world} local ranks: predicted vs measured (ms, median of steps)",
        title_justify="left",
    )
    for col in (
        "E",
        "k",
        "tokens/rank",
        "skew",
        "cf",
        "cpu share",
        "re-run",
        "measured",
        "predicted",
        "error",
    ):
        table.add_column(col, justify="right")
    for c in result["cases"]:
        cf = c["capacity_factor"]
        table.add_row(
            str(c["num_experts"]),
            str(c["top_k"]),
            str(c["tokens_per_rank"]),
            f"{c['skew']:g}",
            "—" if cf is None else f"{cf:g}",
            f"{c['cpu_share']:.0%}",
            str(c["disturbed_steps"]),
            _ms(c["measured_s"]),
            _ms(c["predicted_s"]),
            _err(c["error"], 0.25),
        )
    return table


def phase_table(result: dict[str, Any]) -> Table:
    """Per phase, measured / predicted ms of each case (critical rank), and the median error."""
    table = Table(title="Per phase: measured / predicted ms (critical rank)", title_justify="left")
    table.add_column("case", justify="left")
    for p in PHASES:
        table.add_column(p, justify="right")
    for i, c in enumerate(result["cases"]):
        cells = [f"{_ms(c['phases'][p]['measured_s'])} / {_ms(c['phases'][p]['predicted_s'])}"
                 for p in PHASES]  # fmt: skip
        table.add_row(f"{i + 1}: E{c['num_experts']} k{c['top_k']} T{c['tokens_per_rank']}", *cells)
    medians = [_median([c["phases"][p]["error"] for c in result["cases"]]) for p in PHASES]
    table.add_row("median error", *[_err(m, 0.25) for m in medians], style="bold")
    return table


def _median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


#: end-to-end |error| an EP validation run must reach: (median, worst), issue 16
EP_TARGET = (0.05, 0.15)


def print_ep(result: dict[str, Any], world: int, *, profile: str, context: dict[str, Any]) -> None:
    """Both tables, the target line (median <= 5 %, worst <= 15 %) and the machine's load."""
    render(ep_table(result, world))
    render(phase_table(result))
    med, worst = result["median_abs_error"], result["max_abs_error"]
    ok = med <= EP_TARGET[0] and worst <= EP_TARGET[1]
    verdict = "[green]met[/green]" if ok else "[red]missed[/red]"
    console.print(
        f"end-to-end |error|: median {med:.1%} (target <= {EP_TARGET[0]:.0%}), worst "
        f"{worst:.1%} (target <= {EP_TARGET[1]:.0%}): {verdict}"
    )
    counts = _median([c["dispatch_counts_s"] for c in result["cases"]])
    model = _median([c.get("dispatch_counts_predicted_s", 0.0) for c in result["cases"]])
    console.print(
        f"dispatch includes the split-size exchange (all-to-all of per-expert counts): "
        f"median {_ms(counts)} ms measured, {_ms(model)} ms predicted"
    )
    regroup = _median([c.get("experts_regroup_s", 0.0) for c in result["cases"]])
    model = _median([c.get("experts_regroup_predicted_s", 0.0) for c in result["cases"]])
    console.print(
        f"experts include sorting received rows by local expert and back: median "
        f"{_ms(regroup)} ms measured, {_ms(model)} ms predicted (mean over ranks)"
    )
    share = _median([c["cpu_share"] for c in result["cases"]])
    if share < 0.9 * min(1.0, context.get("cores", world) / world):
        console.print(
            f"[yellow]the ranks got only {share:.0%} of a core in their compute phases "
            "(median): other processes shared this machine, so measured times include "
            "their load[/yellow]"
        )
    console.print(
        "re-run: steps measured again because other processes took the cores "
        "(a step's compute got < 85 % of its core share)"
    )
    load = context.get("loadavg_before"), context.get("loadavg_after")
    slow = [c["compute_slowdown"] for c in result["cases"]]
    console.print(
        f"profile: {profile}; {context.get('cores')} usable cores; {world} ranks running "
        f"together, priced per phase: GEMMs x{context.get('interference', 1.0):.2f}, "
        f"memory-bound ops x{context.get('memory_interference', 1.0):.2f}, time sharing "
        f"x{min(slow):.2f}..x{max(slow):.2f}; load average {_load(load[0])} before / "
        f"{_load(load[1])} after the run{_steal(context)}"
    )
    console.print(spread_line(result))
    if context.get("cores_kept_awake"):
        console.print(
            f"cores kept awake while measuring: {context['cores_kept_awake']} idle-priority "
            "spinners, so a rank waiting in gloo wakes without a halted vCPU's delay (they "
            "count in the load average)"
        )


def spread_line(result: dict[str, Any]) -> str:
    """Run-to-run noise: median over cases of each figure's (max - min) / median over repeats."""
    sp = result.get("spread") or {}
    n = result.get("repeats", 1)
    if n < 2 or not sp:
        return "spread over repeats: one repeat (use --repeats N to measure it)"
    phases = ", ".join(f"{p} {v:.0%}" for p, v in sp.items() if p != "step")
    worst = max(c.get("spread", 0.0) for c in result["cases"])
    return (
        f"spread over {n} interleaved repeats ((max - min) / median, median of cases): "
        f"end-to-end {sp['step']:.1%} (worst case {worst:.1%}); per phase: {phases}"
    )


def _load(v: Any) -> str:
    return "?" if v is None else f"{v:.1f}"


def published_table(report: dict[str, Any], notes: Footnotes, *, verbose: bool = False) -> Table:
    """One row per published figure: value, prediction, error; source and note as a footnote."""
    table = Table(title="Predicted vs published figures", title_justify="left")
    table.add_column("figure\n[dim]metric in unit \\[source][/dim]", justify="left")
    table.add_column("published", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("error", justify="right")
    for r in report["rows"]:
        note = f" {r['note']}" if verbose and r.get("note") else ""
        ref = notes.ref(f"{r['source']} <{r['url']}>{note}{_formula(r)}")
        table.add_row(
            f"{r['id']}\n[dim]{r['metric']} in {r['unit']} {escape(ref)}[/dim]",
            _fig(r["published"]),
            _fig(r["predicted"]),
            _err(r["error"], 0.20),
        )
    return table


def _formula(row: dict[str, Any]) -> str:
    formula = row.get("flop_formula")
    return (f" FLOPs: {formula}" if formula else "") + _layout(row)


def _layout(row: dict[str, Any]) -> str:
    """A searched row's layout, and with ``--search`` what the search covered."""
    if not row.get("layout"):
        return ""
    found = row.get("search")
    if found is None:
        return f" Layout (chosen by moesim's search): {row['layout']}."
    same = "the stored one" if found["stored_is_best"] else f"stored: {found['stored_layout']}"
    return (
        f" Layout found: {row['layout']} ({same}); {found['simulated']} of {found['feasible']}"
        f" feasible layouts simulated, {found['grid_points']} grid points."
    )


def _fig(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:,.4g}"


def print_published(report: dict[str, Any], *, verbose: bool = False) -> None:
    """The table, the error summary, then the sources (with each note when ``verbose``)."""
    notes = Footnotes()
    render(published_table(report, notes, verbose=verbose))
    n = len(report["rows"])
    console.print(
        f"|error|: median {report['median_abs_error']:.1%}, worst {report['max_abs_error']:.1%}; "
        f"{report['within_20pct']} of {n} rows within 20 %"
    )
    console.print("sources and notes:" if verbose else "sources (--verbose adds each note):")
    notes.render()


def memory_table(report: dict[str, Any]) -> Table:
    """One row per layer shape: measured and predicted peak (MiB), error, the biggest parts."""
    table = Table(
        title="MoE layer peak memory on this CPU (forward + backward): predicted vs measured",
        title_justify="left",
    )
    for col in ("case", "measured MiB", "predicted MiB", "error", "rows kept", "largest parts"):
        table.add_column(col, justify="left" if col in ("case", "largest parts") else "right")
    limit = report["tolerance"]
    for r in report["cases"]:
        parts = sorted(r["parts_bytes"].items(), key=lambda kv: -kv[1])
        biggest = ", ".join(
            f"{k} {v / 2**20:.1f}" for k, v in parts[:3] if k != "kept_rows_predicted"
        )
        table.add_row(
            r["label"],
            f"{r['measured_bytes'] / 2**20:,.2f}",
            f"{r['predicted_bytes'] / 2**20:,.2f}",
            _err(r["error"], limit),
            f"{r['kept_rows']:,}",
            biggest,
        )
    return table


def print_memory(report: dict[str, Any]) -> None:
    from moesim.report.tables import render

    render(memory_table(report))
    console.print(
        f"|error|: median {report['median_abs_error']:.1%}, worst {report['max_abs_error']:.1%} "
        f"(target {report['tolerance']:.0%}); measured by {report['method']}"
    )


def print_gpu_tables(report: dict[str, Any], limit: float = 0.15) -> None:
    """Predicted vs measured per phase on imported GPU tables (held-out configurations)."""
    table = Table(
        title="Predicted vs measured GPU tables, EP 8, each configuration held out of the fit"
    )
    for col in (
        "system",
        "model",
        "regime",
        "tokens/rank",
        "phase",
        "measured",
        "predicted",
        "error",
    ):
        table.add_column(
            col,
            justify="right" if col in ("tokens/rank", "measured", "predicted", "error") else "left",
        )
    for c in report["cases"]:
        meas = "not measured" if c["measured_s"] is None else f"{c['measured_s'] * 1e6:,.1f} us"
        err = "—" if c["error"] is None else _err(c["error"], limit)
        table.add_row(
            c["system"], c["model"], c["regime"], str(c["tokens_per_rank"]), c["phase"], meas,
            f"{c['predicted_s'] * 1e6:,.1f} us", err,
        )  # fmt: skip
    render(table)
    med = report["median_abs_error"]
    if med is None:
        console.print("no measured case")
        return
    verdict = "met" if med <= limit else "missed"
    console.print(
        f"|error|: median {med:.1%}, worst {report['max_abs_error']:.1%} over "
        f"{report['n_measured']} measured cases; target median <= {limit:.0%}: {verdict}"
    )


PIPE_PARTS = ("forward", "backward", "sends", "bubble", "grad_sync")
_PIPE_LABELS = {
    "forward": "stage compute: forward",
    "backward": "stage compute: backward",
    "sends": "sends (exposed p2p)",
    "bubble": "bubble",
    "grad_sync": "gradient all-reduce",
    "step": "step",
}


def pipeline_table(result: dict[str, Any]) -> Table:
    """One row per part (mean over ranks, median over steps): measured, predicted, error."""
    c = result["case"]
    table = Table(
        title=(
            f"1F1B pipeline, pp {c['stages']} x dp {c['dp']} local gloo ranks, "
            f"{c['layers_per_stage']} MoE layers per stage, {c['micro_batches']} micro-batches "
            f"of {c['tokens']} tokens: predicted vs measured (ms per step, mean over ranks)"
        ),
        title_justify="left",
    )
    for col in ("part", "measured", "predicted", "error"):
        table.add_column(col, justify="left" if col == "part" else "right")
    for p in (*PIPE_PARTS, "step"):
        row = result["parts"][p]
        table.add_row(
            _PIPE_LABELS[p],
            _ms(row["measured_s"]),
            _ms(row["predicted_s"]),
            _err(row["error"], 0.10 if p != "step" else None),
        )
    return table


def print_pipeline(result: dict[str, Any]) -> None:
    """The per-part table, the median error and what the prediction was calibrated from."""
    con = console
    render(pipeline_table(result))
    p2p, bw = result["p2p_fit"], result["backward_factors"]
    con.print(
        f"median |error| over the parts: {result['median_abs_error']:.1%} "
        f"(max {result['max_abs_error']:.1%}); outputs and gradients match one process "
        f"to {result['max_rel_error_vs_reference']:.1e} relative"
    )
    if result.get("repeats", 1) > 1:
        each = " / ".join(f"{r['median_abs_error']:.1%}" for r in result["per_repeat"])
        spread = result["parts"]["step"].get("spread", 0.0)
        con.print(
            f"{result['repeats']} repeats, each measured and predicted from its own window; "
            f"parts are medians over them (median |error| of each repeat: {each}; the "
            f"measured step's spread {spread:.0%}); the fits and factors below are the last's"
        )
    ar = (
        f"; all-reduce fit ({len(p2p['allreduce_fit']['regimes'])} size regimes): held-out "
        f"median |error| {p2p['allreduce_median_abs_error']:.0%}"
        if "allreduce_fit" in p2p
        else ""
    )
    con.print(
        f"gloo costs measured on the run's rank layout: p2p {p2p['latency_s'] * 1e6:,.0f} us + "
        f"bytes / {p2p['bandwidth_Bps'] / 1e9:.2f} GB/s, held-out median |error| "
        f"{p2p['held_out_median_abs_error']:.0%}{ar}"
    )
    con.print(
        f"backward / forward measured here: expert GEMMs {bw['gemm']:.2f}x, memory-bound "
        f"ops {bw['memory']:.2f}x; compute slowdown of each rank {result['compute_slowdown']:.2f}x "
        f"(co-run {result.get('interference', 1.0):.2f} / measured CPU share "
        f"{result['cpu_share']:.0%} x host drift {result.get('host_drift', 1.0):.2f}: the "
        f"layer's expert GEMMs re-timed between the run's steps, together over alone and "
        f"alone over their calibrated price; {result['expected_slowdown']:.2f}x on an idle "
        "host before the run), "
        f"{result['disturbed_steps']} disturbed steps re-run; profile {result['profile']}"
    )
    ctx = result.get("context", {})
    if ctx:
        con.print(
            f"host: {ctx.get('cores')} cores, load average {ctx.get('loadavg_before')} before, "
            f"{ctx.get('loadavg_after')} after (timings on a shared machine are noisy)"
            f"{_steal(ctx)}"
        )


def _steal(context: dict[str, Any]) -> str:
    """``"; the hypervisor took 12% of ..."`` from a validation's context, or ""."""
    from moesim.measure.host import steal_note

    note = steal_note(context.get("cpu_steal"))
    return f"; {note}" if note else ""
