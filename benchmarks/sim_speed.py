"""Simulator speed: a DeepSeek-V3-like training step from 8 to 8192 GPUs.

From 2048 GPUs up the step is the scenario's: PP16 DualPipe over 32 micro-batches,
EP64, ZeRO-1 DP with overlapped buckets; below, one pipeline stage with two
overlapped micro-batches.

Run: ``python benchmarks/sim_speed.py [--sizes 8,64,256,2048,8192] [--layers 58]``.
Each size runs in its own process so that its peak memory (max RSS) is its own.
Prints wall and CPU seconds, simulation events, events/s, peak memory, and
the growth of CPU time against the previous size divided by the growth in
GPUs (about 1.0 when the cost is linear in GPUs x layers). Targets (DESIGN): 2048 GPUs x
58 MoE layers, forward and backward, in <= 10 s wall and <= 2 GiB; a 64-GPU
scenario well under 0.5 s.
"""

from __future__ import annotations

import argparse
import json
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
ep = min(64, gpus)
# the report's layout (PP16 DualPipe, 32 micro-batches) from 2048 GPUs up; below, one stage
pp = 16 if gpus >= 2048 else 1
overrides = [f"cluster.nodes={gpus // 8}", f"parallel.ep={ep}",
             f"model.num_moe_layers={layers}", f"parallel.pp={pp}"]
if pp == 1:
    overrides += ["parallel.pp_schedule=1f1b", "parallel.pp_last_stage_layers=null",
                  "workload.micro_batches=2", "workload.overlap_micro_batches=true"]
scn, hw = load_pair(sys.argv[3], overrides)
t0, c0 = time.perf_counter(), time.process_time()
res = simulate(scn, hw)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"gpus": gpus, "wall_s": wall, "cpu_s": cpu, "events": res.details["sim_events"],
                  "peak_bytes": rss, "step_time_s": res.step_time_s}))
"""


def measure(gpus: int, layers: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(gpus), str(layers), str(BASE)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64,256,2048,8192")
    parser.add_argument("--layers", type=int, default=58)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"DeepSeek-V3-like training step, {args.layers} MoE layers, fwd+bwd "
        "(< 2048 GPUs: PP1, 2 micro-batches; >= 2048: PP16 DualPipe, 32 micro-batches)"
    )
    head = f"{'GPUs':>6} {'wall s':>8} {'CPU s':>8} {'events':>9} {'events/s':>10} {'peak MiB':>9}"
    print(head + f" {'growth':>7} {'step s':>8}")
    prev: dict | None = None
    for g in sizes:
        r = measure(g, args.layers)
        growth = "" if prev is None else f"{r['cpu_s'] / prev['cpu_s'] / (g / prev['gpus']):.2f}"
        print(
            f"{g:>6} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['events']:>9,} "
            f"{r['events'] / max(r['wall_s'], 1e-9):>10,.0f} {r['peak_bytes'] / 2**20:>9.0f} "
            f"{growth:>7} {r['step_time_s']:>8.3f}"
        )
        prev = r
    print("growth = (CPU time ratio) / (GPU ratio) against the previous size; 1.0 = linear")


if __name__ == "__main__":
    main()
