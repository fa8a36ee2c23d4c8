"""`moesim simulate SCENARIO.yaml`: predict step time, all-to-all cost, drops and imbalance."""

from __future__ import annotations

import argparse
import json


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
        help="override a scenario field: dotted path or short name, e.g. "
        "router.capacity_factor=1.25 or top_k=2 (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="random seed (default: workload.seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--trace", metavar="OUT.json", help="write a Chrome trace (Perfetto) of the first GPUs"
    )


def run(args: argparse.Namespace) -> int:
    from moesim import api
    from moesim.io import atomic_write_text

    scn = api.load_scenario(args.scenario, overrides=args.overrides)
    result = api.simulate(
        scn, args.hardware, seed=args.seed, trace=bool(args.trace), file=args.scenario
    )
    if args.trace:
        from moesim.report.trace import chrome_trace_json

        atomic_write_text(args.trace, chrome_trace_json(result))
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    from moesim.report.sim_tables import render_result

    render_result(result, trace_path=args.trace)
    return 0
