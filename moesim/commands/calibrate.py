"""``moesim calibrate RESULTS... --out PROFILE.yaml [--base SPEC]``: fit, report, write.

Fits cost curves to bench results, prints the held-out error per op family
(or, with ``--json``, exactly ``{"profile": PATH, "families": {...}}``) and
writes a calibrated hardware profile that ``moesim simulate --hardware PATH``
accepts. Suites missing from the results are priced from the base profile's
spec values and listed in ``calibration.fallbacks``; ``--strict`` makes them
an error instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moesim.errors import UserError

#: held-out MAPE target per family, by device kind (issue 5); imported tables (issue 11)
MAPE_TARGET = {"cpu": 0.10, "cuda": 0.05, "imported": 0.10}
#: seconds a calibration from a --quick bench may take
TIME_TARGET_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="bench results files (.parquet/.csv) or directories (newest .parquet in each)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="profile to write (default hardware_profiles/calibrated/<base>-calibrated.yaml)",
    )
    parser.add_argument(
        "--base",
        default=None,
        metavar="SPEC_PROFILE",
        help="spec profile (name or path) for the figures calibration does not measure; "
        "default cpu-local for CPU results, else chosen by the device name",
    )
    parser.add_argument("--name", default=None, help="profile name (default: the --out stem)")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="fail if a suite is missing instead of falling back to spec values",
    )
    parser.add_argument(
        "--strategy",
        action="append",
        default=[],
        metavar="FAMILY=NAME",
        help="price FAMILY (permute, unpermute, experts, ...) by one measured strategy "
        "instead of the fastest per shape, e.g. experts=loop (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print the error summary as JSON")


def run(args: argparse.Namespace) -> int:
    from moesim.calibrate import calibrate, write_profile
    from moesim.calibrate.profile import base_profile_name, peek_device
    from moesim.config.loader import load_hardware, spec_name

    device, device_name = peek_device(args.results)
    # the spec profile by default (a plain name may resolve to a shipped measured one)
    base = load_hardware(args.base or spec_name(base_profile_name(device, device_name)))
    imported = _imported(args.results)
    suffix = "measured" if imported else "calibrated"
    out: Path = args.out or Path("hardware_profiles/calibrated") / f"{base.name}-{suffix}.yaml"
    if out.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out = {str(out)!r}: must be a .yaml file")
    report = calibrate(
        args.results,
        base=base,
        name=args.name or out.stem,
        strict=args.strict,
        strategies=_strategies(args.strategy),
    )
    try:
        write_profile(report.profile, out)
    except OSError as err:
        raise UserError(f"--out = {str(out)!r}: cannot write ({err.strerror or err})") from None
    if args.json:
        print(json.dumps(report.to_json(out)))
        return 0
    from moesim.report.calibrate_tables import print_calibration

    kind = "imported" if imported else "cpu" if device.startswith("cpu") else "cuda"
    target = MAPE_TARGET[kind]
    print_calibration(report, out, mape_target=target, time_target_s=TIME_TARGET_S)
    return 0


def _imported(paths: list[Path]) -> bool:
    """Whether the results are imported tables (``moesim import``), not local measurements."""
    from moesim.calibrate import results

    df, _, _ = results.load(list(paths))
    return "source" in df and bool((df["source"].astype(str) != "").any())


def _strategies(items: list[str]) -> dict[str, str]:
    """``["experts=loop"]`` -> ``{"experts": "loop"}``; a malformed item is a UserError."""
    out = {}
    for item in items:
        family, sep, name = item.partition("=")
        if not sep or not family or not name:
            raise UserError(f"--strategy = {item!r}: expected FAMILY=NAME, e.g. experts=loop")
        out[family.strip()] = name.strip()
    return out
