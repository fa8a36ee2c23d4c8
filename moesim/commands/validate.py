"""``moesim validate``: predictions against real runs here and against published figures.

``--ep-world N`` (or ``2,4``): calibrate this machine (or take ``--profile``), run
the real expert-parallel layer on N local ranks over a set of configurations,
simulate each and print predicted vs measured per phase and end to end.
``--published``: simulate every cited figure of ``moesim/validation/published.yaml``.
``--memory``: peak memory of the real MoE layer (forward + backward) measured here
with the profiler's allocator events against the memory model's prediction.
``--pipeline``: a real 2-stage 1F1B pipeline of MoE layers over local gloo ranks
(sends, autograd backward, gradient all-reduce), predicted by parts.
No flag: EP (``--ep-world 2``), published and memory. ``--json`` prints one JSON
object: the EP contract ``{"cases", "median_abs_error", "max_abs_error"}`` (plus
``"published"``, ``"memory"`` and ``"pipeline"`` when they run too), or the one
report alone when only that one is asked for.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moesim.errors import UserError
from moesim.measure.host import cpu_times, steal_since


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ep-world",
        default=None,
        metavar="N[,N...]",
        help="ranks of the real EP layer on this machine, e.g. 2 or 2,4 (1: one device, "
        "no all-to-all: the single-GPU MoE layer on a GPU machine)",
    )
    parser.add_argument(
        "--profile",
        default=None,
        metavar="CALIBRATED.yaml",
        help="calibrated profile of this machine (default: bench and calibrate now)",
    )
    parser.add_argument(
        "--published", action="store_true", help="predict the cited published figures"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="measure the real MoE layer's peak memory here against the prediction",
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="a real 2-stage 1F1B pipeline (pp 2 gloo ranks, tied embeddings) predicted by parts",
    )
    parser.add_argument(
        "--only", default=None, metavar="TEXT", help="published rows whose id contains TEXT"
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="with --published: rows whose source tuned its layout run the same layout "
        "search (minutes per row) instead of the layout it last chose",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="two small EP configurations (a quick smoke run)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per case (default 3)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="times the list of EP cases (or the pipeline) runs; figures are medians over "
        "repeats and their spread is printed (default 3)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/validation"),
        help="where bench results, the calibrated profile and the report JSON go",
    )
    parser.add_argument(
        "--gpu-tables",
        action="store_true",
        help="predicted vs measured per phase on imported GPU tables (H100, H200), "
        "each configuration held out of the fit",
    )
    parser.add_argument(
        "--dynamics",
        nargs="?",
        const="results/dynamics/router-dynamics.parquet",
        default=None,
        metavar="TRACE.parquet",
        help="fit the load dynamics to the first part of each measured run (a "
        "`moesim train-router` trace; default the committed one) and predict the rest",
    )
    parser.add_argument(
        "--capacity-factor",
        default="1.25,2.0",
        metavar="CF[,CF...]",
        help="capacity factors of the predicted drop fraction (--dynamics; default 1.25,2.0)",
    )
    parser.add_argument(
        "--fit-fraction",
        type=float,
        default=0.5,
        help="share of each run's steps the fit sees (--dynamics; default 0.5)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--verbose", action="store_true", help="with --published: each figure's full note"
    )


def run(args: argparse.Namespace) -> int:
    if getattr(args, "gpu_tables", False):
        return _run_gpu_tables(args)
    if args.dynamics is not None:
        return _run_dynamics(args)
    worlds = _worlds(args.ep_world)
    pipeline = bool(getattr(args, "pipeline", False))
    asked_published = args.published or args.search  # --search implies --published
    everything = args.ep_world is None and not asked_published and not args.memory and not pipeline
    published = asked_published or everything
    memory = args.memory or everything
    if everything:
        worlds = [2]
    _check_counts(args)
    out: dict[str, Any] = {}
    if worlds:
        out.update(_run_ep(args, worlds))
    for name, asked, runner in (("published", published, _run_published),
                                ("memory", memory, _run_memory)):  # fmt: skip
        if not asked:
            continue
        report = runner(args)
        if out or worlds or (name == "memory" and published):
            out[name] = report
        else:
            out = report
    if pipeline:
        pipe = _run_pipeline(args)
        if worlds or published or memory:
            out["pipeline"] = pipe
        else:
            out = pipe
    if args.json:
        print(json.dumps(out))
    return 0


def _worlds(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        worlds = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        worlds = []
    if not worlds or any(w < 1 for w in worlds):
        raise UserError(f"--ep-world = {text!r}: expected integers >= 1, e.g. 2 or 2,4")
    return worlds


def _check_counts(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise UserError(f"--steps = {args.steps}: must be >= 1")
    if args.warmup < 0:
        raise UserError(f"--warmup = {args.warmup}: must be >= 0")
    if args.repeats < 1:
        raise UserError(f"--repeats = {args.repeats}: must be >= 1")


# -- the EP layer ------------------------------------------------------------------------


def _run_ep(args: argparse.Namespace, worlds: list[int]) -> dict[str, Any]:
    from moesim.measure.ep_probe import usable_cores
    from moesim.validation import ep

    cases = ep.tiny_cases() if args.tiny else ep.default_cases()
    for world in worlds:
        ep.check_world(world, cases)
    all_cases: list[dict[str, Any]] = []
    for world in worlds:
        hw, profile = _profile(args, cases, world)
        context, cpu_before = {"cores": usable_cores(), "loadavg_before": _load()}, cpu_times()
        v = ep.validate_ep(
            world,
            hw,
            cases,
            profile=profile,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
        )
        result = v.to_dict()
        context |= {
            "loadavg_after": _load(),
            "cpu_steal": steal_since(cpu_before),
            "interference": v.interference,
            "memory_interference": v.memory_interference,
            "cores_kept_awake": v.cores_kept_awake,
        }
        _save(args.out / f"ep-world{world}-{_stamp()}.json", result | {"context": context})
        if not args.json:
            from moesim.report.validate_tables import print_ep

            print_ep(result, world, profile=profile, context=context)
        all_cases += result["cases"]
    errs = sorted(abs(c["error"]) for c in all_cases)
    return {
        "cases": all_cases,
        "median_abs_error": _median(errs),
        "max_abs_error": errs[-1],
    }


def _profile(
    args: argparse.Namespace, cases: list[Any], world: int, extra_grids: Any = None
) -> tuple[Any, str]:
    from moesim.config.loader import load_hardware

    if args.profile:
        hw = load_hardware(args.profile)
        if hw.calibration is None:
            raise UserError(
                f"--profile = {args.profile!r}: not a calibrated profile (no calibration: "
                "section); run `moesim calibrate` first or leave --profile out"
            )
        return hw, str(args.profile)
    from moesim.report.progress import progress_bar
    from moesim.validation.ep import calibrate_here

    hw, path = calibrate_here(
        cases, world, out_dir=args.out, progress=None if args.json else progress_bar,
        extra_grids=extra_grids,
    )  # fmt: skip
    return hw, str(path)


def _median(values: list[float]) -> float:
    import numpy as np

    return float(np.median(values))


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - platform without load averages
        return None


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _save(path: Path, obj: dict[str, Any]) -> None:
    from moesim.io import atomic_write_json, provenance

    atomic_write_json(path, obj | {"provenance": provenance()})


# -- the pipeline ---------------------------------------------------------------------------


def _run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    from moesim.measure.ep_probe import usable_cores
    from moesim.validation import pipeline as pv

    case = pv.tiny_case() if args.tiny else pv.default_case()
    hw, profile = _profile(args, [case.layer_case(0)], 1, pv.bench_extra(case))
    context, cpu_before = {"cores": usable_cores(), "loadavg_before": _load()}, cpu_times()
    runs = [
        pv.validate_pipeline(case, hw, profile=profile, steps=args.steps, warmup=args.warmup)
        for _ in range(args.repeats)
    ]
    after = {"loadavg_after": _load(), "cpu_steal": steal_since(cpu_before)}
    result = pv.median_over_repeats([v.to_dict() for v in runs]) | {"context": context | after}
    _save(args.out / f"pipeline-{_stamp()}.json", result)
    if not args.json:
        from moesim.report.validate_tables import print_pipeline

        print_pipeline(result)
    return result


# -- published figures ------------------------------------------------------------------


def _run_published(args: argparse.Namespace) -> dict[str, Any]:
    from moesim.validation.published import load_published, run_published

    table = load_published()
    if args.json:
        report = run_published(table, only=args.only, search=args.search).to_dict()
    else:
        from moesim.report.progress import progress_bar

        n = sum(args.only is None or args.only in r.id for r in table.rows)
        with progress_bar(max(n, 1), "published figures") as advance:
            report = run_published(
                table, only=args.only, advance=advance, search=args.search
            ).to_dict()
        from moesim.report.validate_tables import print_published

        print_published(report, verbose=args.verbose)
    _save(args.out / f"published-{_stamp()}.json", report)
    return report


# -- peak memory of the real layer ------------------------------------------------------


def _run_memory(args: argparse.Namespace) -> dict[str, Any]:
    from moesim.validation import memory

    cases = memory.tiny_cases() if args.tiny else memory.default_cases()
    if args.json:
        report = memory.validate_memory(cases).to_dict()
    else:
        from moesim.report.progress import progress_bar

        with progress_bar(len(cases), "layer peak memory") as advance:
            report = memory.validate_memory(cases, progress=advance).to_dict()
        from moesim.report.validate_tables import print_memory

        print_memory(report)
    _save(args.out / f"memory-{_stamp()}.json", report)
    return report


# -- imported GPU tables ------------------------------------------------------------------


def _run_gpu_tables(args: argparse.Namespace) -> int:
    from moesim.validation.gpu_tables import validate_gpu_tables

    report = validate_gpu_tables()
    _save(args.out / f"gpu-tables-{_stamp()}.json", report)
    if args.json:
        print(json.dumps(report))
        return 0
    from moesim.report.validate_tables import print_gpu_tables

    print_gpu_tables(report)
    return 0


# -- load dynamics ------------------------------------------------------------------------


def _run_dynamics(args: argparse.Namespace) -> int:
    """``--dynamics``: fitted process vs the rest of each measured run (alone, not with EP)."""
    from moesim.validation.dynamics import validate_dynamics

    if args.ep_world is not None or args.published:
        raise UserError("--dynamics runs alone; leave out --ep-world and --published")
    try:
        cfs = tuple(float(c) for c in args.capacity_factor.split(",") if c.strip())
    except ValueError:
        raise UserError(
            f"--capacity-factor {args.capacity_factor!r}: expected numbers, e.g. 1.25,2.0"
        ) from None
    report = validate_dynamics(args.dynamics, capacity_factors=cfs, fit_fraction=args.fit_fraction)
    _save(args.out / f"dynamics-{_stamp()}.json", report)
    if args.json:
        print(json.dumps(report))
        return 0
    from moesim.report.dynamics_tables import print_dynamics_validation

    print_dynamics_validation(report)
    return 0
