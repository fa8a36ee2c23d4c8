"""How fast does a big sweep run? Target: 200 variants of a 64-GPU scenario in <= 60 s.

    python benchmarks/sweep_speed.py [--jobs N] [--sweep FILE] [--limit N]

Runs ``scenarios/sweeps/qwen3-64gpu-200.yaml`` (Qwen3-30B-A3B, EP64 on 64
H100s; top-k x capacity factor x routing skew x dispatcher = 200 variants)
into a fresh temporary directory with ``--jobs`` local processes (default:
all cores), then prints the wall time, the per-variant simulate time and
whether the target is met. ``--limit`` runs only the first N variants.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from moesim.explore.runner import default_jobs, run_tasks
from moesim.explore.sweep import prepare_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "scenarios" / "sweeps" / "qwen3-64gpu-200.yaml"
TARGET_S = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=default_jobs())
    parser.add_argument("--sweep", default=str(SWEEP))
    parser.add_argument("--limit", type=int, help="run only the first N variants")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    spec, _, plan = prepare_sweep(args.sweep)
    tasks = plan.tasks[: args.limit] if args.limit else plan.tasks
    gpus = {t.scenario.cluster.num_gpus for t in tasks}
    t_plan = time.perf_counter() - t0
    single = _time_one(tasks[0])
    with tempfile.TemporaryDirectory() as out:
        t1 = time.perf_counter()
        run_tasks(tasks, jobs=args.jobs, parts_dir=Path(out) / "parts")
        t_run = time.perf_counter() - t1
    total = t_plan + t_run
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"sweep {spec.name}: {len(tasks)} runs, GPUs per scenario {sorted(gpus)}, "
        f"jobs {args.jobs}, load average {load}"
    )
    print(f"plan (validate variants) {t_plan:6.2f} s")
    print(f"one simulate (1st variant) {single:6.3f} s  (median of 3)")
    print(f"run (with part files)    {t_run:6.2f} s  = {t_run / len(tasks) * 1e3:.0f} ms per run")
    verdict = "MET" if total <= TARGET_S else "MISSED"
    print(f"total                    {total:6.2f} s  target <= {TARGET_S:.0f} s: {verdict}")
    return 0


def _time_one(task: object) -> float:
    from moesim.explore.runner import simulate_task

    times = []
    for _ in range(3):
        t = time.perf_counter()
        simulate_task(task)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
