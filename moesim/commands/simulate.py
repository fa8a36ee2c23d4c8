"""`moesim simulate` (not implemented yet)."""

from __future__ import annotations

import argparse

from moesim.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise UserError("'moesim simulate' is not implemented yet")
