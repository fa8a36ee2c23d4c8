"""Huge inputs stay bounded: a scenario too big to simulate is refused with its estimate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moesim import api
from moesim.cli import main
from moesim.errors import ConfigError
from moesim.simulate import budget

REPO = Path(__file__).resolve().parents[1]
DSV3 = REPO / "scenarios" / "deepseek-v3-2048xh800.yaml"
HUGE = ["cluster.nodes=102400"]  # 819,200 GPUs: 800 x (etp*ep*pp = 1024); dp derived


def test_the_estimate_grows_with_each_size_term() -> None:
    base = api.load_scenario(DSV3)
    e0 = budget.estimate(base)
    for key, value in [
        ("num_moe_layers", 116),
        ("micro_batches", 64),  # the scenario runs 32 (DualPipe at PP16)
        ("num_experts", 512),
        ("cluster.nodes", 512),
    ]:
        bigger = budget.estimate(api.load_scenario(DSV3, **{key: value}))
        assert bigger.seconds > e0.seconds and bigger.peak_bytes > e0.peak_bytes, key


def test_the_speed_targets_are_inside_the_limits() -> None:
    """The 2048-GPU DeepSeek-V3 step (target <= 10 s, <= 2 GiB; benchmarks/sim_speed.py
    measures it: 2.7-3.6 s here) is estimated inside its target and far inside the limits."""
    est = budget.estimate(api.load_scenario(DSV3))
    assert 1 < est.seconds < 10 and est.gib < 2
    assert est.seconds < budget.MAX_SECONDS / 10 and est.gib < budget.MAX_GIB / 4
    assert budget.check_budget(api.load_scenario(DSV3)) == est


def test_800k_gpus_are_refused_with_the_estimate_and_the_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["simulate", str(DSV3)] + [a for kv in HUGE for a in ("--set", kv)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(DSV3) in err
    assert "819,200 GPUs" in err and "limits 600 s and 8.0 GiB" in err
    assert "MOESIM_MAX_SIM_SECONDS" in err


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    scn = api.load_scenario(DSV3)
    monkeypatch.setenv("MOESIM_MAX_SIM_SECONDS", "0.01")
    with pytest.raises(ConfigError, match=r"limits 0 s"):
        budget.check_budget(scn)
    monkeypatch.setenv("MOESIM_MAX_SIM_SECONDS", "nope")
    with pytest.raises(ConfigError, match="MOESIM_MAX_SIM_SECONDS = 'nope': must be a number"):
        budget.check_budget(scn)


def test_a_sweep_refuses_a_huge_variant_before_running_any(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tiny = REPO / "scenarios" / "tiny-cpu.yaml"
    monkeypatch.setenv("MOESIM_MAX_SIM_GIB", "0.001")
    with pytest.raises(ConfigError, match=r"variant top_k=1\): cluster: too large"):
        api.compare(tiny, {"top_k": [1, 2]})


def test_the_refusal_is_fast_and_small() -> None:
    """The refusal comes before any big allocation: a fresh process stays small.

    Peak memory is the process's own ``VmHWM`` (``ru_maxrss`` would start at the
    parent's peak: Linux keeps it across fork and exec).
    """
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc/self/status")
    code = (
        "from pathlib import Path\n"
        "from moesim.cli import main\n"
        f"rc = main(['simulate', {str(DSV3)!r}, '--set', {HUGE[0]!r}])\n"
        "hwm = [ln for ln in Path('/proc/self/status').read_text().splitlines()\n"
        "       if ln.startswith('VmHWM:')][0].split()[1]\n"
        "print(rc, int(hwm) / 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, peak_mib = proc.stdout.split()
    assert rc == "2" and float(peak_mib) < 400
