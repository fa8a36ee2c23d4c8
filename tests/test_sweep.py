"""`moesim sweep`: tables, plots, resume, bad sweep files, process pool and Ray backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from moesim.cli import main
from moesim.explore.metrics import METRICS
from moesim.explore.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep_file(tmp_path: Path, body: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body.replace("TINY", str(REPO / "scenarios" / "tiny-cpu.yaml")), "utf-8")
    return path


SMALL = """
name: small
scenario: TINY
axes:
  top_k: [1, 2]
  capacity_factor: [1.0, null]
metrics: [throughput_tokens_per_s, drop_fraction]
seeds: 2
"""


def _runs(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "runs.parquet")


def test_sweep_writes_tables_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["sweep", str(_sweep_file(tmp_path, SMALL)), "--out", str(out), "--jobs", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "small: 4 variants" in stdout and "runs.parquet" in stdout
    runs = _runs(out)
    assert len(runs) == 8 and set(runs["seed"]) == {0, 1}
    assert list(runs.columns[:3]) == ["variant", "top_k", "capacity_factor"]
    assert set(METRICS) <= set(runs.columns)
    assert pd.read_csv(out / "runs.csv").shape == runs.shape
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 and (summary["n_seeds"] == 2).all()
    assert summary["throughput_tokens_per_s"].tolist() == pytest.approx(
        runs.groupby("variant")["throughput_tokens_per_s"].mean().tolist()
    )
    meta = json.loads(pq.read_schema(out / "runs.parquet").metadata[b"moesim"])
    assert meta["variants"] == 4 and meta["tasks"] == 8 and meta["sweep"]["name"] == "small"
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == [
        "drop_fraction_vs_capacity_factor.png",
        "drop_fraction_vs_top_k.png",
        "throughput_tokens_per_s_vs_capacity_factor.png",
        "throughput_tokens_per_s_vs_top_k.png",
    ]
    for name in plots:
        _check_png(out / "plots" / name)


def _check_png(path: Path) -> None:
    """A real, non-blank image: PNG header, sensible size, more than one colour."""
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].reshape(-1, 3).std(axis=0).max() > 0.05  # not blank


def test_resumed_sweep_gives_the_same_table(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, SMALL)
    full = run_sweep(path, out_dir=tmp_path / "full")
    # a killed run: some part files written, no tables yet
    partial = tmp_path / "partial"
    run_sweep(path, out_dir=partial)
    parts = sorted((partial / "parts").glob("*.json"))
    for p in parts[::2]:
        p.unlink()
    for name in ("runs.parquet", "runs.csv", "summary.csv"):
        (partial / name).unlink()
    calls: list[int] = []
    resumed = run_sweep(
        path, out_dir=partial, progress=lambda n=1, description=None: calls.append(n)
    )
    assert calls[0] == len(parts) - len(parts[::2])  # the finished ones, reported at once
    assert sum(calls) == 8
    pd.testing.assert_frame_equal(_runs(partial), _runs(tmp_path / "full"))
    assert (partial / "summary.csv").read_text() == (tmp_path / "full" / "summary.csv").read_text()
    assert resumed.runs.equals(full.runs)


def test_process_pool_equals_serial(tmp_path: Path) -> None:
    path = _sweep_file(tmp_path, SMALL)
    serial = run_sweep(path, out_dir=tmp_path / "a", jobs=1)
    pooled = run_sweep(path, out_dir=tmp_path / "b", jobs=2)
    pd.testing.assert_frame_equal(serial.runs, pooled.runs)


LINKED = """
scenario: TINY
hardware: [cpu-local, h100-sxm]
linked:
  - {ep: [2, 4], tp: [2, 1]}
axes:
  top_k: [1, 64]
