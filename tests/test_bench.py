"""`moesim bench` end to end on tiny grids: every suite, ceilings, interruption, OOM, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from moesim.cli import main
from moesim.config.router import GATE_KINDS
from moesim.errors import ConfigError, UserError
from moesim.kernels.dispatch import DISPATCH_STRATEGIES
from moesim.kernels.experts import EXPERT_STRATEGIES, grouped_mm_available
from moesim.measure import bench
from moesim.measure.bench import BenchInterrupted, run_bench
from moesim.measure.ceilings import apply_ceilings
from moesim.measure.grids import load_grid_file
from moesim.measure.results import ALL_COLUMNS, read_results
from moesim.measure.suites import SUITES, Suite
from moesim.measure.suites import dispatch as dispatch_suite

#: every router kind and dispatch strategy (the --quick defaults measure a subset)
TINY = {
    "gating": {"T": [16], "D": [8], "E": [4], "K": [2], "routers": list(GATE_KINDS)},
    "dispatch": {
        "T": [32],
        "D": [8],
        "E": [4],
        "K": [2],
        "skew": [0.0, 1.5],
        "strategies": dispatch_suite.strategies(),
    },
    "experts": {"T": [16], "D": [8], "F": [16], "E": [8], "K": [2], "skew": [0.0, 3.0]},
    "roofline": {"copy_MiB": [0.25, 1], "gemm": [16, 32]},
    "alltoall": {"msg_bytes": [1024], "split": ["even", "uneven"]},
}
ALL = ["gating", "dispatch", "experts", "alltoall", "roofline"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict]:
    out = tmp_path_factory.mktemp("bench")
    path = run_bench(ALL, out_dir=out, grids=TINY, budget_s=0.002, threads=1, quick=True, csv=True)
    df, meta = read_results(path)
    return path, df, meta


def test_every_suite_produces_ok_rows(tiny_run: tuple) -> None:
    path, df, _meta = tiny_run
    assert path.parent.name == "cpu" and path.suffix == ".parquet"
    assert list(df.columns) == list(ALL_COLUMNS)  # bench columns + (empty) provenance
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]["status"].tolist()
    assert set(df[df.suite == "gating"]["op"]) == set(GATE_KINDS)
    disp = df[df.suite == "dispatch"]
    for strategy in [*DISPATCH_STRATEGIES, "sort_padded"]:
        for op in ("permute", "unpermute"):
            assert set(disp[(disp.strategy == strategy) & (disp.op == op)]["skew"]) == {0.0, 1.5}
    expected = {
        s
        for s in EXPERT_STRATEGIES
        if s != "grouped_mm" or grouped_mm_available("cpu", torch.float32)
    }
    assert set(df[df.suite == "experts"]["strategy"]) == {*expected, "dense"}
    assert set(df[df.suite == "alltoall"]["split"]) == {"even", "uneven"}
    assert (df["n_samples"] >= 1).all()
    assert all(len(s) == n for s, n in zip(df["samples_s"], df["n_samples"], strict=True))


def test_skewed_experts_include_experts_with_zero_tokens(tiny_run: tuple) -> None:
    _, df, _ = tiny_run
    experts = df[df.suite == "experts"]
    grouped = experts[experts.strategy != "dense"]
    loads = {row.skew: json.loads(row.tokens_per_expert) for row in grouped.itertuples()}
    assert loads[0.0] == [4] * 8
    assert 0 in loads[3.0] and sum(loads[3.0]) == 32
    assert (experts["flops"] > 0).all() and (experts["ceiling"] == "gemm").all()
    (dense,) = experts[experts.strategy == "dense"].itertuples()
    assert (dense.E, dense.skew, json.loads(dense.tokens_per_expert)) == (1, 0.0, [32])
    assert dense.flops == grouped["flops"].iloc[0]  # the same work as the grouped rows


def test_every_kernel_row_has_a_percent_of_the_measured_ceiling(tiny_run: tuple) -> None:
    _, df, meta = tiny_run
    ceilings = meta["ceilings"]
    copies = df[(df.suite == "roofline") & (df.op == "copy")]
    largest = copies[copies["bytes"] == copies["bytes"].max()].iloc[0]
    copy_peak = largest["bytes"] / largest["p20_s"] / 1e9  # out of cache, at p20
    assert ceilings["copy_GBps"] == pytest.approx(copy_peak)
    assert largest["pct_of_ceiling"] == pytest.approx(100 * largest["achieved_GBps"] / copy_peak)
    gemms = df[(df.suite == "roofline") & (df.op == "gemm")]
    gemm_peak = (gemms["flops"] / gemms["p20_s"]).max() / 1e12
    assert ceilings["gemm_TFLOPs"]["fp32"] == pytest.approx(gemm_peak)
    kernels = df[df.suite.isin(["gating", "dispatch", "experts"])]
    assert kernels["pct_of_ceiling"].notna().all() and (kernels["pct_of_ceiling"] > 0).all()
    gating = df[df.suite == "gating"].iloc[0]
    assert gating["pct_of_ceiling"] == pytest.approx(
        100 * gating["achieved_GBps"] / ceilings["copy_GBps"]
    )
    assert set(ceilings["gemm_TFLOPs"]) == {"fp32"}


def test_metadata_and_csv_copy(tiny_run: tuple) -> None:
    path, df, meta = tiny_run
    assert meta["complete"] is True and meta["threads"] == 1 and meta["device"] == "cpu"
    assert set(meta["targets"]) == {"permute", "unpermute", "grouped_vs_dense", "gating"}
    assert meta["suites"] == ["roofline", "gating", "dispatch", "experts", "alltoall"]
    for key in ("torch", "hostname", "commit", "device_name", "wall_s"):
        assert key in meta
    csv_df, csv_meta = read_results(path.with_suffix(".csv"))
    assert csv_meta == meta and len(csv_df) == len(df)
    assert csv_df["samples_s"].tolist() == df["samples_s"].tolist()


def test_roofline_always_runs_first() -> None:
    assert bench.check_suites(["experts", "gating"]) == ["roofline", "gating", "experts"]


def _interrupt_after(n: int):
    @contextmanager
    def progress(total: int, description: str) -> Iterator:
        done = [0]

        def advance(k: int = 1, description: str | None = None) -> None:
            done[0] += k
            if done[0] >= n:
                raise KeyboardInterrupt

        yield advance

    return progress


def test_interrupted_run_leaves_a_valid_incomplete_file(tmp_path: Path) -> None:
    grids = {**TINY, "roofline": {"copy_MiB": [0.25], "gemm": [16]}}
    kw = {"out_dir": tmp_path, "grids": grids, "budget_s": 0.002}
    with pytest.raises(BenchInterrupted) as info:
        run_bench(["gating"], quick=True, progress=_interrupt_after(4), **kw)  # one pass
    df, meta = read_results(info.value.path)
    assert meta["complete"] is False
    assert len(df) == info.value.rows == 4  # 2 roofline + 2 gating rows measured
    assert (df["status"] == "ok").all()
    with pytest.raises(BenchInterrupted) as info:  # two passes: roofline's 2 cases twice
        run_bench(["gating"], progress=_interrupt_after(5), **kw)
    assert info.value.rows == 3  # and the first gating case, measured once


def test_out_of_memory_on_one_case_is_a_row_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = SUITES["gating"]

    def measure(case, ctx):
        if case.op == "hash":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        if case.op == "soft":
            raise RuntimeError("something else broke")
        return real.measure(case, ctx)

    monkeypatch.setitem(SUITES, "gating", Suite("gating", real.cases, measure=measure))
    grids = {**TINY, "roofline": {"copy_MiB": [0.25], "gemm": [16]}}
    path = run_bench(["gating"], out_dir=tmp_path, grids=grids, budget_s=0.002)
    df, meta = read_results(path)
    status = dict(
        zip(df[df.suite == "gating"]["op"], df[df.suite == "gating"]["status"], strict=True)
    )
    assert status.pop("hash") == "oom"
    assert status.pop("soft") == "error: RuntimeError: something else broke"
    assert set(status.values()) == {"ok"} and meta["complete"] is True


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"suites": ["bogus"]}, "allowed: roofline, gating"),
        ({"suites": ["gating"], "dtype": "fp64"}, "allowed: fp32, bf16, fp16"),
        ({"suites": ["gating"], "device": "tpu"}, "allowed: cpu, cuda"),
        ({"suites": ["gating"], "world": 0}, "--world = 0"),
        ({"suites": ["gating"], "threads": 0}, "--threads = 0"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict, match: str, tmp_path: Path) -> None:
    suites = kwargs.pop("suites")
    with pytest.raises(UserError, match=match):
        run_bench(suites, out_dir=tmp_path, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cli_cuda_without_cuda_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device is available" in err and "\n" not in err


def test_cli_bad_suite_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--suite", "gating,nope"]) == 2
    assert "allowed: roofline, gating, dispatch, experts, alltoall" in capsys.readouterr().err


def test_cli_tiny_run_with_grid_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({k: TINY[k] for k in ("gating", "roofline")}))
    out = tmp_path / "res"
    argv = [
        "bench",
        "--suite",
        "gating",
        "--grid",
        str(grid),
        "--out",
        str(out),
        "--budget",
        "0.002",
        "--threads",
        "1",
        "--csv",
        "--no-progress",
    ]
    assert main(argv) == 0
    (parquet,) = (out / "cpu").glob("*.parquet")
    assert parquet.with_suffix(".csv").is_file()
    captured = capsys.readouterr()
    assert "gating softmax_topk" in captured.out
    assert "measured ceilings: copy" in captured.err and "rows in" in captured.err


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("nope: {T: [1]}", "nope: unknown suite"),
        ("gating: {Q: [1]}", "gating.Q: unknown axis; allowed: T, D, E, K, routers"),
        ("gating: {T: [x]}", "gating.T = \\['x'\\]: values must be ints"),
        ("gating: {T: [0]}", "values must be positive"),
        ("gating: {T: []}", "at least one value"),
        ("[1, 2]", "must be a mapping"),
        ("gating: {T: [1", "not valid YAML"),
    ],
)
def test_bad_grid_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_grid_file(path)
    assert str(info.value).startswith(str(path))
    assert main(["bench", "--grid", str(path)]) == 2


def test_grid_file_values_are_converted(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("experts: {skew: [0, 1], strategies: loop}\nroofline: {copy_MiB: [1]}")
    assert load_grid_file(path) == {
        "experts": {"skew": [0.0, 1.0], "strategies": ["loop"]},
        "roofline": {"copy_MiB": [1.0]},
    }


@pytest.mark.slow
def test_cli_sigint_keeps_rows(tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT) mid-run: exit 130 and a valid file with complete: false."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "res"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moesim",
            "bench",
            "--suite",
            "experts,gating",
            "--out",
            str(out),
            "--no-progress",
            "--threads",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list((out / "cpu").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the first checkpoint lands after the roofline suite
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (path,) = (out / "cpu").glob("*.parquet")
    df, meta = read_results(path)
    assert meta["complete"] is False and len(df) >= 1
    assert "interrupted; kept" in err


@pytest.mark.slow
def test_alltoall_under_torchrun(tmp_path: Path) -> None:
    import shutil
    import subprocess

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "roofline": {"copy_MiB": [1], "gemm": [32]},
                "alltoall": {"msg_bytes": [4096], "split": ["uneven"]},
            }
        )
    )
    torchrun = shutil.which("torchrun")
    assert torchrun
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "-m",
        "moesim",
        "bench",
        "--suite",
        "alltoall",
        "--grid",
        str(grid),
        "--out",
        str(tmp_path / "res"),
        "--no-progress",
        "--budget",
        "0.01",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (path,) = (tmp_path / "res" / "cpu").glob("*.parquet")
    df, meta = read_results(path)
    row = df[df.suite == "alltoall"].iloc[0]
    assert row["status"] == "ok" and row["world"] == 2 and meta["world"] == 2
    assert done.stdout.count("alltoall gloo uneven") == 1  # only rank 0 prints


@pytest.mark.gpu
def test_tiny_cuda_run_with_nccl(tmp_path: Path) -> None:
    grids = {**TINY, "alltoall": {"msg_bytes": [2**20], "split": ["even", "uneven"]}}
    path = run_bench(
        ALL, device="cuda", dtype="bf16", out_dir=tmp_path, grids=grids, budget_s=0.01, quick=True
    )
    df, meta = read_results(path)
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]["status"].tolist()
    assert meta["cuda"] and df["device_name"].iloc[0]
    assert set(df[df.suite == "alltoall"]["strategy"]) == {"nccl"}


def _row(suite: str, op: str, **kw: object) -> dict:
    return {"suite": suite, "op": op, "status": "ok", "dtype": "fp32", **kw}


def test_ceilings_by_hand() -> None:
    rows = [
        # in cache (small): not the ceiling; p20 gives 50 GB/s
        _row("roofline", "copy", ceiling="copy", bytes=1e6, p20_s=2e-5, achieved_GBps=40.0),
        _row("roofline", "copy", ceiling="copy", bytes=1e9, p20_s=0.05, achieved_GBps=10.0),
        _row("roofline", "gemm", ceiling="gemm", flops=1e12, p20_s=10.0, achieved_TFLOPs=0.1),
        _row("roofline", "gemm", ceiling="gemm", flops=1e12, p20_s=5.0, achieved_TFLOPs=0.1),
        _row("roofline", "gemm", flops=1e12, p20_s=0.1, achieved_TFLOPs=9.0, status="oom"),
        _row("gating", "hash", ceiling="copy", achieved_GBps=5.0),
        _row("experts", "experts", ceiling="gemm", achieved_TFLOPs=0.05),
        _row("experts", "experts", ceiling="gemm", achieved_TFLOPs=0.05, dtype="bf16"),
    ]
    ceilings = apply_ceilings(rows)
    assert ceilings == {"copy_GBps": pytest.approx(20.0), "gemm_TFLOPs": {"fp32": 0.2}}
    assert rows[0]["pct_of_ceiling"] == pytest.approx(200.0)  # 40 GB/s median vs 20
    assert rows[1]["pct_of_ceiling"] == pytest.approx(50.0)  # its median vs its own p20
    assert rows[5]["pct_of_ceiling"] == pytest.approx(25.0)
    assert rows[6]["pct_of_ceiling"] == pytest.approx(25.0)
    assert "pct_of_ceiling" not in rows[7]  # no bf16 GEMM measured
    assert "pct_of_ceiling" not in rows[4]


@pytest.mark.parametrize(
    ("grids", "match"),
    [
        ({"gating": {"routers": ["softmax_topk", "nope"]}}, "gating.routers = \\['nope'\\]"),
        ({"dispatch": {"strategies": ["sort", "bogus"]}}, "dispatch.strategies = \\['bogus'\\]"),
        ({"experts": {"strategies": ["gmm"]}}, "allowed: loop, bmm, grouped_mm, dense"),
        ({"alltoall": {"split": ["ring"]}}, "allowed: even, uneven"),
    ],
)
def test_bad_names_in_grids_are_config_errors(grids: dict, match: str, tmp_path: Path) -> None:
    suites = [*grids]
    with pytest.raises(ConfigError, match=match):
        run_bench(suites, out_dir=tmp_path, grids=grids)
    assert not list(tmp_path.rglob("*.parquet"))  # nothing measured, nothing written


def test_grouped_sigmoid_is_benchmarked_as_deepseek_v3_routes() -> None:
    """V3's 8 groups, best 4 searched, at E = 256; shapes groups cannot serve are skipped."""
    from moesim.measure.suites import gating

    v3 = gating.router_spec("sigmoid_topk.grouped", 8, 256)
    assert v3 is not None and (v3.kind, v3.n_group, v3.topk_group) == ("sigmoid_topk", 8, 4)
    assert v3.routed_scaling_factor == 2.5 and v3.normalize
    small = gating.router_spec("sigmoid_topk.grouped", 2, 4)
    assert small is not None and (small.n_group, small.topk_group) == (2, 1)
    assert gating.router_spec("sigmoid_topk.grouped", 3, 4) is None  # 1 group of 2 < k
    assert gating.router_spec("sigmoid_topk.grouped", 1, 2) is None  # groups of 1 expert
    grid = {"T": [8], "D": [4], "E": [2, 4], "K": [2, 3]}
    cases = gating.cases({**grid, "routers": ["sigmoid_topk.grouped"]}, ["fp32"], None)  # type: ignore[arg-type]
    assert [(c.E, c.K) for c in cases] == [(4, 2)]


