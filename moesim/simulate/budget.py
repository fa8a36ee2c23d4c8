"""How long and how much memory one simulation takes, and the limits it must stay under.

The simulator's cost grows with the size of the scenario: SimPy events per
(EP group, layer, micro-batch), and numpy cells per (GPU, expert, layer,
micro-batch). :func:`estimate` prices a scenario with coefficients fitted to
``benchmarks/sim_speed.py --growth`` runs of the op-program engine
(DeepSeek-V3-like training steps: one pipeline stage at 64 to 65,536 GPUs, 2 to
58 layers, 1 to 8 micro-batches, 64 or 256 experts, EP 8 or 64; and the report's
PP16 DualPipe layout at 2,048 to 8,192 GPUs with 32 or 64 micro-batches; CPU
seconds and peak RSS of a fresh process on the 2-core VM). Refitted on 2026-12-04
after the session-9 speed work (``results/reference/xeon-2core/sim/growth-20261204-s10.txt``):
on those 13 runs the time estimate is within 0.79-1.13x of the measurement and the
memory estimate within 0.86-1.31x (the pipeline runs' peak: 0.88-0.99x). The fit
before it (2026-12-03) had gone 3-4x pessimistic on time (a 8,192-GPU PP16 step:
44.6 s estimated, 12-13 CPU s measured) and 0.5-0.7x optimistic on memory (533 MiB
against 1,010-1,070: the cached link shares). Two terms fitted to zero (the load
cells and the pipeline's extra events): their work is now small beside the events'.
Inference steps
(no backward) take less than estimated.

:func:`check_budget` refuses a scenario whose estimate is above the limits
(default :data:`MAX_SECONDS` and :data:`MAX_GIB`; the environment variables
``MOESIM_MAX_SIM_SECONDS`` and ``MOESIM_MAX_SIM_GIB`` change them) with a
:class:`~moesim.errors.ConfigError` that gives the estimate and the limit.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from moesim.config.scenario import Scenario
from moesim.errors import ConfigError

#: default limits: well above the 2048-GPU DeepSeek-V3 target (<= 10 s, <= 2 GiB)
MAX_SECONDS = 600.0
MAX_GIB = 8.0

# coefficients of :func:`time_terms` (CPU seconds) and :func:`memory_terms` (bytes),
# fitted by ``benchmarks/sim_speed.py --growth`` (see the module docstring)
_S = (0.11, 4.21e-4, 0.0, 7.99e-7, 0.0, 6.35e-5)
_B = (63.4e6, 801.0, 9.43, 4.48e3)


@dataclass(frozen=True)
class Estimate:
    """Predicted CPU seconds and peak bytes of one ``simulate()`` call."""

    seconds: float
    peak_bytes: float

    @property
    def gib(self) -> float:
        return self.peak_bytes / 2**30


def time_terms(G: int, L: int, E: int, mb: int, ep: int, pp: int) -> list[float]:
    """The size terms CPU seconds grow with (coefficients :data:`_S`).

    ``G`` GPUs, ``L`` MoE layers over all stages, ``E`` experts, ``mb`` micro-batches,
    ``ep``, ``pp``: start-up; the op program's events per (EP group, stage layer,
    micro-batch); (GPU, expert) load cells per stage layer and micro-batch; rate
    updates of concurrent groups (groups squared); in a pipeline, its extra events
    per group, stage layer and micro-batch (sends, waits, the schedule's lanes); and
    the per-local-expert work of each group, stage layer and micro-batch (many small
    EP groups: 2,048 GPUs at EP 8 hold 32 experts a GPU).
    """
    X, Ly, piped = max(1, G // max(1, ep)), math.ceil(L / max(1, pp)), float(pp > 1)
    return [1.0, X * Ly * mb, G * E * Ly * mb, X * X * Ly * mb, piped * X * Ly * mb,
            X * Ly * mb * E / max(1, ep)]  # fmt: skip


def memory_terms(G: int, L: int, E: int, mb: int, ep: int, pp: int) -> list[float]:
    """The size terms peak bytes grow with (coefficients :data:`_B`): the interpreter;
    recorded per-GPU times per stage layer and micro-batch; live (GPU, expert) load
    arrays; ops and coflows kept per EP group, stage layer and micro-batch."""
    X, Ly = max(1, G // max(1, ep)), math.ceil(L / max(1, pp))
    return [1.0, G * Ly * mb, G * E, X * Ly * mb]


def estimate(scn: Scenario) -> Estimate:
    """The cost of simulating one step of ``scn`` (see the module docstring)."""
    size = (
        scn.cluster.num_gpus,
        scn.model.num_moe_layers,
        scn.model.num_experts,
        scn.workload.micro_batches,
        scn.parallel.ep,
        scn.parallel.pp,
    )
    seconds = sum(c * t for c, t in zip(_S, time_terms(*size), strict=True))
    peak = sum(c * t for c, t in zip(_B, memory_terms(*size), strict=True))
    return Estimate(seconds, peak)


def limits() -> tuple[float, float]:
    """``(max seconds, max GiB)``: the defaults or the environment's overrides."""
    return _env("MOESIM_MAX_SIM_SECONDS", MAX_SECONDS), _env("MOESIM_MAX_SIM_GIB", MAX_GIB)


def _env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError("must be a number > 0", field=name, value=raw)
    return value


def check_budget(scn: Scenario, *, file: str | None = None) -> Estimate:
    """``estimate(scn)``, or a ConfigError when it is above :func:`limits`."""
    est = estimate(scn)
    max_s, max_gib = limits()
    if est.seconds <= max_s and est.gib <= max_gib:
        return est
    size = (
        f"{scn.cluster.num_gpus:,} GPUs x {scn.model.num_moe_layers} MoE layers x "
        f"{scn.workload.micro_batches} micro-batches x {scn.model.num_experts} experts"
    )
    raise ConfigError(
        f"too large to simulate here: {size} needs about {est.seconds:,.0f} s and "
        f"{est.gib:,.1f} GiB (limits {max_s:,.0f} s and {max_gib:,.1f} GiB; raise them "
        "with MOESIM_MAX_SIM_SECONDS / MOESIM_MAX_SIM_GIB)",
        file=file,
        field="cluster",
        has_value=False,
    )
