"""ARCHITECTURE.md#layers: torch stays out of the simulator, rich/matplotlib in report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "moesim"
IMPORT = r"^\s*(import {0}|from {0}[ .])"


def _files_importing(module: str, root: Path) -> list[str]:
    pattern = re.compile(IMPORT.format(re.escape(module)), re.M)
    return sorted(
        str(p.relative_to(PKG.parent))
        for p in root.rglob("*.py")
        if pattern.search(p.read_text(encoding="utf-8"))
    )


@pytest.mark.parametrize("package", ["simulate", "calibrate", "costs", "config", "model"])
def test_torch_free_packages_have_no_torch_import_lines(package: str) -> None:
    assert _files_importing("torch", PKG / package) == []


@pytest.mark.parametrize("package", ["simulate", "calibrate", "costs", "config", "model"])
def test_torch_free_packages_do_not_load_torch(package: str) -> None:
    code = (
        f"import sys, pkgutil, importlib, moesim.{package} as p\n"
        "for m in pkgutil.walk_packages(p.__path__, p.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", ["rich", "matplotlib"])
def test_rendering_libraries_only_in_report(module: str) -> None:
    outside = [f for f in _files_importing(module, PKG) if not f.startswith("moesim/report/")]
    assert outside == []


def test_cli_help_does_not_load_torch() -> None:
    """`moesim --help` must be instant: subcommands import heavy modules lazily."""
    code = (
        "import sys\nfrom moesim.cli import build_parser\nbuild_parser()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