def test_cpu_quick_grid_gives_every_fitted_family_five_shapes() -> None:
    """Held-out errors of `moesim run` need neighbours on both sides of each shape."""
    from moesim.measure.bench import make_plan
    from moesim.measure.grids import SUITES as GRID_SUITES
    from moesim.measure.grids import resolve_grids
    from moesim.measure.suites.common import BenchContext

    ctx = BenchContext(world=2)
    plan = make_plan(
        list(GRID_SUITES), ["fp32"], ctx, resolve_grids(list(GRID_SUITES), "cpu", True)
    )
    cases = [c for _, suite_cases in plan for c in suite_cases]

    def shapes(suite: str, op: str | None = None, strategy: str | None = None) -> int:
        keep = [
            c
            for c in cases
            if c.suite == suite and op in (None, c.op) and strategy in (None, c.strategy)
        ]
        return len({(c.T, c.D, c.F, c.E, c.K, c.skew, c.msg_bytes) for c in keep})

    assert shapes("roofline", "copy") >= 10 and shapes("roofline", "gemm") >= 5
    for kind in ("softmax_topk", "sigmoid_topk.grouped"):
        assert shapes("gating", kind) >= 5
    for op in ("permute", "unpermute", "regroup"):
        assert shapes("dispatch", op) >= 5
    assert shapes("experts", strategy="loop") >= 5 and shapes("alltoall") >= 5
    assert not [c for c in cases if c.strategy == "einsum"]  # O(T^2) masks: never the fastest


