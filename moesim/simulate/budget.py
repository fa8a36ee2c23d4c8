"""How long and how much memory one simulation takes, and the limits it must stay under.

The simulator's cost grows with the size of the scenario: SimPy events per
(EP group, layer, micro-batch), and numpy cells per (GPU, expert, layer,
micro-batch). :func:`estimate` prices a scenario with coefficients fitted to
``benchmarks/sim_speed.py --growth`` runs of the op-program engine
(DeepSeek-V3-like training steps, one pipeline stage, 64 to 65,536 GPUs, 2 to
58 layers, 1 to 8 micro-batches, 64 or 256 experts, EP 8 or 64; CPU seconds and
peak RSS of a fresh process on the quiet 2-core development VM). On those runs
the time estimate was within 0.75-1.18x of the measurement except one: 2,048
GPUs at EP 8 (256 EP groups of 58 layers) took 84 s, 3x the estimate, so
many small EP groups are under-estimated. The memory estimate was within
0.87-1.10x. Inference steps (no backward) take less than estimated.

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

# CPU seconds = sum of coefficient x size term (fitted, see the module docstring)
_S_FIXED = 0.106  # start-up of one simulate() call (profile, plan, program)
_S_PER_GROUP_LAYER_MB = 7.06e-4  # the op program's events of one EP group, layer, micro-batch
_S_PER_CELL = 5.01e-9  # one (GPU, expert) cell of one layer and micro-batch
_S_PER_GROUP2_LAYER_MB = 8.0e-7  # rate updates: concurrent groups x their events
# peak bytes
_B_FIXED = 57.0e6  # interpreter, numpy, simpy, moesim
_B_PER_GPU_LAYER_MB = 226.0  # recorded per-GPU times of one layer and micro-batch
_B_PER_GPU_EXPERT = 20.7  # live (GPU, expert) load arrays of one layer
_B_PER_GROUP_LAYER_MB = 6.26e3  # ops and coflows kept per EP group, layer, micro-batch


@dataclass(frozen=True)
class Estimate:
    """Predicted CPU seconds and peak bytes of one ``simulate()`` call."""

    seconds: float
    peak_bytes: float

    @property
    def gib(self) -> float:
        return self.peak_bytes / 2**30


def estimate(scn: Scenario) -> Estimate:
    """The cost of simulating one step of ``scn`` (see the module docstring)."""
    G = scn.cluster.num_gpus
    X = max(1, G // max(1, scn.parallel.ep))
    Ly = math.ceil(scn.model.num_moe_layers / max(1, scn.parallel.pp))
    E = scn.model.num_experts
    mb = scn.workload.micro_batches
    seconds = (
        _S_FIXED
        + _S_PER_GROUP_LAYER_MB * X * Ly * mb
        + _S_PER_CELL * G * E * Ly * mb
        + _S_PER_GROUP2_LAYER_MB * X * X * Ly * mb
    )
    peak = (
        _B_FIXED
        + _B_PER_GPU_LAYER_MB * G * Ly * mb
        + _B_PER_GPU_EXPERT * G * E
        + _B_PER_GROUP_LAYER_MB * X * Ly * mb
    )
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
