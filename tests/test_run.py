"""`moesim run` end to end on a tiny bench grid: bench -> calibrate -> simulate -> compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moesim.cli import main
from moesim.config.loader import load_hardware

#: a few milliseconds of measuring: enough rows (>= 3) to fit copy, GEMM and gating
TINY_GRID = {
    "roofline": {"copy_MiB": [0.25, 0.5, 1.0], "gemm": [32, 64, 128]},
    "gating": {"T": [64, 128, 256], "D": [64], "E": [8], "K": [2], "routers": ["softmax_topk"]},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One `moesim run` on the tiny grid: (results dir, exit code, stdout)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("run")
    grid = tmp / "grid.yaml"
    grid.write_text(yaml.safe_dump(TINY_GRID), encoding="utf-8")
    argv = [
        "run",
        "--out",
        str(tmp / "results"),
        "--device",
        "cpu",
        "--suite",
        "roofline,gating",
        "--grid",
        str(grid),
        "--budget",
        "0.002",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # rich's console writes to the current sys.stdout
        code = main(argv)
    return tmp / "results", code, out.getvalue()


def test_run_end_to_end(tiny_run: tuple[Path, int, str]) -> None:
    results, code, out = tiny_run
    assert code == 0
    expected = [
        "cpu-local-calibrated",
        "cpu-local (spec)",
        "h100-sxm (spec)",
        "throughput",
        "where the time",
        "experts",
        "dispatch",
        "calibrated profile:",
        "--hardware",
    ]
    for text in expected:
        assert text in out, text
    (bench,) = (results / "cpu").glob("*.parquet")
    (run_dir,) = results.glob("run-*")
    profile = load_hardware(str(run_dir / "cpu-local-calibrated.yaml"))
    assert profile.calibration is not None and "gating" in profile.calibration.errors
    doc = json.loads((run_dir / "comparison.json").read_text())
    assert doc["bench_results"] == [str(bench)]
    labels = [v["variant"]["hardware"] for v in doc["variants"]]
    assert labels == ["cpu-local-calibrated", "cpu-local (spec)", "h100-sxm (spec)"]
    steps = [v["result"]["step_time_s"] for v in doc["variants"]]
    assert all(s > 0 for s in steps) and steps[2] < steps[1]  # an H100 beats the CPU estimate
    assert set(doc["variants"][0]["result"]["phases_s"]) >= {"gate", "dispatch", "experts"}


def test_run_reuses_results_and_takes_a_scenario(
    tmp_path: Path, tiny_run: tuple[Path, int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    (bench,) = (tiny_run[0] / "cpu").glob("*.parquet")
    argv = [
        "run",
        "--results",
        str(bench),
        "--out",
        str(tmp_path / "again"),
        "--scenario",
        "scenarios/mixtral-8x7b-8xh100.yaml",
        "--hardware",
        "h100-sxm,b200",
        "--base",
        "cpu-local",
    ]
    # mixtral needs 8 GPUs per node; the CPU profile has 4: a clear input error, not a crash
    assert main(argv) == 2
    assert "gpus_per_node" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()  # failed before writing anything
    argv[argv.index("scenarios/mixtral-8x7b-8xh100.yaml")] = "scenarios/tiny-cpu.yaml"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "b200 (spec)" in out and not list((tmp_path / "again").glob("cpu/*.parquet"))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--scenario", "nope.yaml"], "nope.yaml"),
        (["--hardware", "no-such-gpu"], "no-such-gpu"),
        (["--suite", "bogus", "--device", "cpu"], "bogus"),
        (["--results", "missing.parquet", "--device", "cpu"], "missing.parquet"),
    ],
)
def test_run_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert main(["run", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("gpu", "profile"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H200", "h200-sxm"),
        ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
        ("AMD Instinct MI300X", "mi300x"),
    ],
)
def test_base_profile_matches_the_gpu(
    monkeypatch: pytest.MonkeyPatch, gpu: str, profile: str
) -> None:
    import torch

    from moesim.commands import run as run_cmd

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)
    assert run_cmd._base_profile(None, "cuda").name == profile
    assert run_cmd._base_profile(None, "cpu").name == "cpu-local"
    assert run_cmd._base_profile("b200", "cuda").name == "b200"


@pytest.mark.gpu
def test_run_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(TINY_GRID), encoding="utf-8")
    argv = [
        "run",
        "--out",
        str(tmp_path),
        "--device",
        "cuda",
        "--suite",
        "roofline,gating",
        "--grid",
        str(grid),
        "--budget",
        "0.01",
    ]
    assert main(argv) == 0
    assert list((tmp_path / "cuda").glob("*.parquet"))
    assert "-calibrated" in capsys.readouterr().out


def test_an_unknown_gpu_is_refused_as_calibrate_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: `run` used to fall back to h100-sxm silently; it now refuses like calibrate."""
    import torch

    from moesim.commands import run as run_cmd
    from moesim.errors import UserError

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 4090")
    with pytest.raises(UserError, match=r"no spec profile known for device .*pass --base"):
        run_cmd._base_profile(None, "cuda")
    assert run_cmd._base_profile("h100-sxm", "cuda").name == "h100-sxm"  # --base still works
