"""Run many (variant, seed) simulations: in-process, over local cores, or on Ray.

A :class:`Task` holds a validated scenario and hardware profile, so workers do
no file I/O. With ``parts_dir`` every finished task is written atomically to
``parts_dir/<key>.json`` (``key`` hashes the full scenario, profile and seed),
and a restarted run reuses those files instead of simulating again: a killed
sweep resumes where it stopped and still yields the same table.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesim import __version__
from moesim.config.hardware import HardwareProfile
from moesim.config.loader import check_pair, load_hardware
from moesim.config.scenario import Scenario
from moesim.errors import ConfigError, UserError
from moesim.explore.variants import Variant, variant_scenario
from moesim.io import atomic_write_text
from moesim.simulate.budget import check_budget

#: ``advance(n=1, description=None)``, called once per finished task
Progress = Callable[..., None]
#: one finished task: index, variant, seed, key, result (``SimResult.to_dict()``)
Record = dict[str, Any]


@dataclass(frozen=True)
class Task:
    """One simulation to run: ``variant`` of the scenario with routing ``seed``."""

    variant: Variant
    seed: int
    scenario: Scenario
    hardware: HardwareProfile
    key: str = field(default="", compare=False)

    @staticmethod
    def make(variant: Variant, seed: int, scn: Scenario, hw: HardwareProfile) -> Task:
        blob = json.dumps(
            {
                "moesim": __version__,
                "scenario": scn.model_dump(mode="json"),
                "hardware": hw.model_dump(mode="json"),
                "seed": seed,
            },
            sort_keys=True,
        )
        key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        return Task(variant, seed, scn, hw, key)


@dataclass
class Plan:
    """The tasks of a grid, and the variants left out as invalid (with the reason)."""

    tasks: list[Task]
    skipped: list[tuple[Variant, str]]

    @property
    def variants(self) -> list[Variant]:
        seen: dict[int, Variant] = {}
        for t in self.tasks:
            seen.setdefault(t.variant.index, t.variant)
        return list(seen.values())


def plan(
    base: Mapping[str, Any],
    variants: Sequence[Variant],
    *,
    seeds: int = 1,
    file: str | None = None,
    skip_invalid: bool = False,
) -> Plan:
    """Validate every variant of ``base`` (scenario JSON data) and pair it with its profile.

    Seeds are ``workload.seed + i`` for ``i < seeds``, so ``seeds=1`` is exactly
    what ``moesim simulate`` runs. An invalid variant raises :class:`UserError`
    unless ``skip_invalid``, which records it in :attr:`Plan.skipped` instead.
    """
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1")
    relative_to = Path(file).parent if file else None
    profiles: dict[str, HardwareProfile] = {}
    tasks: list[Task] = []
    skipped: list[tuple[Variant, str]] = []
    for variant in variants:
        try:
            scn = variant_scenario(base, variant, file=file)
            hw = _profile(scn.hardware, profiles, relative_to)
            where = f"{file or 'scenario'} (variant {variant.label()})"
            check_pair(scn, hw, file=where)
            check_budget(scn, file=where)  # before any run, like every other check
        except UserError as err:
            if not skip_invalid:
                raise
            skipped.append((variant, str(err)))
            continue
        base_seed = scn.workload.seed
        tasks += [Task.make(variant, base_seed + i, scn, hw) for i in range(seeds)]
    return Plan(tasks, skipped)


def _profile(
    name: str, cache: dict[str, HardwareProfile], relative_to: Path | None
) -> HardwareProfile:
    if name not in cache:
        try:
            cache[name] = load_hardware(name, relative_to=relative_to)
        except ConfigError as err:
            raise err if err.file else err.with_file("hardware axis") from None
    return cache[name]


# -- execution ----------------------------------------------------------------
def simulate_task(task: Task) -> dict[str, Any]:
    """Run one task (top level so process pools and Ray can pickle it)."""
    from moesim.simulate import simulate

    return dict(simulate(task.scenario, task.hardware, seed=task.seed).to_dict())


def run_tasks(
    tasks: Sequence[Task],
    *,
    jobs: int = 1,
    ray_address: str | None = None,
    parts_dir: str | Path | None = None,
    progress: Progress | None = None,
    execute: Callable[[Task], dict[str, Any]] = simulate_task,
) -> list[Record]:
    """Run ``tasks`` and return their records in task order.

    ``jobs > 1`` uses a local process pool, ``ray_address`` a Ray cluster.
    Tasks whose part file already exists in ``parts_dir`` are not run again.
    """
    advance = progress or (lambda n=1, description=None: None)
    done: dict[str, Record] = {}
    if parts_dir is not None:
        done = load_parts(parts_dir, tasks)
        if done:
            advance(len(done), description=f"resumed {len(done)} finished")
    todo = [t for t in tasks if t.key not in done]
    for task, result in _backend(todo, jobs, ray_address, execute):
        # through JSON either way, so fresh and resumed records are the same values
        text = json.dumps(make_record(task, result), indent=1)
        if parts_dir is not None:
            atomic_write_text(Path(parts_dir) / f"{task.key}.json", text + "\n")
        done[task.key] = json.loads(text)
        advance(1, description=task.variant.label())
    return [done[t.key] for t in tasks]


def make_record(task: Task, result: Mapping[str, Any]) -> Record:
    return {
        "index": task.variant.index,
        "variant": task.variant.values,
        "seed": task.seed,
        "key": task.key,
        "result": dict(result),
    }


def load_parts(parts_dir: str | Path, tasks: Iterable[Task]) -> dict[str, Record]:
    """Finished records for ``tasks`` found in ``parts_dir`` (unreadable files are rerun)."""
    out: dict[str, Record] = {}
    for task in tasks:
        path = Path(parts_dir) / f"{task.key}.json"
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("key") == task.key and "result" in record:
            out[task.key] = record
    return out


def _backend(
    tasks: Sequence[Task],
    jobs: int,
    ray_address: str | None,
    execute: Callable[[Task], dict[str, Any]],
) -> Iterator[tuple[Task, dict[str, Any]]]:
    if not tasks:
        return iter(())
    if ray_address:
        from moesim.explore.ray_backend import run_on_ray

        return run_on_ray(tasks, ray_address, execute)
    if jobs > 1 and len(tasks) > 1:
        return _run_pool(tasks, min(jobs, len(tasks)), execute)
    return ((t, execute(t)) for t in tasks)


def _run_pool(
    tasks: Sequence[Task], jobs: int, execute: Callable[[Task], dict[str, Any]]
) -> Iterator[tuple[Task, dict[str, Any]]]:
    """Local process pool; results as they finish. forkserver: safe with threads."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["moesim.simulate", "moesim.explore.runner"])
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        pending: dict[Future[dict[str, Any]], Task] = {pool.submit(execute, t): t for t in tasks}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield pending.pop(fut), fut.result()
        finally:
            for fut in pending:
                fut.cancel()


def auto_jobs(n_tasks: int, jobs: int = 0) -> int:
    """``jobs`` if > 0, else all cores when there are enough tasks to repay the pool's start."""
    if jobs > 0:
        return jobs
    return default_jobs() if n_tasks >= POOL_MIN_TASKS else 1


#: below this many tasks a process pool's start-up (~1 s) costs more than it saves
POOL_MIN_TASKS = 16


def default_jobs() -> int:
    """All local cores (at least 1)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
