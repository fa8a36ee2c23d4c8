"""Tables for people: 80 columns, names never cut, footnotes, quiet broken pipes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from moesim.cli import main
from moesim.config.loader import known_profiles
from moesim.report.tables import Footnotes, render, split_columns

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "scenarios" / "tiny-cpu.yaml")


def _moesim(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(
        [sys.executable, "-m", "moesim", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=env,
    )


def _wide_table(n: int) -> Table:
    table = Table(title="t")
    table.add_column("name")
    for i in range(n):
        table.add_column(f"col{i:02d}", justify="right")
    table.add_row("a-long-profile-name", *[f"{i * 1000:,}" for i in range(n)])
    return table


def test_a_wide_table_splits_into_groups_that_repeat_the_key_and_fit() -> None:
    out = io.StringIO()
    con = Console(file=out, width=60, highlight=False)
    render(_wide_table(12), out=con)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 60
    assert text.count("a-long-profile-name") == len(split_columns(_wide_table(12), 60)) >= 2
    for i in range(12):  # every column, whole, exactly once
        assert text.count(f"col{i:02d}") == 1 and f"{i * 1000:,}" in text
    assert "t (continued)" in text


def test_a_table_that_fits_is_one_table() -> None:
    assert len(split_columns(_wide_table(2), 80)) == 1


def test_footnotes_number_once_and_wrap_under_their_number() -> None:
    notes = Footnotes()
    assert notes.ref("alpha " * 20) == "[1]"
    assert notes.ref("beta") == "[2]"
    assert notes.ref("alpha " * 20) == "[1]"
    lines = notes.lines(40)
    assert lines[0].startswith("[1] alpha") and lines[1].startswith("    alpha")
    assert lines[-1] == "[2] beta" and all(len(line) <= 40 for line in lines)


def test_profiles_at_80_columns_shows_every_name_whole() -> None:
    proc = _moesim("profiles")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    names = {line.split("│")[1].strip() for line in lines if line.startswith("│")}
    assert set(known_profiles()) <= names  # cpu-local and cpu-local-calibrated both


def test_published_validation_is_short_with_numbered_sources(tmp_path: Path) -> None:
    proc = _moesim("validate", "--published", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    too_wide = [line for line in lines if len(line) > 80]
    assert all(len(line.split()) == 1 for line in too_wide)  # only a URL nobody may cut
    assert len(lines) < 180  # 25 rows: ~155 lines; ~1,500 with the notes wrapped a word a line
    rows = [line for line in lines if line.startswith("[")]
    assert rows[0].startswith("[1] ") and any(line.startswith("[19] ") for line in rows)


def test_simulate_into_a_closed_pipe_exits_0_quietly() -> None:
    cmd = f"'{sys.executable}' -m moesim simulate '{TINY}' | head -1"
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("tiny-cpu on cpu-local")


def test_help_describes_the_tool_for_users(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Mixture-of-Experts" in out and "moesim profiles" in out
    assert "``" not in out  # no developer docstring markup


def test_short_set_keys_work_like_vary_keys(capsys: pytest.CaptureFixture[str]) -> None:
    outs = []
    for key in ("top_k", "model.top_k"):
        assert main(["simulate", TINY, "--json", "--set", f"{key}=1"]) == 0
        outs.append(capsys.readouterr().out.split('"provenance"')[0])
    assert outs[0] == outs[1]
    assert main(["simulate", TINY, "--json"]) == 0
    assert capsys.readouterr().out.split('"provenance"')[0] != outs[0]  # top_k 2 -> 1 matters
    assert main(["simulate", TINY, "--set", "topk=1"]) == 2
    assert "did you mean top_k" in capsys.readouterr().err


def _bench_frame() -> tuple[object, dict]:
    import pandas as pd

    long_status = "error: RuntimeError: out of memory while allocating 12.5 GiB " * 2
    rows = []
    for op, strategy in [("permute", "sort_padded"), ("unpermute", "index_add")]:
        for i, median in enumerate([2.01e-4, 3.72e-3, 6.14e-1]):
            rows.append(
                {
                    "suite": "dispatch",
                    "op": op,
                    "strategy": strategy,
                    "split": "",
                    "dtype": "fp32",
                    "status": long_status if i == 2 else "ok",
                    "median_s": median,
                    "pct_of_ceiling": 20.0 + i,
                    "ceiling": "copy",
                    "achieved_GBps": 5.71 + i,
                }
            )
    return pd.DataFrame(rows), {"device_name": "AMD EPYC", "device": "cpu", "complete": True}


def test_bench_table_keeps_case_names_and_ranges_whole_at_80_columns() -> None:
    from moesim.report.bench_tables import summary_table

    df, meta = _bench_frame()
    out = io.StringIO()
    con = Console(file=out, width=80, highlight=False)
    notes = Footnotes()
    render(summary_table(df, meta, notes=notes), out=con)
    notes.render(con)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "dispatch permute sort_padded" in text and "dispatch unpermute index_add" in text
    assert "201µs–3.72ms" in text  # the range of the ok cases, not clipped
    assert "1 [1]" in text and "[1] error: RuntimeError: out of memory" in text
