"""Simulator speed: a DeepSeek-V3-like training step from 8 to 8192 GPUs.

From 2048 GPUs up the step is the scenario's: PP16 DualPipe over 32 micro-batches,
EP64, ZeRO-1 DP with overlapped buckets; below, one pipeline stage with two
overlapped micro-batches.

Run: ``python benchmarks/sim_speed.py [--sizes 8,64,256,2048,8192] [--layers 58]``.
``--repeat N`` times every size N times, the sizes interleaved (so a slow spell of
a shared host falls on all of them), and prints the median wall and CPU seconds,
their range, and in how many runs each size met its target.
``--growth`` instead runs a grid that varies GPUs, layers, experts, micro-batches
and EP one at a time, fits the cost model of :mod:`moesim.simulate.budget`
(CPU seconds and peak memory against the size terms) and prints the fitted
coefficients and each run's estimate / measurement.
Each size runs in its own process so that its peak memory (max RSS) is its own.
Prints wall and CPU seconds, simulation events, events/s, peak memory, and
the growth of CPU time against the previous size divided by the growth in
GPUs (about 1.0 when the cost is linear in GPUs x layers). Targets
(ARCHITECTURE.md#contracts): 2048 GPUs x 58 MoE layers, forward and backward,
in <= 10 s wall and <= 2 GiB; a 64-GPU scenario well under 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "scenarios" / "deepseek-v3-2048xh800.yaml"

CHILD = r"""
import json, resource, sys, time
from moesim.config import load_pair
from moesim.simulate import simulate
gpus, layers = int(sys.argv[1]), int(sys.argv[2])
E, mb, ep = (int(a) for a in sys.argv[4:7]) if len(sys.argv) > 4 else (256, 2, min(64, gpus))
# the report's layout (PP16 DualPipe, 32 micro-batches) from 2048 GPUs up; below, one
# stage with two overlapped micro-batches; the --growth grid names its pp (argv[7])
pp = int(sys.argv[7]) if len(sys.argv) > 7 else (16 if gpus >= 2048 and len(sys.argv) <= 4 else 1)
overrides = [f"cluster.nodes={gpus // 8}", f"parallel.ep={ep}",
             f"model.num_moe_layers={layers}", f"model.num_experts={E}", f"parallel.pp={pp}"]
if pp == 1:
    overrides += ["parallel.pp_schedule=1f1b", "parallel.pp_last_stage_layers=null",
                  f"workload.micro_batches={mb}", "workload.overlap_micro_batches=true"]
elif len(sys.argv) > 7:
    overrides += [f"workload.micro_batches={mb}"]
scn, hw = load_pair(sys.argv[3], overrides)
t0, c0 = time.perf_counter(), time.process_time()
res = simulate(scn, hw)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
from moesim.simulate.budget import estimate
est = estimate(scn)
print(json.dumps({"gpus": gpus, "wall_s": wall, "cpu_s": cpu, "events": res.details["sim_events"],
                  "peak_bytes": rss, "step_time_s": res.step_time_s, "est_s": est.seconds,
                  "est_MiB": est.peak_bytes / 2**20}))
"""


def measure(gpus: int, layers: int, *extra: int) -> dict:
    """One simulate() in a fresh process; ``extra`` = (experts, micro-batches, ep)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(gpus), str(layers), str(BASE), *map(str, extra)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


#: (GPUs, layers, experts, micro-batches, ep, pp): each size term varied on its own; pp 16
#: is the report's DualPipe layout (``layers`` over all stages)
GROWTH_GRID = [
    (64, 58, 256, 2, 64, 1),
    (2048, 8, 256, 2, 64, 1),
    (2048, 58, 256, 2, 64, 1),
    (2048, 58, 64, 2, 64, 1),
    (2048, 58, 256, 2, 8, 1),
    (2048, 58, 256, 8, 64, 1),
    (8192, 8, 256, 2, 64, 1),
    (32768, 4, 256, 1, 64, 1),
    (65536, 2, 256, 1, 64, 1),
    (2048, 58, 256, 32, 64, 16),
    (2048, 58, 256, 64, 64, 16),
    (4096, 58, 256, 32, 64, 16),
    (8192, 58, 256, 32, 64, 16),
]


