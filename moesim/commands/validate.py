"""``moesim validate``: predictions against real runs here and against published figures.

``--ep-world N`` (or ``2,4``): calibrate this machine (or take ``--profile``), run
the real expert-parallel layer on N local ranks over a set of configurations,
simulate each and print predicted vs measured per phase and end to end.
``--published``: simulate every cited figure of ``moesim/validation/published.yaml``.
``--pipeline``: a real 2-stage 1F1B pipeline of MoE layers over local gloo ranks
(sends, autograd backward, gradient all-reduce), predicted by parts.
No flag: EP (``--ep-world 2``) and published. ``--json`` prints one JSON object:
the EP contract ``{"cases", "median_abs_error", "max_abs_error"}`` (plus
``"published"`` and ``"pipeline"`` when they run too), or the published report
or the pipeline report alone when only that runs.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moesim.errors import UserError


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
        "--pipeline",
        action="store_true",
        help="a real 2-stage 1F1B pipeline (pp 2 x dp 2 gloo ranks) predicted by parts",
    )
    parser.add_argument(
        "--only", default=None, metavar="TEXT", help="published rows whose id contains TEXT"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="two small EP configurations (a quick smoke run)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per case (default 3)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results/validation"),
        help="where bench results, the calibrated profile and the report JSON go",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    worlds = _worlds(args.ep_world)
    pipeline = bool(getattr(args, "pipeline", False))
    published = args.published or (args.ep_world is None and not pipeline)
    if args.ep_world is None and not args.published and not pipeline:
        worlds = [2]
    _check_counts(args)
    out: dict[str, Any] = {}
    if worlds:
        out.update(_run_ep(args, worlds))
    if published:
        pub = _run_published(args)
        if worlds:
            out["published"] = pub
        else:
            out = pub
    if pipeline:
        pipe = _run_pipeline(args)
        if worlds or published:
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
        context = {"cores": usable_cores(), "loadavg_before": _load()}
        v = ep.validate_ep(world, hw, cases, profile=profile, steps=args.steps, warmup=args.warmup)
        result = v.to_dict()
        context |= {
            "loadavg_after": _load(),
            "interference": v.interference,
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


def _profile(args: argparse.Namespace, cases: list[Any], world: int) -> tuple[Any, str]:
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
        cases, world, out_dir=args.out, progress=None if args.json else progress_bar
    )
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
    hw, profile = _profile(args, [case.layer_case(0)], 1)
    context = {"cores": usable_cores(), "loadavg_before": _load()}
    v = pv.validate_pipeline(case, hw, profile=profile, steps=args.steps, warmup=args.warmup)
    result = v.to_dict() | {"context": context | {"loadavg_after": _load()}}
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
        report = run_published(table, only=args.only).to_dict()
    else:
        from moesim.report.progress import progress_bar

        with progress_bar(len(table.rows), "published figures") as advance:
            report = run_published(table, only=args.only, advance=advance).to_dict()
        from moesim.report.validate_tables import print_published

        print_published(report)
    _save(args.out / f"published-{_stamp()}.json", report)
    return report
