"""moesim from Python (notebooks, scripts): the library the CLI calls.

>>> from moesim import api
>>> scn = api.load_scenario("scenarios/mixtral-8x7b-8xh100.yaml", top_k=1)
>>> result = api.simulate(scn)                         # a SimResult
>>> cmp = api.compare(scn, {"top_k": [1, 2], "hardware": ["h100-sxm", "h800-sxm"]})
>>> cmp.to_frame()                                     # one row per variant (pandas)

Override keys are the ones ``--set`` and ``--vary`` take: a dotted path
(``router.capacity_factor``) or its short alias (``capacity_factor``); see
:mod:`moesim.config.keys`. Bad input raises :class:`moesim.errors.UserError`
with the same one-line message the CLI prints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from moesim.config.base import Frozen
from moesim.config.hardware import HardwareProfile
from moesim.config.keys import canonical_key
from moesim.config.loader import (
    apply_overrides,
    check_pair,
    load_hardware,
    read_yaml,
    resolve_hf_config,
    scenario_overrides,
    validate,
)
from moesim.config.scenario import ModelConfig, Scenario
from moesim.errors import ConfigError
from moesim.explore.runner import Plan, Progress, auto_jobs, plan, run_tasks
from moesim.explore.summary import VariantSummary, summarize, summary_frame
from moesim.explore.sweep import SweepOutcome, run_sweep
from moesim.explore.variants import Axis, Variant, check_axes, expand
from moesim.simulate import SimResult
from moesim.simulate import simulate as _simulate
from moesim.simulate.budget import check_budget

__all__ = [
    "Comparison",
    "SimResult",
    "compare",
    "load_hardware",
    "load_scenario",
    "simulate",
    "sweep",
]

#: where a scenario came from: a YAML path, plain data, or a Scenario object
ScenarioSource = str | Path | Mapping[str, Any] | Scenario


def load_scenario(
    source: ScenarioSource,
    *,
    model: ModelConfig | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    **values: Any,
) -> Scenario:
    """A validated :class:`Scenario` from a YAML path, a dict or a Scenario.

    ``model`` replaces the scenario's ``model`` section (a :class:`ModelConfig`
    or its fields as a dict). ``overrides`` are ``--set`` strings
    (``"top_k=2"``); keyword ``values`` set keys directly
    (``top_k=2``, ``**{"router.capacity_factor": 1.25}``). A path's relative
    hardware profile, routing trace and ``model.hf_config`` resolve against the
    file's folder (a dict's against the working directory).
    """
    data, file = _scenario_data(source)
    if model is not None:
        data["model"] = model.model_dump(mode="json") if isinstance(model, Frozen) else dict(model)
    sets = [*overrides, *(f"{k}={json.dumps(v)}" for k, v in values.items())]
    data = apply_overrides(data, scenario_overrides(sets))
    folder = Path(file).parent if file else Path.cwd()
    data = resolve_hf_config(data, folder, file=file or "scenario")  # model: {hf_config: PATH}
    scn = validate(Scenario, data, file=file)
    return _resolved(scn, Path(file).parent) if file else scn


def _scenario_data(source: ScenarioSource) -> tuple[dict[str, Any], str | None]:
    if isinstance(source, Scenario):
        return source.model_dump(mode="json"), None
    if isinstance(source, Mapping):
        return apply_overrides(source, []), None  # a deep copy
    return read_yaml(source), str(source)


def _resolved(scn: Scenario, folder: Path) -> Scenario:
    """Relative hardware/trace paths taken from the file's folder when not found from here."""
    hw = folder / scn.hardware
    if not Path(scn.hardware).exists() and hw.is_file():
        scn = scn.model_copy(update={"hardware": str(hw)})
    routing = scn.workload.routing
    trace = routing.trace
    if trace is None or Path(trace).is_absolute() or Path(trace).exists():
        return scn
    if not (folder / trace).exists():
        return scn
    new_routing = routing.model_copy(update={"trace": str(folder / trace)})
    return scn.model_copy(
        update={"workload": scn.workload.model_copy(update={"routing": new_routing})}
    )


def hardware_for(
    scn: Scenario, hardware: str | HardwareProfile | None = None, *, file: str | None = None
) -> HardwareProfile:
    """The profile ``hardware`` names (default the scenario's own), checked against ``scn``.

    ``file`` names the scenario file in error messages.
    """
    if isinstance(hardware, HardwareProfile):
        hw = hardware
    else:
        try:
            hw = load_hardware(hardware or scn.hardware)
        except ConfigError as err:
            raise err.with_file(file) if file and err.file is None else err from None
    check_pair(scn, hw, file=file)
    return hw


