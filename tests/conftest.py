"""Shared pytest fixtures and markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moesim.config import HardwareProfile
from moesim.config.hardware import (
    Calibration,
    CalibrationSource,
    CommFit,
    Curve,
    GemmFit,
    MemoryOpFit,
)
from moesim.config.loader import load_hardware
from moesim.costs import CostModel, work
from moesim.measure.results import to_frame, write_results

REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Record the oracle and runtime versions the run was checked against."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for pkg in ("torch", "transformers", "numpy", "simpy", "pandas", "aiconfigurator-core"):
        try:
            found.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            found.append(f"{pkg} (not installed)")
    return ["moesim oracles and runtime: " + ", ".join(found)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests when no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo() -> Path:
    return REPO


# -- a synthetic bench: results measured on a made-up device (calibration tests) -------

D, F = 64, 128
SUITES = ("gating", "dispatch", "experts", "roofline", "alltoall")


def _mem(lat_us: float, ys: tuple[float, ...]) -> MemoryOpFit:
    xs = [1e3, 1e5, 1e7, 1e9][: len(ys)]
    return MemoryOpFit(latency_us=lat_us, bandwidth_GBps=Curve(x=xs, y=list(ys)))


def truth_profile() -> HardwareProfile:
    """cpu-local with a made-up calibration: what the synthetic device really does."""
    base = load_hardware("cpu-local")
    src = CalibrationSource(results=["truth"], device="synthetic cpu", created="2026-01-01")
    cal = Calibration(
        source=src,
        memory={
            "gating": _mem(40.0, (0.5, 3.0, 6.0, 4.0)),
            "gating.sigmoid_topk": _mem(55.0, (0.4, 2.5, 5.0, 4.0)),
            "permute": _mem(20.0, (1.0, 5.0, 8.0, 5.0)),
            "unpermute": _mem(25.0, (1.0, 4.0, 7.0, 5.0)),
            "regroup": _mem(15.0, (1.5, 6.0, 9.0, 6.0)),
            "copy": _mem(5.0, (1.0, 8.0, 12.0, 10.0)),
            "loss": _mem(30.0, (0.5, 2.0, 3.0, 2.5)),
        },
        gemm={"fp32": GemmFit(latency_us=20.0, per_expert_us=8.0, tflops=_tf((0.01, 0.04, 0.06)))},
        dense={"fp32": GemmFit(latency_us=10.0, tflops=_tf((0.02, 0.05, 0.07)))},
        alltoall={"scaleup": CommFit(latency_us=60.0, bandwidth_GBps=_tf((0.05, 1.0, 2.0)))},
    )
    return base.model_copy(update={"calibration": cal})


def _tf(ys: tuple[float, ...]) -> Curve:
    return Curve(x=[1e4, 1e6, 1e8], y=list(ys))


def zipf_tokens(total: int, E: int, skew: float) -> list[int]:
    w = 1.0 / np.arange(1, E + 1) ** skew
    counts = np.floor(w / w.sum() * total).astype(int)
    counts[0] += total - counts.sum()
    return [int(c) for c in counts]


def _row(suite: str, op: str, t: float, **kw: Any) -> dict[str, Any]:
    base = {"suite": suite, "op": op, "dtype": "fp32", "device": "cpu"}
    return {**base, "device_name": "synthetic cpu", "median_s": t, **kw}


def true_rows(cm: CostModel, suites: tuple[str, ...] = SUITES) -> list[dict[str, Any]]:
    """Noise-free rows for every suite on a small grid; slower strategies are 1.25x."""
    rows: list[dict[str, Any]] = []
    Ts = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    if "gating" in suites:
        for kind in ("softmax_topk", "sigmoid_topk"):
            for T in Ts:
                for E in (8, 64):
                    t = float(cm.gate_s(T, D, E, 2, "fp32", kind=kind))
                    rows.append(_row("gating", kind, t, T=T, D=D, E=E, K=2))
    if "dispatch" in suites:
        for op in ("permute", "unpermute"):
            for T in Ts:
                nbytes = getattr(work, f"{op}_bytes")(T, D, 2, 4.0)
                t = float(cm.memory_s(op, nbytes))
                for strat, slow in (("sort", 1.0), ("scatter", 1.25)):
                    rows.append(_row("dispatch", op, t * slow, strategy=strat, T=T, D=D, E=8, K=2))
        for T in Ts:  # T*K rows received from 2 ranks, sorted over 4 local experts
            t = float(cm.regroup_s(T * 2, D, "fp32"))
            kw = dict(strategy="sort_chunks", T=T, D=D, E=8, K=2, world=2)
            rows.append(_row("dispatch", "regroup", t, **kw))
    if "roofline" in suites:
        for nbytes in np.geomspace(1e3, 1e9, 13):
            t = float(cm.memory_s("copy", nbytes))
            rows.append(_row("roofline", "copy", t, bytes=float(nbytes), ceiling="copy"))
        for n in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
            fl, nb = 2.0 * n**3, 12.0 * n * n
            t = float(cm.dense_s(fl, nb, "fp32"))
            rows.append(_row("roofline", "gemm", t, T=n, D=n, F=n, flops=fl, bytes=nb))
        for T in (64, 128, 256, 512, 1024, 2048, 4096, 8192):  # cross-entropy, V = 4096
            nbytes = 2.0 * T * 4096 * 4
            t = float(cm.memory_s("loss", nbytes))
            rows.append(_row("roofline", "loss", t, T=T, D=4096, bytes=nbytes, ceiling="copy"))
    if "experts" in suites:
        for E in (2, 4, 8, 16):
            for T in (4, 32, 256, 2048):
                for skew in (0.0, 1.0, 2.0):
                    m = zipf_tokens(T * 2, E, skew)
                    t = float(cm.experts_s(np.array(m), D, F, "fp32"))
                    tpe = str(m)
                    kw = dict(T=T, D=D, F=F, E=E, K=2, skew=skew, tokens_per_expert=tpe)
                    for strat, slow in (("grouped", 1.0), ("loop", 1.25)):
                        rows.append(_row("experts", "experts", t * slow, strategy=strat, **kw))
    if "alltoall" in suites:
        for world in (2, 4):
            for msg in np.geomspace(1e3, 1e8, 11):
                t = float(cm.alltoall_s("scaleup", msg * (world - 1) / world))
                for split in ("even", "uneven"):
                    kw = dict(world=world, msg_bytes=float(msg), split=split)
                    rows.append(_row("alltoall", "alltoall", t, **kw))
    return rows


def add_noise(rows: list[dict[str, Any]], noise: float, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        t = r["median_s"] * float(np.exp(rng.normal(0.0, noise)))
        out.append({**r, "median_s": t, "p20_s": t * (1 - noise), "p80_s": t * (1 + noise)})
    return out


def synthetic_results(
    path: Path, *, suites: tuple[str, ...] = SUITES, noise: float = 0.02, seed: int = 0
) -> Path:
    """A bench results file measured on :func:`truth_profile`'s device."""
    rows = add_noise(true_rows(CostModel(truth_profile()), suites), noise, seed)
    meta = {"commit": "abc123", "torch": "2.x", "threads": 1, "quick": True, "complete": True}
    return write_results(to_frame(rows), path, meta)