skip_invalid: true
metrics: [alltoall_fraction]
"""


def test_linked_axes_hardware_axis_and_skipped_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["sweep", str(_sweep_file(tmp_path, LINKED)), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "skipped" in stdout and "model.top_k = 64" in stdout
    runs = _runs(out)
    assert len(runs) == 4  # 2 profiles x 2 (ep, tp) pairs; top_k=64 > 16 experts left out
    assert sorted(zip(runs["ep"], runs["tp"], strict=True)) == [(2, 2), (2, 2), (4, 1), (4, 1)]
    assert set(runs["hardware"]) == {"cpu-local", "h100-sxm"}
    meta = json.loads((out / "sweep.json").read_text())
    assert len(meta["skipped"]) == 4
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["alltoall_fraction_vs_ep.png", "alltoall_fraction_vs_hardware.png"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("scenario: TINY\naxes: {topk: [1, 2]}\n", "valid keys: "),
        ("scenario: TINY\naxes: {top_k: [1, 2]}\ncolour: red\n", "colour: unknown key"),
        ("scenario: TINY\nmetrics: [speed]\n", "unknown metric"),
        ("scenario: nowhere.yaml\n", "scenario = 'nowhere.yaml'"),
        ("scenario: TINY\naxes: {top_k: [1, 99]}\n", "model.top_k = 99"),
        ("scenario: TINY\nlinked: [{ep: [1, 2], dp: [4]}]\n", "same number of values"),
        ("scenario: TINY\nseeds: 0\n", "seeds = 0"),
    ],
)
def test_bad_sweep_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, needle: str
) -> None:
    path = _sweep_file(tmp_path, body)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.count("\n") == 1


def test_shipped_sweep_files_are_valid() -> None:
    from moesim.explore.sweep import prepare_sweep

    counts = {}
    for path in sorted((REPO / "scenarios" / "sweeps").glob("*.yaml")):
        _, _, plan = prepare_sweep(path)
        counts[path.stem] = len(plan.variants)
        assert not plan.skipped
    assert counts["qwen3-64gpu-200"] == 200


# -- Ray --------------------------------------------------------------------------
class _Ref:
    def __init__(self, value: Any) -> None:
        self.value = value


class _FakeRay:
    """Just enough of the Ray API to run the backend's code path in-process."""

    def __init__(self) -> None:
        self.inited: dict[str, Any] = {}

    def is_initialized(self) -> bool:
        return bool(self.inited)

    def init(self, **kwargs: Any) -> None:
        self.inited = kwargs

    def remote(self, **_: Any) -> Any:
        def wrap(fn: Any) -> Any:
            class Remote:
                @staticmethod
                def remote(task: Any) -> _Ref:
                    return _Ref(fn(task))

            return Remote

        return wrap

    def wait(
        self, refs: list[Any], num_returns: int, timeout: float
    ) -> tuple[list[Any], list[Any]]:
        assert 1 <= num_returns <= len(refs) and timeout > 0
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: _Ref) -> Any:
        return ref.value


def test_ray_backend_code_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    path = _sweep_file(tmp_path, SMALL)
    on_ray = run_sweep(path, out_dir=tmp_path / "r", ray_address="10.0.0.1:6379")
    assert fake.inited["address"] == "10.0.0.1:6379"
    local = run_sweep(path, out_dir=tmp_path / "l")
    pd.testing.assert_frame_equal(on_ray.runs, local.runs)


def test_ray_missing_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    path = _sweep_file(tmp_path, SMALL)
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--ray", "auto"]) == 2
    assert "pip install 'moesim[ray]'" in capsys.readouterr().err


