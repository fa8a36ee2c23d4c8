"""`moesim simulate` on the command line: JSON contract, trace file, bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "scenarios/tiny-cpu.yaml")
HEADLINE_KEYS = {
    "scenario", "hardware", "seed", "step_time_s", "throughput_tokens_per_s",
    "dispatch_time_s", "combine_time_s", "alltoall_fraction", "dispatch_bytes_per_gpu",
    "drop_fraction", "load_imbalance", "gpu_load_imbalance", "phases_s", "provenance",
}  # fmt: skip


def test_json_prints_one_object_with_the_headline_keys(capsys) -> None:
    args = ["--json", "--seed", "3", "--set", "workload.micro_batches=2"]
    assert main(["simulate", TINY, *args]) == 0
    out = capsys.readouterr().out
    d = json.loads(out)
    assert set(d) >= HEADLINE_KEYS
    assert d["seed"] == 3 and d["details"]["micro_batches"] == 2
    assert out.count("\n") == 1


def test_human_output_and_chrome_trace(tmp_path: Path, capsys) -> None:
    trace = tmp_path / "t.json"
    assert main(["simulate", TINY, "--hardware", "h100-sxm", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "step time" in out and "dispatch" in out and "h100-sxm" in out
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    # compute, the all-to-alls, the gradient buckets beside the backward
    assert {e["tid"] for e in spans} == {0, 1, 3}
    names = {(e["tid"], e["args"]["name"]) for e in events if e["name"] == "thread_name"}
    assert {(0, "compute"), (1, "comm"), (3, "comm (sends, gradient buckets)")} <= names
    assert {e["name"] for e in spans if e["tid"] == 3} == {
        "grad_reduce_scatter", "param_all_gather",
    }  # fmt: skip
    assert {e["pid"] for e in spans} == {0, 1, 2, 3}
    assert all(e["dur"] > 0 for e in spans)


def _bad_trace(tmp_path: Path) -> list[str]:
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[0, 1], [3, 99]]))
    return [
        "--set",
        "workload.routing.distribution=trace",
        "--set",
        f"workload.routing.trace={path}",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.top_k=17"], "model.top_k = 17: must be <= num_experts (16)"),
        (["--set", "parallel.ep=8"], "must equal cluster GPUs"),
        (["--set", "router.kind=nope"], "router.kind"),
        (["--hardware", "no-such-gpu"], "no such hardware profile"),
        (["--seed", "-1"], "seed = -1: must be >= 0"),
        ("trace", "expert id 99 out of range; allowed 0..15"),
    ],
)
def test_bad_scenarios_exit_2_with_one_line(args, message, tmp_path: Path, capsys) -> None:
    if args == "trace":
        args = _bad_trace(tmp_path)
    assert main(["simulate", TINY, *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and message in err and "Traceback" not in err


def test_simulating_a_synthetic_load_never_loads_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom moesim.config import load_pair\nfrom moesim.simulate import simulate\n"
        f"simulate(*load_pair({TINY!r}, ['dispatcher=hierarchical']), trace=True)\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
