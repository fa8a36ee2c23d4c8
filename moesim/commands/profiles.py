"""``moesim profiles``: the hardware profiles moesim knows, with their key figures."""

from __future__ import annotations

import argparse
import json

from moesim.config.loader import known_profiles, load_hardware


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    profiles = [load_hardware(name) for name in known_profiles()]
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in profiles], indent=1))
        return 0
    from moesim.report.tables import profiles_table, render

    render(profiles_table(profiles))
    return 0