def test_sweep_on_a_local_ray_cluster(tmp_path: Path) -> None:
    """A real local Ray instance (started here); `moesim sweep --ray ADDRESS` connects to it.

    In the default run on purpose (about 15 s on 2 cores): one CPU, no dashboard,
    the smallest sweep; it skips where Ray is not installed.
    """
    ray = pytest.importorskip("ray")
    ctx = ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        address = ctx.address_info["gcs_address"]
        path = _sweep_file(tmp_path, SMALL)
        cmd = [
            sys.executable,
            "-m",
            "moesim",
            "sweep",
            str(path),
            "--out",
            str(tmp_path / "ray"),
            "--ray",
            address,
            "--no-plots",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        ray.shutdown()
    local = run_sweep(path, out_dir=tmp_path / "local")
    pd.testing.assert_frame_equal(_runs(tmp_path / "ray"), local.runs)


# -- a real kill ------------------------------------------------------------------
KILLABLE = """
name: killable
scenario: TINY
axes:
  top_k: [1, 2, 4, 8]
  capacity_factor: [1.0, 1.5, 2.0, null]
  tokens_per_gpu: [4096, 8192]
  zipf_exponent: [0.2, 1.2]
"""


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_table(tmp_path: Path) -> None:
    """SIGKILL a running `moesim sweep` once some variants finished, then restart it."""
    path = _sweep_file(tmp_path, KILLABLE)
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "moesim",
        "sweep",
        str(path),
        "--out",
        str(out),
        "--jobs",
        "1",
        "--no-plots",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "parts").glob("*.json"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((out / "parts").glob("*.json")))
    assert 5 <= finished < 64 and not (out / "runs.parquet").exists()
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    full = run_sweep(path, out_dir=tmp_path / "full")
    pd.testing.assert_frame_equal(_runs(out), full.runs)


# -- plots of many-axis grids -------------------------------------------------------
def _grid_frame(sizes: dict[str, int]) -> pd.DataFrame:
    import itertools

    rows = []
    for combo in itertools.product(*(range(n) for n in sizes.values())):
        row = dict(zip(sizes, combo, strict=True))
        row["throughput_tokens_per_s"] = 1e6 * (1 + sum(combo))
        row["throughput_tokens_per_s_ci95"] = 0.0
        rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("sizes", "legend"),
    [
        ({"a": 3, "b": 2}, "b=0"),  # one line per other setting
        ({"a": 3, "b": 12, "c": 3}, "c=0 (mean of 12)"),  # too many lines: means by c
        ({"a": 3, "b": 9, "c": 9}, "mean over 81 other settings"),  # no small axis: a band
    ],
)
def test_plot_modes(tmp_path: Path, sizes: dict[str, int], legend: str) -> None:
    from moesim.report.plots import plot_sweep

    df = _grid_frame(sizes)
    paths = plot_sweep(df, list(sizes), ["throughput_tokens_per_s"], tmp_path)
    assert [p.name for p in paths] == [f"throughput_tokens_per_s_vs_{k}.png" for k in sizes]
    for p in paths:
        _check_png(p)
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # every figure closed
    labels = _legend_of(df, list(sizes), tmp_path / "legend.png")
    assert legend in labels


def _legend_of(df: pd.DataFrame, axes: list[str], path: Path) -> list[str]:
    """The legend labels of the plot against the first axis."""
    import matplotlib.pyplot as plt

    from moesim.report import plots

    captured: list[str] = []
    real_close = plt.close

    def grab(fig: Any = None) -> None:
        for ax in fig.axes:
            captured.extend(ax.get_legend_handles_labels()[1])
        real_close(fig)

    plt.close = grab  # type: ignore[assignment]
    try:
        plots.plot_metric(df, "throughput_tokens_per_s", axes[0], axes[1:], path)
    finally:
        plt.close = real_close  # type: ignore[assignment]
    return captured


def test_big_sweep_prints_the_best_rows_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """
name: big
scenario: TINY
axes:
  top_k: [1, 2, 4, 8]
  capacity_factor: [1.0, 1.5, 2.0, null]
  tokens_per_gpu: [256, 512]
"""
    out = tmp_path / "big"
    argv = ["sweep", str(_sweep_file(tmp_path, body)), "--out", str(out), "--no-plots"]
    assert main([*argv, "--jobs", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "big: 32 variants (first row, then the best 29 by throughput_tokens_per_s" in stdout
    assert not (out / "plots").exists()
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 32
    best = summary["throughput_tokens_per_s"].iloc[1:].max()
    assert f"{best / 1e3:.3g}" in stdout  # the best variant is on screen (k tok/s column)
