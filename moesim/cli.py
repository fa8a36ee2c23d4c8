"""``moesim`` command line: parse, load, call the library, render.

Each subcommand lives in :mod:`moesim.commands` as a module with
``add_arguments(parser)`` and ``run(args) -> int``. Exit codes: 0 success,
2 bad input (one line on stderr, no traceback), 1 internal error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from moesim import __version__
from moesim.errors import UserError

#: subcommand -> one-line help; the module is moesim.commands.<name>
COMMANDS: dict[str, str] = {
    "run": "the whole chain on defaults: bench, calibrate, simulate, compare",
    "bench": "time real gating, dispatch, expert and all-to-all kernels on this device",
    "calibrate": "fit cost models to bench results and write a calibrated profile",
    "simulate": "predict step time, all-to-all cost, drops and imbalance for a scenario",
    "compare": "one scenario under several variants, side by side",
    "sweep": "a grid of variants from a sweep file: table, CSV/parquet and plots",
    "validate": "predicted vs measured on this machine and vs published figures",
    "profiles": "list hardware profiles with their key figures",
    "import": "import public measured GPU kernel tables (aiconfigurator) as results",
    "train-router": "train a small MoE on CPU under balancing schemes; record per-step loads",
}
#: subcommands whose module name differs from the command (``import`` is a keyword)
MODULES: dict[str, str] = {"import": "importer"}


DESCRIPTION = """\
Plan Mixture-of-Experts training and serving clusters before you rent them.

moesim times the real MoE kernels (gating, token dispatch, expert GEMMs,
all-to-all) on the machine you have, fits cost models to those timings, and
simulates a multi-GPU cluster step by step: step time, all-to-all cost,
dropped tokens and load imbalance, for any model, router and parallel layout.
"""

EPILOG = """\
start here:
  moesim run                            measure this machine, then compare
  moesim simulate scenarios/mixtral-8x7b-8xh100.yaml --set top_k=1
  moesim compare SCENARIO --vary top_k=1,2 --hardware h100-sxm,h800-sxm
  moesim profiles                       the names --hardware takes
  moesim import aiconfigurator --system h200_sxm   measured GPU kernel tables

"moesim COMMAND --help" explains each command. Exit codes: 0 ok, 2 bad input
(one line on stderr naming the file, field and value), 1 internal error.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="moesim",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moesim {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(
            f"moesim.commands.{MODULES.get(name, name.replace('-', '_'))}"
        )
        sub = subs.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UserError as err:
        print(f"moesim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moesim {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _quiet_broken_pipe() -> int:
    """A reader closed our stdout (``moesim ... | head``): stop quietly with status 0.

    stdout is pointed at /dev/null so that Python's final flush cannot fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


if __name__ == "__main__":
    sys.exit(main())