def test_each_case_keeps_its_fastest_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two passes (the full grid's): a case slowed in its first pass keeps the second's
    timing, each pass timed with half the budget; a failed pass never wins."""
    times = {0: [5e-3, 1e-3], 1: [2e-3, 4e-3]}  # per case, per pass
    ctx = bench.make_context("cpu", True, None, 1, 0.1, 0)
    suite = SUITES["gating"]
    grid = TINY["gating"] | {"routers": ["softmax_topk"], "T": [16, 32]}
    cases = suite.cases(grid, ["fp32"], ctx)
    budgets: list[float] = []
    calls: dict[int, int] = {}

    def fake(suite: Suite, case: object, ctx: object) -> dict:
        i = cases.index(case)
        k = calls[i] = calls.get(i, -1) + 1
        budgets.append(ctx.budget_s)  # type: ignore[attr-defined]
        return {"status": "ok", "median_s": times[i][k]}

    monkeypatch.setattr(bench, "_measure_one", fake)
    runner = bench._Runner([(suite, cases)], ctx, tmp_path / "x.parquet", {}, False, passes=2)
    runner._run_suite(suite, cases, lambda n=1, description=None: None)
    assert [r["median_s"] for r in runner.rows] == [1e-3, 2e-3]
    assert budgets == [0.05] * 4  # half of the 0.1 s budget per pass
    assert bench._faster({"status": "ok", "median_s": 1.0}, {"status": "oom"})["median_s"] == 1.0
    assert bench._faster({"status": "oom"}, {"status": "ok", "median_s": 2.0})["median_s"] == 2.0


def test_loss_cases_only_where_the_grid_names_them_and_timed_for_real(tmp_path: Path) -> None:
    """The LM head's cross-entropy: T x V cases from ``loss_T`` x ``loss_V``; bytes are
    two passes over the fp32 logits; none in the default grids."""
    from moesim.measure.grids import resolve_grids
    from moesim.measure.suites import roofline

    assert "loss_T" not in resolve_grids(["roofline"], "cpu", True)["roofline"]
    grids = {"roofline": {"copy_MiB": [0.25], "gemm": [16], "loss_T": [8, 32], "loss_V": [64]}}
    path = run_bench(["roofline"], out_dir=tmp_path, grids=grids, budget_s=0.002, threads=1,
                     quick=True)  # fmt: skip
    df, _ = read_results(path)
    loss = df[df.op == "loss"].sort_values("T")
    assert loss["T"].tolist() == [8, 32] and (loss["D"] == 64).all()
    assert loss["bytes"].tolist() == [2 * 8 * 64 * 4, 2 * 32 * 64 * 4]
    assert (loss["status"] == "ok").all() and (loss["median_s"] > 0).all()
    assert not roofline.cases({"copy_MiB": [], "gemm": []}, ["fp32"], None)  # type: ignore[arg-type]
