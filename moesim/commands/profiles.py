"""``moesim profiles``: the hardware profiles moesim knows, with their key figures.

Each name is marked measured (fitted to imported GPU tables), calibrated
(``moesim bench`` on this machine) or spec, with where its figures come from.
A plain name such as ``h200-sxm`` is the measured profile where one is shipped
(``calibrated/h200-sxm-measured.yaml``); ``h200-sxm-spec`` is the spec sheet.
"""

from __future__ import annotations

import argparse
import json

from moesim.config.loader import known_profiles, load_hardware, measured_alias


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    names = known_profiles()
    profiles = [load_hardware(name) for name in names]
    aliases = {n: f"{n}-measured" for n in names if measured_alias(n)}
    if args.json:
        from moesim.report.profile_sources import profile_kind

        out = [
            p.model_dump(mode="json") | {"lookup_name": n, "provenance_kind": profile_kind(p)}
            for n, p in zip(names, profiles, strict=True)
        ]
        print(json.dumps(out, indent=1))
        return 0
    from moesim.report.profile_sources import print_sources
    from moesim.report.tables import profiles_table, render

    render(profiles_table(profiles, names))
    print_sources(names, profiles, aliases)
    return 0
