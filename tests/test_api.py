"""The Python API (moesim.api): the same numbers as the CLI, results as objects, DataFrames."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import moesim
from moesim import api
from moesim.cli import main
from moesim.config.scenario import Scenario
from moesim.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "scenarios" / "tiny-cpu.yaml"


def _cli_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    out.pop("provenance", None)
    return out


def _plain(result: api.SimResult) -> dict:
    out = result.to_dict()
    out.pop("provenance", None)
    return json.loads(json.dumps(out))


def test_simulate_matches_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    cli = _cli_json(capsys, ["simulate", str(TINY), "--json", "--set", "top_k=1", "--seed", "3"])
    scn = api.load_scenario(TINY, top_k=1)
    assert _plain(api.simulate(scn, seed=3)) == cli


def test_a_path_a_dict_and_a_scenario_load_the_same() -> None:
    from_path = api.load_scenario(TINY, overrides=["router.capacity_factor=1.5"])
    data = from_path.model_dump(mode="json")
    assert api.load_scenario(data) == from_path
    assert api.load_scenario(from_path) == from_path
    assert api.load_scenario(TINY, capacity_factor=1.5) == from_path
    assert api.load_scenario(TINY, **{"router.capacity_factor": 1.5}) == from_path


def test_a_model_config_replaces_the_model_section() -> None:
    base = api.load_scenario(TINY)
    bigger = base.model.model_copy(update={"num_experts": 16, "top_k": 4})
    scn = api.load_scenario(TINY, model=bigger)
    assert scn.model == bigger and scn.router == base.router
    as_dict = api.load_scenario(TINY, model=bigger.model_dump(mode="json"))
    assert as_dict == scn
    assert api.simulate(scn).load_imbalance != api.simulate(base).load_imbalance


def test_bad_input_is_the_clis_one_line_error() -> None:
    with pytest.raises(UserError, match="did you mean top_k"):
        api.load_scenario(TINY, topk=2)
    with pytest.raises(UserError, match=r"model.top_k = 99"):
        api.load_scenario(TINY, top_k=99)
    with pytest.raises(UserError, match="no such hardware profile"):
        api.simulate(TINY, "no-such-gpu")


def test_compare_gives_objects_and_a_frame_equal_to_the_cli(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cli = _cli_json(capsys, ["compare", str(TINY), "--vary", "top_k=1,2", "--json"])
    cmp = api.compare(TINY, {"top_k": [1, 2]})
    assert cmp.axes == ["model.top_k"] == cli["axes"]
    for row, cli_row in zip(cmp.rows, cli["variants"], strict=True):
        got = dict(row.result)
        got.pop("provenance", None)
        cli_row["result"].pop("provenance", None)
        assert json.loads(json.dumps(got)) == cli_row["result"]
    df = cmp.to_frame()
    assert isinstance(df, pd.DataFrame) and list(df["top_k"]) == [1, 2]
    assert df["step_time_s"].tolist() == [r.result["step_time_s"] for r in cmp.rows]
    assert set(cmp.results()) == {"top_k=1", "top_k=2"}


def test_sweep_returns_its_tables_as_frames(tmp_path: Path) -> None:
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(f"name: s\nscenario: {TINY}\naxes:\n  top_k: [1, 2]\n")
    out = api.sweep(sweep_file, out_dir=tmp_path / "out")
    assert isinstance(out.summary, pd.DataFrame) and len(out.summary) == 2
    assert (tmp_path / "out" / "runs.parquet").is_file()


def test_top_level_reexports_are_the_api() -> None:
    assert moesim.load_scenario is api.load_scenario and moesim.compare is api.compare
    assert isinstance(moesim.load_scenario(TINY), Scenario)
