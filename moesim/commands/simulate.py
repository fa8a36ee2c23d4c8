"""`moesim simulate SCENARIO.yaml`: predict step time, all-to-all cost, drops and imbalance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moesim.config.scenario import Scenario
from moesim.errors import ConfigError


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
    parser.add_argument(
        "--steps",
        type=int,
        metavar="N",
        help="simulate N training steps with per-step loads (workload.routing.dynamics): "
        "a time series and its summary",
    )
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
    from moesim import api
    from moesim.io import atomic_write_text

    overrides = list(args.overrides)
    if args.steps is not None:
        if args.steps < 1:
            from moesim.errors import UserError

            raise UserError(f"--steps {args.steps}: must be >= 1")
        overrides.append(f"workload.routing.dynamics.steps={args.steps}")
    scn = api.load_scenario(args.scenario, overrides=overrides)
    scn = resolve_dynamics_trace(scn, Path(args.scenario))
    try:
        result = api.simulate(
            scn,
            args.hardware,
            seed=args.seed,
            trace=bool(args.trace),
            traffic=bool(args.traffic),
            file=args.scenario,
        )
    except ConfigError as err:  # placement / dynamics problems found while simulating
        raise (err.with_file(args.scenario) if err.file is None else err) from None
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
    from moesim.report.dynamics_tables import render_dynamics

    render_dynamics(result)
    return 0


def resolve_dynamics_trace(scn: Scenario, scenario_file: Path) -> Scenario:
    """A relative dynamics trace not found from here is taken relative to the scenario file."""
    dyn = scn.workload.routing.dynamics
    if dyn.trace is None or Path(dyn.trace).is_absolute() or Path(dyn.trace).exists():
        return scn
    candidate = scenario_file.parent / dyn.trace
    if not candidate.exists():
        return scn
    routing = scn.workload.routing.model_copy(
        update={"dynamics": dyn.model_copy(update={"trace": str(candidate)})}
    )
    workload = scn.workload.model_copy(update={"routing": routing})
    return scn.model_copy(update={"workload": workload})
