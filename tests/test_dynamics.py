"""Load dynamics: the bias rule by hand, the parametric process, per-step pricing, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from sim_builders import hardware, scenario

from moesim.cli import main
from moesim.config.dynamics import DynamicsConfig
from moesim.errors import ConfigError
from moesim.simulate import simulate
from moesim.simulate.dynamics import (
    ParametricProcess,
    aux_update,
    bias_update,
    expected_excess,
    first_below,
)
from moesim.validation.dynamics import (
    chance_within_tolerance,
    fit_process,
    step_metrics,
    validate_dynamics,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "scenarios/tiny-cpu.yaml")
DYN = "workload.routing.dynamics"


def test_bias_update_by_hand() -> None:
    # loads 4, 2, 1, 1: mean 2, sign(mean - load) = -1, 0, +1, +1
    b = bias_update(np.zeros(4), np.array([4.0, 2, 1, 1]), 0.1)
    assert b.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    b = bias_update(b, np.array([1.0, 3, 1, 3]), 0.1)  # mean 2: +1, -1, +1, -1
    assert b.tolist() == pytest.approx([0.0, -0.1, 0.2, 0.0])


def test_aux_update_is_proportional_to_the_overload() -> None:
    b = aux_update(np.zeros(2), np.array([3.0, 1.0]), 0.5)  # mean 2: load/mean - 1 = 0.5, -0.5
    assert b.tolist() == pytest.approx([-0.25, 0.25])


def test_bias_rule_in_the_process_step_by_step() -> None:
    # no drift, full persistence: z stays; the bias alone moves the shares
    cfg = DynamicsConfig(persistence=1.0, drift=0.0, balancing="bias", gamma=math.log(3) / 2)
    z = np.log(np.array([[3.0, 1.0]]))
    proc = ParametricProcess(cfg, z, z, np.random.default_rng(0))
    assert proc.share()[0].tolist() == pytest.approx([0.75, 0.25])
    proc.observe(np.array([[3.0, 1.0]]))  # expert 0 over the mean: b = [-g, +g]
    assert proc.share()[0].tolist() == pytest.approx([0.5, 0.5])  # 3·e^-g = 1·e^g
    proc.observe(np.array([[2.0, 2.0]]))  # balanced: sign 0, nothing moves
    assert proc.share()[0].tolist() == pytest.approx([0.5, 0.5])


def test_ar1_without_rule_reverts_to_mu() -> None:
    cfg = DynamicsConfig(persistence=0.5, drift=0.0)
    mu = np.zeros((1, 2))
    proc = ParametricProcess(cfg, mu, np.array([[2.0, 0.0]]), np.random.default_rng(0))
    proc.observe(np.ones((1, 2)))
    assert proc.z.tolist() == [[1.0, 0.0]]
    proc.observe(np.ones((1, 2)))
    assert proc.z.tolist() == [[0.5, 0.0]]


def test_first_below_uses_a_running_mean() -> None:
    x = np.array([3.0, 3.0, 1.0, 1.0, 1.0])
    assert first_below(x, 1.5, 1) == 2
    assert first_below(x, 1.5, 2) == 3  # 2-step means 3, 3, 2, 1, 1
    assert first_below(np.array([2.0, 2.0]), 1.0, 2) is None


@pytest.mark.parametrize(("n", "p", "cap"), [(400, 0.1, 45), (1000, 0.02, 25), (200, 0.3, 70)])
def test_expected_excess_matches_the_binomial(n: int, p: float, cap: int) -> None:
    k = np.arange(n + 1)
    exact = float((np.maximum(k - cap, 0) * stats.binom.pmf(k, n, p)).sum())
    approx = float(expected_excess(float(n), np.array([p]), float(cap))[0])
    assert approx == pytest.approx(exact, rel=0.15, abs=0.05)


def _dyn(*extra: str) -> tuple[str, ...]:
    return ("model.num_experts=8", "parallel.ep=2", "workload.tokens_per_gpu=512",
            "workload.routing={distribution: zipf, zipf_exponent: 1.0}", *extra)  # fmt: skip


def test_step_zero_matches_the_static_engine_and_balance_is_cheaper() -> None:
    scn = scenario(*_dyn(f"{DYN}.steps=30", f"{DYN}.drift=0.0", f"{DYN}.persistence=1.0"))
    res = simulate(scn, hardware())
    ser, s = res.dynamics["series"], res.dynamics["summary"]
    assert len(ser["step_time_s"]) == 30 and s["steps"] == 30
    # the same popularity as the static step: same step time up to count noise
    assert ser["step_time_s"][0] == pytest.approx(res.step_time_s, rel=0.05)
    assert s["balanced_step_time_s"] < s["mean_step_time_s"]
    assert s["extra_time_vs_balanced_s"] > 0


def test_bias_balancing_lowers_imbalance_and_drops_over_steps() -> None:
    base = _dyn(f"{DYN}.steps=80", f"{DYN}.drift=0.0", "router.capacity_factor=1.25")
    none = simulate(scenario(*base), hardware()).dynamics
    bias = simulate(scenario(*base, f"{DYN}.balancing=bias", f"{DYN}.gamma=0.05"), hardware())
    b = bias.dynamics
    assert b["series"]["expert_imbalance"][-1] < 0.6 * none["series"]["expert_imbalance"][-1]
    assert b["summary"]["mean_drop_fraction"] < none["summary"]["mean_drop_fraction"]
    assert (
        b["summary"]["steps_to_target"] is not None and none["summary"]["steps_to_target"] is None
    )
    again = simulate(scenario(*base, f"{DYN}.balancing=bias", f"{DYN}.gamma=0.05"), hardware())
    assert again.dynamics == b  # same scenario and seed, same numbers


def _trace(path: Path, steps: int = 40, E: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for scheme in ("none", "bias"):
        p = np.full(E, 1.0 / E)
        for step in range(steps):
            p = np.exp(np.log(p) + 0.05 * rng.standard_normal(E))
            p /= p.sum()
            for layer in range(2):
                load = rng.multinomial(512, p).tolist()
                rows.append({"run": f"{scheme}-s0", "scheme": scheme, "seed": 0, "step": step,
                             "layer": layer, "tokens": 256, "top_k": 2, "load": load})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_a_recorded_trace_drives_the_steps(tmp_path: Path) -> None:
    trace = _trace(tmp_path / "t.parquet")
    scn = scenario(*_dyn(f"{DYN}.source=trace", f"{DYN}.trace={trace}", f"{DYN}.run=bias-s0",
                         f"{DYN}.steps=40"))  # fmt: skip
    res = simulate(scn, hardware())
    assert len(res.dynamics["series"]["expert_imbalance"]) == 40
    bad = scenario(*_dyn(f"{DYN}.source=trace", f"{DYN}.trace={trace}", f"{DYN}.steps=41"))
    with pytest.raises(ConfigError, match="fewer than asked"):
        simulate(bad, hardware())


def test_simulate_steps_cli_json_and_table(capsys) -> None:
    assert main(["simulate", TINY, "--steps", "5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dynamics"]["summary"]["steps"] == 5
    assert set(d["dynamics"]["series"]) >= {"step", "step_time_s", "drop_fraction"}
    assert main(["simulate", TINY, "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "Over 5 steps" in out and "perfectly balanced" in out
    assert main(["simulate", TINY, "--steps", "0"]) == 2


def test_compare_shows_dynamics_columns(capsys) -> None:
    args = ["compare", TINY, "--set", f"{DYN}.steps=5",
            "--vary", f"{DYN}.balancing=none,bias", "--seeds", "2"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mean step" in out and "vs balanced" in out and "±" in out


def test_fit_recovers_a_known_ar1() -> None:
    # the fitted process's own output: rho 0.8, drift 0.1, n large (little sampling noise)
    cfg = DynamicsConfig(persistence=0.8, drift=0.1)
    mu = np.log(np.linspace(1, 2, 16))[None].repeat(2, 0)
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(1))
    n = 200_000
    shares = []
    for _ in range(400):
        shares.append(np.random.default_rng(len(shares)).multinomial(n, proc.share()) / n)
        proc.observe(np.zeros_like(mu))
    fit = fit_process(np.array(shares), n)
    assert np.median(fit.persistence_LE) == pytest.approx(0.8, abs=0.15)
    assert np.median(fit.drift_LE) == pytest.approx(0.1, rel=0.3)
    assert np.abs(fit.sharpening_L1).max() < 2e-3  # a fixed level: no sharpening


def _shares_of(proc: ParametricProcess, steps: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(99)
    out = []
    for _ in range(steps):
        out.append(rng.multinomial(n, proc.share()) / n)
        proc.observe(np.zeros_like(proc.z))
    return np.array(out)


def test_fit_recovers_per_expert_persistence_and_drift() -> None:
    # (rho, drift) = (0.3, 0.1), (0.3, 0.2), (0.8, 0.1), (0.8, 0.2), 16 experts of each
    # (E = 64: the softmax's shared normaliser barely mixes them); 40 layers are replicates
    rho, drift = np.tile([0.3, 0.3, 0.8, 0.8], 16), np.tile([0.1, 0.2, 0.1, 0.2], 16)
    mu = np.zeros((40, 64))
    cfg = DynamicsConfig()
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(3), persistence=rho, drift=drift)
    fit = fit_process(_shares_of(proc, 120, 10**8), 10**8)
    got_rho = fit.persistence_LE.mean(0).reshape(16, 4).mean(0)
    got_drift = fit.drift_LE.mean(0).reshape(16, 4).mean(0)
    assert got_rho == pytest.approx([0.3, 0.3, 0.8, 0.8], abs=0.1)
    assert got_drift == pytest.approx([0.1, 0.2, 0.1, 0.2], rel=0.2)


def test_fit_recovers_the_sharpening() -> None:
    # spread over experts grows as 1 + k·t: seen from the last step, k / (1 + k·(T - 1))
    k, T = 0.004, 150
    mu = np.log(np.linspace(1, 4, 16))[None].repeat(2, 0)
    cfg = DynamicsConfig(persistence=0.0, drift=0.01, sharpening=k)
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(4))
    fit = fit_process(_shares_of(proc, T, 10**7), 10**7)
    assert fit.sharpening_L1.ravel() == pytest.approx(k / (1 + k * (T - 1)), rel=0.15)


def test_sharpening_scales_the_level_linearly_down_to_flat() -> None:
    mu = np.array([[1.0, -1.0]])
    cfg = DynamicsConfig(persistence=0.0, drift=0.0)
    cases = [(0.5, [[1.5, -1.5], [2.0, -2.0]]), (-0.5, [[0.5, -0.5], [0.0, 0.0], [0.0, 0.0]])]
    for k, want in cases:
        proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(0), sharpening=k)
        for level in want:
            proc.observe(np.ones((1, 2)))
            assert proc.z.tolist() == [level]


def test_step_metrics_by_hand() -> None:
    # n = 8 assignments over E = 2 at cf 1: capacity 4; loads 6, 2 drop 2 of 8
    drop, imb = step_metrics(np.array([[[6.0, 2.0]]]), 8, 1.0)
    assert drop.tolist() == [0.25] and imb.tolist() == [1.5]


def test_chance_within_tolerance_by_hand() -> None:
    # 4 paths x 2 steps; path means: drop 10.0, 10.4, 10.6, 11.8 % (mean 10.7: errors
    # 0.7, 0.3, 0.1, 1.1 pp), max/mean 2.0, 2.0, 2.0, 2.4 (mean 2.1: errors 5, 5, 5, 12.5 %)
    drop_Q = np.array([0.100, 0.104, 0.106, 0.118])
    imb_Q = np.array([2.0, 2.0, 2.0, 2.4])
    steps = np.array([-0.01, 0.01])
    q_drop, q_imb = drop_Q[:, None] + steps, imb_Q[:, None] + steps
    assert chance_within_tolerance(q_drop, q_imb) == 0.5  # paths 1 and 2 pass both
    assert chance_within_tolerance(q_drop[:1], q_imb[:1]) == 1.0  # one path is its own mean


def test_validate_dynamics_cli(tmp_path: Path, capsys) -> None:
    trace = _trace(tmp_path / "t.parquet")
    rep = validate_dynamics(trace)
    assert [r["run"] for r in rep["runs"]] == ["none-s0", "bias-s0"]
    assert all(0.0 <= r["expected_ok"] <= 1.0 for r in rep["runs"])
    assert main(["validate", "--dynamics", str(trace), "--out", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"][0]["fit_steps"] == 20
    assert main(["validate", "--dynamics", str(trace), "--out", str(tmp_path)]) == 0
    assert "expected within tolerance" in capsys.readouterr().out
    assert main(["validate", "--dynamics", str(tmp_path / "missing.parquet")]) == 2


def test_expert_choice_loads_stay_balanced_over_steps() -> None:
    scn = scenario(*_dyn(f"{DYN}.steps=5", "router.kind=expert_choice", f"{DYN}.balancing=bias"))
    res = simulate(scn, hardware())
    s = res.dynamics["summary"]
    assert s["mean_drop_fraction"] == 0.0 and s["mean_expert_imbalance"] == pytest.approx(1.0)
    assert res.dynamics["series"]["step_time_s"][0] == pytest.approx(res.step_time_s, rel=1e-9)


def test_rebalancing_the_placement_follows_moving_loads() -> None:
    base = _dyn(f"{DYN}.steps=60", f"{DYN}.drift=0.0", f"{DYN}.balancing=bias",
                f"{DYN}.gamma=0.05", "placement.kind=eplb",
                "placement.redundant_experts=2")  # fmt: skip
    stale = simulate(scenario(*base), hardware()).dynamics["series"]["gpu_imbalance"]
    fresh = simulate(scenario(*base, "placement.rebalance_every=10"), hardware())
    series = fresh.dynamics["series"]["gpu_imbalance"]
    # placed for step 0's hot experts, a stale placement is off once the bias evens them out
    assert np.mean(series[-20:]) < np.mean(stale[-20:])


# -- learning-rate schedule, bootstrapped innovations ----------------------------------
def test_lr_factor_by_hand() -> None:
    from moesim.measure.router_train import TrainConfig, lr_factor

    cfg = TrainConfig(steps=13, warmup=3, lr_schedule="cosine", min_lr=0.1)
    # warm-up 1/3, 2/3, 1; then a half cosine over steps 3..12: mid (7.5) at 0.55, end 0.1
    assert [lr_factor(cfg, s) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(cfg, 3) == pytest.approx(1.0)
    assert lr_factor(cfg, 12) == pytest.approx(0.1)
    assert (lr_factor(cfg, 7) + lr_factor(cfg, 8)) / 2 == pytest.approx(0.55, abs=0.02)
    const = TrainConfig(steps=13, warmup=2)
    assert [lr_factor(const, s) for s in (0, 1, 2, 12)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_warped_ar1_by_hand() -> None:
    from moesim.simulate.dynamics import warp_ar1

    rho, sd = warp_ar1(0.5, 0.3, 2.0)  # two unit steps: rho², sd·sqrt(1 + rho²)
    assert float(rho) == pytest.approx(0.25)
    assert float(sd) == pytest.approx(0.3 * math.sqrt(1.25))
    for s in (0.1, 0.5, 3.0):  # the stationary variance sd² / (1 - rho²) is kept
        r, d = warp_ar1(np.array([0.0, 0.9]), np.array([0.2, 0.1]), s)
        assert d**2 / (1 - r**2) == pytest.approx([0.04, 0.01 / 0.19])
    r, d = warp_ar1(1.0, 0.1, 4.0)  # a random walk: variance grows with the time
    assert float(r) == 1.0 and float(d) == pytest.approx(0.2)


def test_zero_learning_rate_freezes_the_process() -> None:
    cfg = DynamicsConfig(persistence=0.5, drift=0.3, sharpening=0.1, balancing="aux_loss")
    cfg = cfg.model_copy(update={"aux_rate": 0.5})
    mu = np.array([[1.0, -1.0]])
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(0), lr_scale=np.zeros(5))
    for _ in range(5):
        proc.observe(np.array([[3.0, 1.0]]))
    assert proc.z.tolist() == [[1.0, -1.0]] and proc.b.tolist() == [[0.0, 0.0]]


def test_bootstrapped_innovations_are_the_given_rows() -> None:
    # rho 0, mu 0: each step's z is drift times one of the given rows, whole
    rows = np.array([[[1.0, -1.0]], [[-3.0, 3.0]]])
    cfg = DynamicsConfig(persistence=0.0, drift=0.5)
    mu = np.zeros((1, 2))
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(1), innovations=rows)
    seen = set()
    for _ in range(20):
        proc.step()
        seen.add(tuple(proc.z[0].tolist()))
    assert seen == {(0.5, -0.5), (-1.5, 1.5)}


def test_standard_residuals_by_hand() -> None:
    from moesim.validation.dynamics import standard_residuals

    d = np.array([0.0, 1.0, 0.0, 1.0, 0.0])[:, None, None]  # rho 0: residuals 1, 0, 1, 0
    e = standard_residuals(d, np.zeros((1, 1)))
    assert e is not None and e.ravel().tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0])
    line = np.arange(5.0)[:, None, None]  # rho 1 on a line: constant residuals, no spread
    e = standard_residuals(line, np.ones((1, 1)))
    assert e is not None and not e.any()


def _lr_cosine(T: int) -> np.ndarray:
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.arange(T) / (T - 1)))


def test_fit_recovers_the_sharpening_in_learning_rate_time() -> None:
    # the spread grows by k per unit of learning-rate time; the schedule decays it by 10x
    k, T = 0.004, 200
    lr = _lr_cosine(T)
    mu = np.log(np.linspace(1, 4, 16))[None].repeat(2, 0)
    cfg = DynamicsConfig(persistence=0.0, drift=0.01, sharpening=k)
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(4), lr_scale=lr)
    share = _shares_of(proc, T, 10**7)
    fit = fit_process(share, 10**7, lr_T=lr)
    # relative to the last 50 steps' rate, seen from the last step's level
    w = lr[-50:].mean()
    clock = np.r_[0.0, np.cumsum(lr)[:-1]][-1]
    want = k * w / (1 + k * clock)
    assert fit.sharpening_L1.ravel() == pytest.approx(want, rel=0.15)
    plain = fit_process(share, 10**7)  # counted in steps: the early fast growth read as now
    assert plain.sharpening_L1.ravel().min() > 1.5 * want


def test_fit_recovers_the_aux_rate_under_a_schedule() -> None:
    cfg = DynamicsConfig(persistence=0.9, drift=0.02, balancing="aux_loss", aux_rate=0.02)
    T, n = 200, 10**6
    lr = _lr_cosine(T)
    mu = np.log(np.linspace(1, 6, 16))[None].repeat(4, 0)
    mu = mu - mu.mean(-1, keepdims=True)
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(5), lr_scale=lr)
    rng, out = np.random.default_rng(6), []
    for _ in range(T):
        counts = rng.multinomial(n, proc.share()).astype(float)
        out.append(counts / n)
        proc.observe(counts)
    fit = fit_process(np.array(out), n, "aux_loss", lr_T=lr)
    # fitted per unit of the last 50 steps' learning rate: 0.02 per unit of lr
    assert fit.rate / lr[-50:].mean() == pytest.approx(0.02, rel=0.1)


def test_fit_recovers_the_level_after_an_excursion() -> None:
    # an AR(1) (rho 0.9) around a known level: the level is the mean of the last
    # PULL_STEPS steps (up to the small fitted sharpening), so the last steps' excursion
    # is left to revert
    from moesim.validation.dynamics import PULL_STEPS

    E, L = 16, 20
    mu = np.log(np.linspace(1, 3, E))[None].repeat(L, 0)
    mu = mu - mu.mean(-1, keepdims=True)
    cfg = DynamicsConfig(persistence=0.9, drift=0.065)
    proc = ParametricProcess(cfg, mu, mu, np.random.default_rng(7))
    share = _shares_of(proc, 300, 10**8)
    fit = fit_process(share, 10**8)
    level = fit.mu_LE - fit.mu_LE.mean(-1, keepdims=True)
    y = np.log(share[-PULL_STEPS:])
    m = (y - y.mean(-1, keepdims=True)).mean(0)
    # sharpening scales the spread per layer only: the same shape as that mean
    unit = lambda a: a / a.std(-1, keepdims=True)  # noqa: E731
    assert np.allclose(unit(level), unit(m), atol=1e-6)
    # the AR(1)'s stationary sd is 0.065 / sqrt(1 - 0.81) = 0.15: the last step is off by
    # about that, the mean of 100 steps (about 5 independent ones) by well under half
    err, last = (
        np.abs(level - mu).mean(),
        np.abs(np.log(share[-1]) - np.log(share[-1]).mean(-1, keepdims=True) - mu).mean(),
    )
    assert err < 0.5 * last


def test_validate_reads_the_learning_rate_schedule(tmp_path: Path) -> None:
    # a constant lr column is the step clock again; a decaying one changes the prediction
    plain = _trace(tmp_path / "t.parquet")
    table = pq.read_table(plain)
    steps = np.asarray(table.column("step").to_pylist(), dtype=float)
    for name, lr in (("const", np.full(len(steps), 1e-3)), ("decay", 1e-3 * 0.9**steps)):
        pq.write_table(table.append_column("lr", pa.array(lr)), tmp_path / f"{name}.parquet")
    base, const, decay = (
        validate_dynamics(tmp_path / f"{n}.parquet", capacity_factors=(1.0,))["runs"]
        for n in ("t", "const", "decay")
    )
    key = "predicted_max_mean"
    assert [r[key] for r in const] == pytest.approx([r[key] for r in base], rel=1e-12)
    assert [r[key] for r in decay] != pytest.approx([r[key] for r in base], rel=1e-6)
