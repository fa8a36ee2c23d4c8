"""The task runner: planning, serial vs process pool, resume from part files, frames.

These tests run a small deterministic stand-in for the simulator (a pure
function of the scenario and seed) so that they test the runner's own
mechanics; tests/test_compare.py and tests/test_sweep.py use the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moesim.config.loader import load_scenario
from moesim.errors import UserError
from moesim.explore.runner import Task, load_parts, plan, run_tasks
from moesim.explore.summary import runs_frame, summarize, summary_frame
from moesim.explore.variants import expand

TINY = "scenarios/tiny-cpu.yaml"


def fake_simulate(task: Task) -> dict[str, Any]:
    """Hand-computable result: step time grows with k and the seed."""
    scn = task.scenario
    step = 1e-3 * scn.model.top_k + 1e-6 * task.seed
    cf = scn.router.capacity_factor
    return {
        "scenario": scn.name,
        "hardware": task.hardware.name,
        "seed": task.seed,
        "step_time_s": step,
        "throughput_tokens_per_s": scn.workload.tokens_per_gpu * scn.cluster.num_gpus / step,
        "drop_fraction": 0.0 if cf is None else 0.1 / cf,
        "phases_s": {"gate": step / 10, "experts": step / 2},
        "provenance": {"created": "now"},
    }


def _plan(seeds: int = 1, **axes: tuple) -> list[Task]:
    base = load_scenario(TINY).model_dump(mode="json")
    keys = {"top_k": "model.top_k", "cf": "router.capacity_factor", "hw": "hardware"}
    variants = expand([(keys[k], v) for k, v in axes.items()])
    return plan(base, variants, seeds=seeds, file=TINY).tasks


def test_plan_pairs_profiles_and_seeds() -> None:
    tasks = _plan(seeds=3, top_k=(1, 2), hw=("cpu-local", "h100-sxm"))
    assert len(tasks) == 2 * 2 * 3
    assert [t.seed for t in tasks[:3]] == [0, 1, 2]  # workload.seed + i
    # a plain name is the shipped measured profile (issue 11)
    assert {t.hardware.name for t in tasks} == {"cpu-local", "h100-sxm-measured"}
    assert len({t.key for t in tasks}) == len(tasks)
    again = _plan(seeds=3, top_k=(1, 2), hw=("cpu-local", "h100-sxm"))
    assert [t.key for t in again] == [t.key for t in tasks]  # keys are stable


def test_plan_invalid_variant_raises_or_is_skipped() -> None:
    base = load_scenario(TINY).model_dump(mode="json")
    variants = expand([("parallel.ep", (3, 4))])
    with pytest.raises(UserError, match=r"parallel\.ep = 3"):
        plan(base, variants, file=TINY)
    p = plan(base, variants, file=TINY, skip_invalid=True)
    assert [t.variant.values for t in p.tasks] == [{"parallel.ep": 4}]
    assert p.skipped[0][0].values == {"parallel.ep": 3} and "must divide" in p.skipped[0][1]
    with pytest.raises(UserError, match="hardware"):
        plan(base, expand([("hardware", ("no-such-gpu",))]), file=TINY)


def test_serial_and_pool_give_the_same_records_in_order() -> None:
    tasks = _plan(seeds=2, top_k=(1, 2, 4), cf=(1.0, None))
    serial = run_tasks(tasks, execute=fake_simulate)
    pooled = run_tasks(tasks, jobs=2, execute=fake_simulate)
    assert serial == pooled
    assert [r["key"] for r in serial] == [t.key for t in tasks]
    assert serial[0]["variant"] == {"model.top_k": 1, "router.capacity_factor": 1.0}
    assert serial[0]["result"]["step_time_s"] == pytest.approx(1e-3)


def test_resume_skips_finished_parts_and_gives_the_same_table(tmp_path: Path) -> None:
    tasks = _plan(seeds=2, top_k=(1, 2, 4), cf=(1.0, 2.0))
    keys = ["model.top_k", "router.capacity_factor"]
    full = run_tasks(tasks, parts_dir=tmp_path / "full", execute=fake_simulate)
    # an interrupted run: only the first 5 tasks finished
    parts = tmp_path / "resumed"
    run_tasks(tasks[:5], parts_dir=parts, execute=fake_simulate)
    assert len(list(parts.glob("*.json"))) == 5
    ran: list[str] = []

    def counting(task: Task) -> dict[str, Any]:
        ran.append(task.key)
        return fake_simulate(task)

    calls: list[int] = []
    resumed = run_tasks(
        tasks,
        parts_dir=parts,
        execute=counting,
        progress=lambda n=1, description=None: calls.append(n),
    )
    assert ran == [t.key for t in tasks[5:]]
    assert sum(calls) == len(tasks)
    assert runs_frame(resumed, keys).equals(runs_frame(full, keys))
    assert len(load_parts(parts, tasks)) == len(tasks)


def test_a_corrupt_part_is_run_again(tmp_path: Path) -> None:
    tasks = _plan(top_k=(1, 2))
    run_tasks(tasks, parts_dir=tmp_path, execute=fake_simulate)
    (tmp_path / f"{tasks[1].key}.json").write_text("{not json", encoding="utf-8")
    (tmp_path / f"{tasks[0].key}.json").write_text(json.dumps({"key": "other"}), encoding="utf-8")
    assert load_parts(tmp_path, tasks) == {}
    again = run_tasks(tasks, parts_dir=tmp_path, execute=fake_simulate)
    assert len(again) == 2 and len(load_parts(tmp_path, tasks)) == 2


def test_frames_and_summaries() -> None:
    tasks = _plan(seeds=3, top_k=(1, 2), cf=(1.0, None))
    records = run_tasks(tasks, execute=fake_simulate)
    variants = list({t.variant.index: t.variant for t in tasks}.values())
    keys = ["model.top_k", "router.capacity_factor"]
    runs = runs_frame(records, keys)
    assert len(runs) == 12
    assert list(runs.columns[:6]) == [
        "variant",
        "top_k",
        "capacity_factor",
        "scenario",
        "hardware",
        "seed",
    ]
    assert "phase_gate_s" in runs.columns and "provenance" not in runs.columns
    rows = summarize(variants, records)
    assert [len(s.runs) for s in rows] == [3, 3, 3, 3]
    step = rows[2].stats["step_time_s"]  # k=2, seeds 0,1,2
    assert step.mean == pytest.approx(2e-3 + 1e-6) and step.n == 3 and step.half_width > 0
    summary = summary_frame(rows, keys)
    assert summary["step_time_s"].tolist() == pytest.approx(
        [1.001e-3, 1.001e-3, 2.001e-3, 2.001e-3]
    )
    assert rows[0].to_dict()["result"] == records[0]["result"]
    assert rows[0].to_dict()["stats"]["drop_fraction"]["mean"] == pytest.approx(0.1)
