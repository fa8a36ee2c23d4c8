"""`moesim run`: the whole chain on defaults, in a few minutes.

1. quick benchmark of this machine's device (``moesim bench --quick``),
2. calibrate the device's profile from it (``moesim calibrate``),
3. simulate the default scenario on the calibrated profile, on the
   uncalibrated spec of the same device, and on spec GPU profiles (h100-sxm),
4. print the comparison and where the time of one MoE layer goes.

Everything lands under ``--out`` (default ``results/``): the bench file in
``<out>/<device>/<stamp>.parquet`` and the calibrated profile plus the
comparison JSON in ``<out>/run-<stamp>/``.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from moesim.config.hardware import HardwareProfile
from moesim.config.loader import REPO_ROOT, load_hardware, spec_name
from moesim.io import atomic_write_json, provenance
from moesim.measure.host import cpu_times, steal_note, steal_since

if TYPE_CHECKING:
    from moesim.calibrate import CalibrationReport
    from moesim.config.scenario import Scenario
    from moesim.explore.runner import Record

DEFAULT_SCENARIO = "scenarios/tiny-cpu.yaml"
DEFAULT_SUITES = "roofline,gating,dispatch,experts,alltoall"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="quick",
        action="store_true",
        default=True,
        help="small bench grid and time budget (default; about a minute on a laptop CPU)",
    )
    mode.add_argument(
        "--full",
        dest="quick",
        action="store_false",
        help="the full bench grid (longer, better fit)",
    )
    parser.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIO,
        metavar="YAML",
        help=f"scenario to simulate (default {DEFAULT_SCENARIO})",
    )
    parser.add_argument(
        "--hardware",
        default="h100-sxm",
        metavar="A,B",
        help="spec profiles to compare against the calibrated one (default h100-sxm)",
    )
    parser.add_argument(
        "--out", default="results", metavar="DIR", help="output root (default results)"
    )
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="device to bench"
    )
    parser.add_argument(
        "--base",
        metavar="PROFILE",
        help="spec profile to calibrate (default: matched to the device)",
    )
    parser.add_argument(
        "--suite",
        default=DEFAULT_SUITES,
        metavar="A,B",
        help=f"bench suites (default {DEFAULT_SUITES}); families left out fall back to the spec",
    )
    parser.add_argument(
        "--grid", metavar="YAML", help="bench grid overrides (see `moesim bench --grid`)"
    )
    parser.add_argument(
        "--budget", type=float, metavar="S", help="timing budget per bench case in seconds"
    )
    parser.add_argument(
        "--results",
        nargs="+",
        metavar="PARQUET",
        help="skip the bench and calibrate from these results files",
    )
    parser.add_argument("--seed", type=int, help="routing seed (default: the scenario's)")


def run(args: argparse.Namespace) -> int:
    from moesim.config.loader import load_scenario
    from moesim.report.tables import err_console

    start, cpu_before = time.perf_counter(), cpu_times()
    scenario_path = _scenario_path(args.scenario)
    scn = load_scenario(scenario_path)  # bad input fails before a minute of benchmarking
    device = _device(args.device)
    base = _base_profile(args.base, device)
    profiles = _spec_profiles(args.hardware, base, scn, scenario_path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(args.out) / f"run-{stamp}"
    if args.results:
        paths = [Path(p) for p in args.results]
    else:
        err_console.print(f"[bold]1/3 bench[/] {device} ({'quick' if args.quick else 'full'})")
        paths = [_bench(args, device)]
    err_console.print(f"[bold]2/3 calibrate[/] {base.name} from {', '.join(map(str, paths))}")
    profile_path = run_dir / f"{base.name}-calibrated.yaml"
    report = _calibrate(paths, base, profile_path)
    profiles.insert(0, (report.profile.name, report.profile))
    labels = ", ".join(label for label, _ in profiles)
    err_console.print(f"[bold]3/3 simulate[/] {scenario_path} on {labels}")
    results = _simulate(scn, profiles, args.seed)
    _show(report, results, scenario_path)
    steal = steal_since(cpu_before)
    _save(run_dir, scenario_path, paths, profile_path, report, results, steal)
    _where(paths, profile_path, run_dir, time.perf_counter() - start, steal)
    return 0


def _spec_profiles(
    hardware: str, base: HardwareProfile, scn: Scenario, scenario_path: str
) -> list[tuple[str, HardwareProfile]]:
    """``(label, profile)`` of the device's spec and each ``--hardware``, checked against scn."""
    from moesim.config.loader import check_pair
    from moesim.explore.variants import hardware_axis

    profiles = [(f"{base.name} (spec)", base)]
    for name in hardware_axis(hardware)[1]:
        hw = load_hardware(spec_name(name), relative_to=Path(scenario_path).parent)
        profiles.append((f"{hw.name} (spec)", hw))
    for _, hw in profiles:
        check_pair(scn, hw, file=scenario_path)
    return profiles


