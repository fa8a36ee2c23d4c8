"""Sweep files: a base scenario, the axes to vary, the metrics to plot, the seeds.

```yaml
name: mixtral-topk-capacity
scenario: ../mixtral-8x7b-8xh100.yaml   # relative to this file
set: [workload.tokens_per_gpu=4096]     # fixed overrides of the base (optional)
hardware: [h100-sxm, b200]              # an axis over profiles (optional)
axes:                                   # cartesian product, first axis slowest
  top_k: [1, 2, 4]
  router.capacity_factor: [1.0, 1.25, null]
linked:                                 # axes that vary together (one product dimension)
  - {ep: [8, 16, 32, 64], tp: [1, 1, 1, 1]}
metrics: [throughput_tokens_per_s, drop_fraction, alltoall_fraction]
seeds: 1
skip_invalid: false                     # true: leave out variants that fail validation
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from moesim.config.base import FieldError, Frozen
from moesim.config.loader import read_yaml, validate
from moesim.errors import ConfigError, UserError
from moesim.explore.metrics import plottable_metrics
from moesim.explore.variants import Axis, Variant, canonical_key, check_axes, expand

DEFAULT_METRICS = ["throughput_tokens_per_s", "alltoall_fraction", "drop_fraction"]


class SweepSpec(Frozen):
    name: str | None = None
    scenario: str
    set: list[str] = Field(default_factory=list)
    hardware: list[str] = Field(default_factory=list)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    linked: list[dict[str, list[Any]]] = Field(default_factory=list)
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS), min_length=1)
    seeds: int = Field(default=1, ge=1, le=1000)
    skip_invalid: bool = False

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: list[str]) -> list[str]:
        allowed = plottable_metrics()
        for i, m in enumerate(value):
            if m not in allowed and not (m.startswith("phase_") and m.endswith("_s")):
                raise FieldError(
                    str(i), m, f"unknown metric; allowed: {', '.join(allowed)}, phase_<name>_s"
                )
        return value


def load_sweep(path: str | Path) -> tuple[SweepSpec, Path]:
    """The validated sweep file and the path of its base scenario."""
    spec = validate(SweepSpec, read_yaml(path), file=str(path))
    beside = Path(path).parent / spec.scenario  # relative to the sweep file first
    scenario = beside if beside.is_file() else Path(spec.scenario)
    if not scenario.is_file():
        raise ConfigError(
            "scenario file not found (a path, relative to the sweep file or the working directory)",
            file=str(path),
            field="scenario",
            value=spec.scenario,
        )
    return spec, scenario


def sweep_axes(spec: SweepSpec, file: str) -> tuple[list[Axis], list[list[Axis]]]:
    """The canonical axes and linked groups of ``spec``; bad keys name the valid ones."""
    axes: list[Axis] = []
    if spec.hardware:
        axes.append(("hardware", tuple(spec.hardware)))
    flag = f"{file}: axes:"
    axes += [(canonical_key(k, flag=flag), tuple(v)) for k, v in spec.axes.items()]
    linked = [
        [(canonical_key(k, flag=f"{file}: linked:"), tuple(v)) for k, v in group.items()]
        for group in spec.linked
    ]
    check_axes([*axes, *(a for g in linked for a in g)], flag=flag)
    return axes, linked


def sweep_variants(spec: SweepSpec, file: str) -> tuple[list[Variant], list[str]]:
    """Every variant of the sweep, and the canonical keys that vary (table/plot axes)."""
    axes, linked = sweep_axes(spec, file)
    variants = expand(axes, linked)
    if not variants:
        raise UserError(f"{file}: the sweep has no variants (an axis with no values?)")
    keys = [k for k, _ in axes] + [k for g in linked for k, _ in g]
    return variants, keys
