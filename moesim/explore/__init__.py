"""Design-space exploration: variants of a scenario, run in parallel, summarised.

``variants`` expands ``--vary`` axes into validated scenarios, ``runner`` runs
(variant, seed) tasks serially, on a process pool or on Ray with resumable
part files, ``summary`` turns records into tidy frames and per-variant
estimates (``stats``: mean ± 95 % t-interval), ``sweep`` runs a sweep file.
No rich, no matplotlib, no torch here: rendering lives in ``moesim.report``.
"""

from moesim.explore.metrics import METRICS, Metric
from moesim.explore.runner import Plan, Task, plan, run_tasks
from moesim.explore.stats import Estimate, t_interval
from moesim.explore.variants import (
    Variant,
    aliases,
    canonical_key,
    expand,
    hardware_axis,
    parse_vary,
    variant_scenario,
)

__all__ = [
    "METRICS",
    "Estimate",
    "Metric",
    "Plan",
    "Task",
    "Variant",
    "aliases",
    "canonical_key",
    "expand",
    "hardware_axis",
    "parse_vary",
    "plan",
    "run_tasks",
    "t_interval",
    "variant_scenario",
]
