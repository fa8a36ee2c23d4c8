"""`moesim simulate SCENARIO.yaml`: predict step time, all-to-all cost, drops and imbalance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moesim.config.scenario import Scenario


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="scenario YAML file (see scenarios/)")
    parser.add_argument(
        "--hardware",
        metavar="NAME|PATH",
        help="hardware profile name or path (default: scenario's)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="dotted.key=value",
        help="override a scenario field, e.g. router.capacity_factor=1.25 (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: workload.seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--trace", metavar="OUT.json", help="write a Chrome trace (Perfetto) of the first GPUs"
    )
    parser.add_argument(
        "--traffic",
        metavar="DIR",
        help="write traffic.json (one dispatch's GPU x GPU bytes, link utilisation) and heatmaps",
    )


def run(args: argparse.Namespace) -> int:
    from moesim.config.loader import load_pair
    from moesim.io import atomic_write_text
    from moesim.simulate import simulate

    scn, hw = load_pair(args.scenario, args.overrides, args.hardware)
    scn = resolve_trace_path(scn, Path(args.scenario))
    result = simulate(scn, hw, seed=args.seed, trace=bool(args.trace), traffic=bool(args.traffic))
    if args.traffic:
        from moesim.io import atomic_write_json
        from moesim.report.plots import plot_traffic

        atomic_write_json(Path(args.traffic) / "traffic.json", result.traffic)
        plot_traffic(result.traffic or {}, args.traffic)
    if args.trace:
        from moesim.report.trace import chrome_trace_json

        atomic_write_text(args.trace, chrome_trace_json(result))
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    from moesim.report.sim_tables import render_result

    render_result(result, trace_path=args.trace)
    return 0


def resolve_trace_path(scn: Scenario, scenario_file: Path) -> Scenario:
    """A relative trace path that is not found from here is taken relative to the scenario file."""
    routing = scn.workload.routing
    if routing.trace is None or Path(routing.trace).is_absolute() or Path(routing.trace).exists():
        return scn
    candidate = scenario_file.parent / routing.trace
    if not candidate.exists():
        return scn
    new_routing = routing.model_copy(update={"trace": str(candidate)})
    workload = scn.workload.model_copy(update={"routing": new_routing})
    return scn.model_copy(update={"workload": workload})
