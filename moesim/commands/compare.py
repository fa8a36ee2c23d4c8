"""`moesim compare`: one scenario under several variants, side by side.

    moesim compare scenarios/mixtral-8x7b-8xh100.yaml --vary top_k=1,2,4 \\
        --vary router.capacity_factor=1.0,1.25,null --hardware h100-sxm,b200 --seeds 5

Every combination of the ``--vary`` values (and ``--hardware`` profiles) is one
row; ``--json`` prints ``{"variants": [{"variant": {key: value}, "result":
<moesim simulate --json>, ...}], ...}`` on stdout and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from moesim.config.loader import load_scenario
from moesim.explore.variants import Axis, check_axes, hardware_axis, parse_vary
from moesim.io import provenance

if TYPE_CHECKING:
    from moesim.explore.summary import VariantSummary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", metavar="SCENARIO.yaml", help="the base scenario")
    parser.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an axis: a scenario key (dotted path or short name such as top_k, "
        "capacity_factor, ep) and its values as YAML scalars (null = none); repeatable, "
        "the rows are the cartesian product",
    )
    parser.add_argument(
        "--hardware", metavar="A,B", help="hardware profiles (names or paths) as another axis"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed override of the base scenario (dotted path), repeatable",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="routing seeds per variant: mean ± 95%% interval (default 1)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=0,
        metavar="N",
        help="parallel processes (default 0 = all cores when there are 16+ runs)",
    )
    add_feasible_only(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def add_feasible_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feasible-only",
        action="store_true",
        help="drop the variants in which some GPU exceeds its HBM (at any seed)",
    )


def axes_from_args(args: argparse.Namespace) -> list[Axis]:
    axes = [parse_vary(text) for text in args.vary]
    if args.hardware:
        axes.append(hardware_axis(args.hardware))
    check_axes(axes)
    return axes


def compare(
    args: argparse.Namespace, *, show_progress: bool
) -> tuple[list[str], list[VariantSummary]]:
    """Run every variant; returns the varied keys and one summary per variant."""
    from moesim import api
    from moesim.report.progress import progress_bar

    axes = axes_from_args(args)
    base = load_scenario(args.scenario, args.set)
    planned = api.plan_comparison(base, axes, seeds=args.seeds, file=args.scenario)
    with progress_bar(len(planned.plan.tasks), "simulating", enabled=show_progress) as advance:
        result = api.run_comparison(planned, jobs=args.jobs, progress=advance)
    return result.axes, result.rows


def drop_infeasible(
    rows: list[VariantSummary], feasible_only: bool, *, quiet: bool
) -> tuple[list[VariantSummary], list[VariantSummary]]:
    """``(rows shown, rows dropped)``; prints one line per dropped variant unless ``quiet``."""
    if not feasible_only:
        return rows, []
    from moesim.explore.summary import feasible

    kept, dropped = feasible(rows)
    if dropped and not quiet:
        from moesim.report.tables import err_console

        for s in dropped:
            peak = s.result.get("memory", {}).get("peak_GiB", float("nan"))
            err_console.print(
                f"[red]does not fit[/] {s.variant.label()}: peak {peak:.1f} GiB, "
                f"P(OOM) {100 * s.p_oom:.0f} % over {len(s.runs)} seed(s)"
            )
    return kept, dropped


def to_json(
    args: argparse.Namespace,
    keys: list[str],
    rows: list[VariantSummary],
    dropped: list[VariantSummary] | None = None,
) -> dict[str, Any]:
    return {
        "scenario": args.scenario,
        "axes": keys,
        "seeds": args.seeds,
        "variants": [s.to_dict() for s in rows],
        "infeasible_dropped": [s.variant.label() for s in dropped or []],
        "provenance": provenance(),
    }


def run(args: argparse.Namespace) -> int:
    keys, rows = compare(args, show_progress=not args.json)
    rows, dropped = drop_infeasible(rows, args.feasible_only, quiet=args.json)
    if args.json:
        json.dump(to_json(args, keys, rows, dropped), sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    from moesim.explore.metrics import table_metrics
    from moesim.report.compare_tables import comparison_table
    from moesim.report.tables import render

    metrics = table_metrics([s.result for s in rows])
    title = f"{args.scenario}: {len(rows)} variants"
    if "dyn_mean_step_time_s" in metrics:
        steps = rows[0].result["dynamics"]["summary"]["steps"]
        title += f", over the first {steps} steps (step time: the static first step)"
    table = comparison_table(rows, keys, title=title, metrics=metrics)
    render(table, key_columns=max(1, len(keys)))
    return 0