def fit_growth() -> None:
    """Fit moesim.simulate.budget's coefficients (non-negative, relative error)."""
    from moesim.simulate.budget import memory_terms, time_terms

    tt, mt, cpu, rss = [], [], [], []
    for G, L, E, mb, ep, pp in GROWTH_GRID:
        r = measure(G, L, E, mb, ep, pp)
        tt.append(time_terms(G, L, E, mb, ep, pp))
        mt.append(memory_terms(G, L, E, mb, ep, pp))
        cpu.append(r["cpu_s"])
        rss.append(r["peak_bytes"])
        print(f"G={G} L={L} E={E} mb={mb} ep={ep} pp={pp}: {r['cpu_s']:.2f} CPU s, "
              f"{r['peak_bytes'] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    # imported only now: a child's peak RSS starts at its parent's (fork), so the
    # parent stays small while it measures
    import numpy as np
    from scipy.optimize import nnls

    for name, terms, y in (("seconds", tt, cpu), ("bytes", mt, rss)):
        A, b = np.array(terms, float), np.array(y, float)
        coef, _ = nnls(A / b[:, None], np.ones_like(b))
        print(f"{name} coefficients: {', '.join(f'{c:.3g}' for c in coef)}")
        print(f"  estimate / measured: {', '.join(f'{v:.2f}' for v in (A @ coef) / b)}")


#: wall-clock targets (ARCHITECTURE.md#contracts) by GPU count
TARGET_S = {2048: 10.0, 8192: 20.0}


def repeat(sizes: list[int], layers: int, n: int) -> None:
    """Every size ``n`` times, interleaved; median and range of wall and CPU seconds."""
    runs: dict[int, list[dict]] = {g: [] for g in sizes}
    for k in range(n):
        for g in sizes:
            runs[g].append(measure(g, layers))
        print(f"round {k + 1}/{n}: " + ", ".join(
            f"{g} GPUs {runs[g][-1]['wall_s']:.2f} s" for g in sizes), flush=True)  # fmt: skip
    print(f"{'GPUs':>6} {'wall s (median, min-max)':>26} {'CPU s (median)':>15} "
          f"{'peak MiB':>9} {'target':>7} {'met':>7}")  # fmt: skip
    for g in sizes:
        wall = sorted(r["wall_s"] for r in runs[g])
        cpu = [r["cpu_s"] for r in runs[g]]
        peak = max(r["peak_bytes"] for r in runs[g]) / 2**20
        target = TARGET_S.get(g)
        met = f"{sum(w <= target for w in wall)}/{n}" if target else ""
        mid, mid_cpu = statistics.median(wall), statistics.median(cpu)
        print(f"{g:>6} {mid:>9.2f} ({wall[0]:6.2f}-{wall[-1]:6.2f}) "
              f"{mid_cpu:>15.2f} {peak:>9.0f} {target or '':>7} {met:>7}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64,256,2048,8192")
    parser.add_argument("--layers", type=int, default=58)
    parser.add_argument("--growth", action="store_true", help="fit the budget's cost model")
    parser.add_argument("--repeat", type=int, default=0, help="time every size N times")
    args = parser.parse_args()
    if args.growth:
        fit_growth()
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.repeat > 0:
        repeat(sizes, args.layers, args.repeat)
        return
    print(
        f"DeepSeek-V3-like training step, {args.layers} MoE layers, fwd+bwd "
        "(< 2048 GPUs: PP1, 2 micro-batches; >= 2048: PP16 DualPipe, 32 micro-batches)"
    )
    head = f"{'GPUs':>6} {'wall s':>8} {'CPU s':>8} {'events':>9} {'events/s':>10} {'peak MiB':>9}"
    print(head + f" {'growth':>7} {'step s':>8} {'est. s':>7} {'est. MiB':>8}")
    prev: dict | None = None
    for g in sizes:
        r = measure(g, args.layers)
        growth = "" if prev is None else f"{r['cpu_s'] / prev['cpu_s'] / (g / prev['gpus']):.2f}"
        print(
            f"{g:>6} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['events']:>9,} "
            f"{r['events'] / max(r['wall_s'], 1e-9):>10,.0f} {r['peak_bytes'] / 2**20:>9.0f} "
            f"{growth:>7} {r['step_time_s']:>8.3f} {r['est_s']:>7.2f} {r['est_MiB']:>8.0f}"
        )
        prev = r
    print("growth = (CPU time ratio) / (GPU ratio) against the previous size; 1.0 = linear")


if __name__ == "__main__":
    main()