class SyntheticBench:
    """The synthetic bench's builders, as the ``bench`` fixture hands them to tests."""

    D, F, SUITES = D, F, SUITES
    mem = staticmethod(_mem)
    tf = staticmethod(_tf)
    truth = staticmethod(truth_profile)
    zipf_tokens = staticmethod(zipf_tokens)
    row = staticmethod(_row)
    true_rows = staticmethod(true_rows)
    add_noise = staticmethod(add_noise)
    results = staticmethod(synthetic_results)


@pytest.fixture(scope="session")
def bench() -> SyntheticBench:
    """Builders of synthetic bench rows and results files (a known "true" device)."""
    return SyntheticBench()


# -- simulator tests: round-number hardware, small scenarios --------------------------

# the round-number simulator builders live in tests/sim_builders.py (one source); the
# fixtures below hand them to tests, and module-level helpers import them directly
from sim_builders import hardware as _hardware  # noqa: E402
from sim_builders import scenario as _scenario  # noqa: E402


@pytest.fixture
def make_hardware() -> Any:
    """``make_hardware(*overrides, gpus_per_node=2)``: the round-number test profile."""
    return _hardware


@pytest.fixture
def make_scenario() -> Any:
    """``make_scenario(*overrides, base=None)``: the small test scenario (or ``base``)."""
    return _scenario
