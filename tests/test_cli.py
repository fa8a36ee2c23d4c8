"""CLI contract: --help everywhere, exit 2 with one line on bad input, profiles table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moesim.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: moesim " + command in capsys.readouterr().out


def test_version_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("moesim ")
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid choice" in err


def test_profiles_lists_every_shipped_profile(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profiles", "--json"]) == 0
    out = capsys.readouterr().out
    for name in (
        "h100-sxm",
        "h200-sxm",
        "h800-sxm",
        "a100-sxm-80gb",
        "b200",
        "mi300x",
        "cpu-local",
    ):
        assert f'"name": "{name}"' in out


def test_profiles_table_in_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "profiles"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "h100-sxm" in proc.stdout and "3,350" in proc.stdout


def test_bad_profile_file_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "profiles"
    bad.mkdir()
    text = (REPO / "hardware_profiles" / "h100-sxm.yaml").read_text()
    (bad / "broken.yaml").write_text(text.replace("link_GBps: 450", "link_GBps: -450"))
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "profiles"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={"MOESIM_PROFILES": str(bad), "PATH": ""},
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "broken.yaml: node.scaleup.link_GBps = -450: Input should be greater than 0" in err