def simulate(
    scenario: ScenarioSource,
    hardware: str | HardwareProfile | None = None,
    *,
    seed: int | None = None,
    trace: bool = False,
    traffic: bool = False,
    file: str | None = None,
) -> SimResult:
    """One simulated step: what ``moesim simulate`` prints, as a :class:`SimResult`.

    ``hardware`` is a profile name, path or object (default: the scenario's).
    ``seed`` None uses ``workload.seed``. ``traffic`` fills ``result.traffic`` (one
    dispatch's GPU x GPU bytes and link utilisation). ``result.to_dict()`` is the
    ``--json`` output.
    """
    scn = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    hw = hardware_for(scn, hardware, file=file)
    check_budget(scn, file=file)
    if hardware is not None:
        name = hardware if isinstance(hardware, str) else hw.name
        scn = scn.model_copy(update={"hardware": name})
    return _simulate(scn, hw, seed=seed, trace=trace, traffic=traffic)


@dataclass
class Comparison:
    """One scenario under several variants: ``moesim compare`` as an object.

    ``axes``: the varied keys (dotted); ``rows``: one :class:`VariantSummary` per
    variant, first axis slowest; ``row.result`` is that variant's SimResult dict.
    """

    axes: list[str]
    rows: list[VariantSummary]

    def to_frame(self) -> pd.DataFrame:
        """One row per variant: axis columns, metric means and ``<metric>_ci95``."""
        return summary_frame(self.rows, self.axes)

    def results(self) -> dict[str, dict[str, Any]]:
        """``{variant label: SimResult dict}`` at the scenario's own seed."""
        return {r.variant.label(): r.result for r in self.rows}


def compare(
    scenario: ScenarioSource,
    vary: Mapping[str, Sequence[Any]] | Sequence[Axis],
    *,
    seeds: int = 1,
    jobs: int = 1,
    progress: Progress | None = None,
    file: str | None = None,
) -> Comparison:
    """Simulate every combination of ``vary`` (``{"top_k": [1, 2]}``) with ``seeds`` seeds.

    The key ``hardware`` varies the profile. ``jobs`` > 1 runs in processes;
    0 picks all cores when there are enough runs to repay a pool's start.
    ``file`` (the scenario's path) resolves relative profiles and names errors.
    """
    planned = plan_comparison(scenario, vary, seeds=seeds, file=file)
    return run_comparison(planned, jobs=jobs, progress=progress)


@dataclass
class PlannedComparison:
    """Every variant validated and paired with its profile; nothing run yet."""

    axes: list[str]
    variants: list[Variant]
    plan: Plan


def plan_comparison(
    scenario: ScenarioSource,
    vary: Mapping[str, Sequence[Any]] | Sequence[Axis],
    *,
    seeds: int = 1,
    file: str | None = None,
) -> PlannedComparison:
    """The first half of :func:`compare`: bad variants fail here, before any run."""
    scn = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    axes = _axes(vary)
    check_axes(axes)
    variants = expand(axes)
    p = plan(scn.model_dump(mode="json"), variants, seeds=seeds, file=file)
    return PlannedComparison([k for k, _ in axes], variants, p)


def run_comparison(
    planned: PlannedComparison, *, jobs: int = 1, progress: Progress | None = None
) -> Comparison:
    """The second half of :func:`compare`: run the planned tasks and summarise them."""
    tasks = planned.plan.tasks
    records = run_tasks(tasks, jobs=auto_jobs(len(tasks), jobs), progress=progress)
    return Comparison(planned.axes, summarize(planned.variants, records))


def _axes(vary: Mapping[str, Sequence[Any]] | Sequence[Axis]) -> list[Axis]:
    items = vary.items() if isinstance(vary, Mapping) else vary
    out: list[Axis] = []
    for key, values in items:
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            values = [values]
        canon = "hardware" if key == "hardware" else canonical_key(key, flag="vary")
        out.append((canon, tuple(values)))
    return out


def sweep(
    sweep_file: str | Path,
    *,
    out_dir: str | Path | None = None,
    jobs: int = 1,
    seeds: int | None = None,
    ray_address: str | None = None,
) -> SweepOutcome:
    """Run a sweep file like ``moesim sweep``; ``.runs`` and ``.summary`` are DataFrames."""
    return run_sweep(sweep_file, out_dir=out_dir, jobs=jobs, seeds=seeds, ray_address=ray_address)