def _device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _base_profile(name: str | None, device: str) -> HardwareProfile:
    """The spec profile to calibrate: given, matched to the GPU's name, or cpu-local.

    An unknown GPU is refused (exit 2, "pass --base"), as ``moesim calibrate`` does:
    both use :data:`moesim.calibrate.profile.DEVICE_PROFILES`.
    """
    if name is None and device == "cuda":
        import torch

        from moesim.calibrate.profile import base_profile_name

        name = base_profile_name("cuda", torch.cuda.get_device_name())
    return load_hardware(spec_name(name or "cpu-local"))  # the sheet, not a measured profile


def _bench(args: argparse.Namespace, device: str) -> Path:
    from moesim.measure.bench import run_bench
    from moesim.measure.grids import load_grid_file
    from moesim.report.progress import progress_bar

    grids: dict[str, dict[str, list]] = {}  # the quick / full defaults of moesim.measure.grids
    if args.grid:
        for suite, axes in load_grid_file(args.grid).items():
            grids.setdefault(suite, {}).update(axes)
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    return run_bench(
        suites,
        device=device,
        quick=args.quick,
        out_dir=args.out,
        progress=progress_bar,
        grids=grids,
        budget_s=args.budget,
    )


def _calibrate(paths: list[Path], base: HardwareProfile, out: Path) -> CalibrationReport:
    from moesim.calibrate.workflow import calibrate_to

    return calibrate_to(paths, out, base=base)


def _simulate(
    scn: Scenario, profiles: list[tuple[str, HardwareProfile]], seed: int | None
) -> list[Record]:
    """The scenario on each profile, one task each, in order."""
    from moesim.explore.runner import Task, run_tasks
    from moesim.explore.variants import Variant
    from moesim.report.progress import progress_bar

    tasks = []
    for i, (label, hw) in enumerate(profiles):
        s = scn.model_copy(update={"hardware": hw.name})
        tasks.append(Task.make(Variant(i, {"hardware": label}), _seed(scn, seed), s, hw))
    with progress_bar(len(tasks), "simulate") as advance:
        return run_tasks(tasks, progress=advance)


def _seed(scn: Scenario, seed: int | None) -> int:
    return scn.workload.seed if seed is None else seed


#: held-out MAPE a family of the main job's calibration should meet (issue 16)
MAPE_TARGET = 0.10


def _show(report: CalibrationReport, records: list[Record], scenario_path: str) -> None:
    from moesim.explore.summary import summarize
    from moesim.explore.variants import Variant
    from moesim.report.compare_tables import comparison_table, phases_table
    from moesim.report.tables import console, render

    fits = ", ".join(f"{name} {err['mape']:.0%}" for name, err in report.families.items())
    console.print(f"calibration fit error (held-out MAPE): {fits or 'none'}")
    over = [f"{n} {e['mape']:.1%}" for n, e in report.families.items() if e["mape"] > MAPE_TARGET]
    if over:
        console.print(
            f"  [yellow]above the {MAPE_TARGET:.0%} target: {', '.join(over)}[/]; priced by "
            "these fits all the same (no other measured figure here); a full `moesim bench` "
            "then `moesim calibrate` narrows them"
        )
    for line in report.fallbacks:
        console.print(f"  [dim]fallback: {line}[/]")
    variants = [Variant(r["index"], r["variant"]) for r in records]
    rows = summarize(variants, records)
    render(comparison_table(rows, ["hardware"], title=f"{scenario_path}: one step"))
    results = {r["variant"]["hardware"]: r["result"] for r in records}
    render(phases_table(results, title="where the time of one MoE layer goes (forward)"))


def _save(
    run_dir: Path,
    scenario_path: str,
    bench: list[Path],
    profile_path: Path,
    report: CalibrationReport,
    records: list[Record],
    steal: float | None,
) -> None:
    atomic_write_json(
        run_dir / "comparison.json",
        {
            "scenario": scenario_path,
            "bench_results": [str(p) for p in bench],
            "calibrated_profile": str(profile_path),
            "calibration_errors": report.families,
            "fallbacks": report.fallbacks,
            "cpu_steal": steal,
            "variants": [{"variant": r["variant"], "result": r["result"]} for r in records],
            "provenance": provenance(),
        },
    )


def _where(
    bench: list[Path], profile_path: Path, run_dir: Path, wall_s: float, steal: float | None
) -> None:
    from moesim.report.tables import console

    console.print(f"bench results:      {', '.join(map(str, bench))}")
    console.print(f"calibrated profile: {profile_path}  (use: --hardware {profile_path})")
    console.print(f"comparison:         {run_dir / 'comparison.json'}")
    note = steal_note(steal)
    console.print(f"done in {wall_s:.0f} s" + (f"; {note}" if note else ""))


def _scenario_path(text: str) -> str:
    """The scenario as given, or the packaged one when run outside the repository."""
    p = Path(text)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        return str(REPO_ROOT / p)
    return text
