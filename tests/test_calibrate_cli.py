"""`moesim calibrate` on the command line: JSON contract, profile file, exit codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moesim.calibrate.profile import base_profile_name
from moesim.cli import main
from moesim.config.loader import load_hardware
from moesim.errors import UserError
from moesim.measure.results import to_frame, write_results


@pytest.fixture(scope="module")
def results_file(tmp_path_factory: pytest.TempPathFactory, bench: Any) -> Path:
    # a few suites keep the CLI tests quick; tests/test_calibrate.py covers them all
    suites = ("roofline", "dispatch", "alltoall")
    return bench.results(tmp_path_factory.mktemp("bench") / "quick.parquet", suites=suites)


def test_json_is_exactly_profile_and_families(
    results_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibrated" / "mine.yaml"
    assert main(["calibrate", str(results_file), "--out", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) == {"profile", "families"} and got["profile"] == str(out)
    for err in got["families"].values():
        assert set(err) == {"mape", "max_ape", "n"}
        assert 0 <= err["mape"] <= err["max_ape"] and err["n"] >= 3
    profile = load_hardware(str(out))
    assert profile.name == "mine" and profile.calibration is not None
    assert set(profile.calibration.errors) == set(got["families"])


def test_table_prints_targets(
    results_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.yaml"
    assert main(["calibrate", str(results_file.parent), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out MAPE <= 10% per family: met" in text
    assert "calibration time <= 10 s" in text and "alltoall" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "missing.parquet", "--out", "x.yaml"], "file not found"),
        (["calibrate", "RESULTS", "--out", "x.txt"], "must be a .yaml file"),
        (["calibrate", "RESULTS", "--out", "x.yaml", "--base", "nope"], "no such hardware"),
        (["calibrate", "PARTIAL", "--out", "x.yaml", "--strict"], "too few rows"),
        (["calibrate", "GPU", "--out", "x.yaml"], "no spec profile known for device"),
        (["calibrate", "RESULTS", "--out", "/proc/x/y.yaml"], "cannot write"),
        (["calibrate", "RESULTS", "--out", "x.yaml", "--strategy", "permute"], "FAMILY=NAME"),
        (["calibrate", "RESULTS", "--out", "x.yaml", "--strategy", "permute=x"], "not measured"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str],
    message: str,
    bench: Any,
    results_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    partial = bench.results(tmp_path / "partial.parquet", suites=("roofline",))
    gpu_row = bench.row("roofline", "copy", 1e-3, device="cuda", device_name="Mystery GPU 9000")
    gpu = write_results(to_frame([gpu_row] * 3), tmp_path / "gpu.parquet", {})
    subst = {"RESULTS": str(results_file), "PARTIAL": str(partial), "GPU": str(gpu)}
    argv = [subst.get(a, a) for a in argv]
    argv = [str(tmp_path / a) if a.endswith((".yaml", ".txt")) else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize(
    ("device", "name", "profile"),
    [
        ("cpu", "AMD EPYC 7B13", "cpu-local"),
        ("cuda", "NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("cuda:0", "NVIDIA H200", "h200-sxm"),
        ("cuda", "NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
    ],
)
def test_default_base_follows_the_device(device: str, name: str, profile: str) -> None:
    assert base_profile_name(device, name) == profile
    load_hardware(profile)  # the named spec profile exists


def test_unknown_gpu_needs_base() -> None:
    with pytest.raises(UserError, match="pass --base"):
        base_profile_name("cuda", "Some Other GPU")


def test_simulate_accepts_the_calibrated_profile(
    results_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cal.yaml"
    assert main(["calibrate", str(results_file), "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    scenario = Path(__file__).resolve().parents[1] / "scenarios" / "tiny-cpu.yaml"
    assert main(["simulate", str(scenario), "--hardware", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["hardware"] == "cal" and got["step_time_s"] > 0


@pytest.mark.gpu
def test_calibrate_a_quick_cuda_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a GPU: bench --quick, then calibrate with the base chosen by the device name."""
    results = tmp_path / "results"
    argv = ["bench", "--quick", "--device", "cuda", "--suite", "roofline,experts"]
    assert main([*argv, "--out", str(results), "--no-progress"]) == 0
    (bench,) = (results / "cuda").glob("*.parquet")
    out = tmp_path / "gpu.yaml"
    capsys.readouterr()
    assert main(["calibrate", str(bench), "--out", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    profile = load_hardware(str(out))
    assert profile.calibration is not None and profile.calibration.source.device != "cpu"
    assert {"experts", "gemm"} <= set(got["families"])


def test_table_lists_fallbacks_and_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bench: Any
) -> None:
    partial = bench.results(tmp_path / "partial.parquet", suites=("roofline",))
    assert main(["calibrate", str(partial), "--out", str(tmp_path / "p.yaml")]) == 0
    text = capsys.readouterr().out
    assert "spec values" in text and "fallback alltoall: 0 rows in suite 'alltoall'" in text
