"""`moesim compare`: numbers equal individual `moesim simulate --json` runs; tables read well."""

from __future__ import annotations

import json
import math

import pytest

from moesim.cli import main
from moesim.explore.metrics import METRICS
from moesim.explore.stats import Estimate
from moesim.report.compare_tables import best_rows, delta_text, human, sig3

TINY = "scenarios/tiny-cpu.yaml"


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def _numbers(result: dict) -> dict:
    """Everything of a simulate result except provenance (timestamps, hostnames)."""
    return {k: v for k, v in result.items() if k != "provenance"}


def test_compare_json_equals_individual_simulate_runs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", TINY, "--vary", "top_k=1,2", "--vary", "router.capacity_factor=1.25,null"]
    doc = _json(capsys, [*argv, "--hardware", "cpu-local,h100-sxm", "--json"])
    assert doc["axes"] == ["model.top_k", "router.capacity_factor", "hardware"]
    assert len(doc["variants"]) == 8
    first = doc["variants"][0]["variant"]
    assert first == {"model.top_k": 1, "router.capacity_factor": 1.25, "hardware": "cpu-local"}
    for row in doc["variants"]:
        v = row["variant"]
        single = _json(
            capsys,
            [
                "simulate",
                TINY,
                "--json",
                "--hardware",
                v["hardware"],
                "--set",
                f"model.top_k={v['model.top_k']}",
                "--set",
                f"router.capacity_factor={json.dumps(v['router.capacity_factor'])}",
            ],
        )
        assert _numbers(row["result"]) == _numbers(single)


def test_compare_seeds_give_mean_and_interval(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _json(capsys, ["compare", TINY, "--vary", "top_k=1,2", "--seeds", "3", "--json"])
    row = doc["variants"][1]
    assert row["seeds"] == [0, 1, 2] and len(row["runs"]) == 3
    steps = [r["step_time_s"] for r in row["runs"]]
    stats = row["stats"]["step_time_s"]
    assert stats["mean"] == pytest.approx(sum(steps) / 3)
    assert stats["n"] == 3 and stats["ci95_low"] < stats["mean"] < stats["ci95_high"]
    assert row["result"] == row["runs"][0]  # the scenario's own seed first
    seed1 = _json(capsys, ["simulate", TINY, "--json", "--set", "model.top_k=2", "--seed", "1"])
    assert _numbers(row["runs"][1]) == _numbers(seed1)


def test_compare_table_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compare", TINY, "--vary", "capacity_factor=1.0,null", "--vary", "top_k=1,2"]
    assert main([*argv, "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    for text in (
        "capacity_factor",
        "top_k",
        "throughput",
        "step time",
        "all-to-all",
        "dropped",
        "null",
        "tok/s",
        "ms",
        "pp",
    ):
        assert text in out, text
    assert out.count("\n") > 8


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--vary", "topk=1,2"], "valid keys: "),
        (["--vary", "model.experts=8"], "valid keys: "),
        (["--vary", "top_k"], "expected key=v1,v2"),
        (["--vary", "top_k=64"], "model.top_k = 64"),
        (["--vary", "ep=3"], "parallel.ep = 3"),
        (["--hardware", "no-such-gpu"], "known names"),
        (["--vary", "top_k=1", "--vary", "model.top_k=2"], "given twice"),
        (["--seeds", "0"], "--seeds"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert main(["compare", TINY, *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_key_lists_the_short_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", TINY, "--vary", "capacity=1,2"]) == 2
    err = capsys.readouterr().err
    for key in ("top_k", "capacity_factor", "ep", "tokens_per_gpu", "dispatcher", "hardware"):
        assert key in err


# -- formatting -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "unit", "half", "text"),
    [
        (1234567.0, "tokens_per_s", 0.0, "1.23 M tok/s"),
        (45600.0, "tokens_per_s", 0.0, "45.6 k tok/s"),
        (0.0123, "seconds", 0.0, "12.3 ms"),
        (0.0123, "seconds", 0.00046, "12.3 ± 0.5 ms"),
        (4.56e-5, "seconds", 0.0, "45.6 µs"),
        (0.0123, "seconds", 1e-6, "12.3 ms"),  # an interval below the last digit is left out
        (2.5, "seconds", 0.0, "2.50 s"),
        (0.1234, "fraction", 0.0, "12.3%"),
        (0.0, "fraction", 0.0, "0%"),
        (1.5, "ratio", 0.0, "1.50×"),
        (3.2e9, "bytes", 0.0, "3.20 GB"),
        (math.nan, "seconds", 0.0, "—"),
    ],
)
def test_human_units(value: float, unit: str, half: float, text: str) -> None:
    assert human(value, unit, half) == text  # type: ignore[arg-type]


def test_sig3() -> None:
    assert [sig3(x) for x in (123456.0, 12.345, 1.0, 0.012345, 0.0)] == [
        "123456",
        "12.3",
        "1.00",
        "0.0123",
        "0",
    ]


def test_deltas_and_best() -> None:
    thr, drop = METRICS["throughput_tokens_per_s"], METRICS["drop_fraction"]
    ref = Estimate(100.0, 0.0, 1)
    up = delta_text(thr, Estimate(110.0, 0.0, 1), ref)
    assert up.plain == "+10.0 %" and up.style == "green"
    step = METRICS["step_time_s"]
    assert delta_text(step, Estimate(110.0, 0.0, 1), ref).style == "red"
    assert delta_text(drop, Estimate(0.05, 0, 1), Estimate(0.10, 0, 1)).plain == "-5.0 pp"
    assert delta_text(thr, Estimate(2500.0, 0, 1), ref).plain == "×25.0"
    assert delta_text(step, Estimate(0.5, 0, 1), ref).plain == "÷200"
    noisy = delta_text(thr, Estimate(101.0, 5.0, 3), Estimate(100.0, 5.0, 3))
    assert noisy.plain.startswith("≈")
    ests = [Estimate(v, 0.0, 1) for v in (3.0, 5.0, 5.0, 1.0)]
    assert best_rows(thr, ests) == {1, 2}
    assert best_rows(step, ests) == {3}
    assert best_rows(step, [Estimate(0.0, 0, 1)] * 3) == set()  # all equal: nothing stands out
