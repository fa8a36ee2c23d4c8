"""Scenario sections for routing over many steps and for expert placement.

``placement:`` (top level of a scenario) says which GPU of an EP group holds
which expert, with optional redundant copies (EPLB); ``workload.routing.dynamics:``
says how per-expert loads move from one training step to the next. Both are
read by :mod:`moesim.simulate.placement` and :mod:`moesim.simulate.dynamics`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.config.base import FieldError, Frozen

PLACEMENTS = ("contiguous", "balanced", "eplb")
BALANCING = ("none", "aux_loss", "bias")


class PlacementConfig(Frozen):
    """Expert -> GPU mapping inside every EP group.

    ``contiguous``: expert ``e`` on rank ``e // (E / ep)`` (no copies).
    ``balanced``: each rank still holds ``E / ep`` experts, chosen by greedy
    balanced packing of the expected per-expert loads (DeepSeek EPLB with no
    redundancy). ``eplb``: ``redundant_experts`` extra copies of the hottest
    experts, then balanced packing of all copies; ``hierarchical`` packs the
    ``num_groups`` expert groups (default ``router.n_group``) to nodes first
    and keeps every copy inside its group's node (DeepSeek's node-limited policy).
    """

    kind: Literal["contiguous", "balanced", "eplb"] = "contiguous"
    redundant_experts: int = Field(default=0, ge=0)  # extra copies per EP group
    hierarchical: bool = False
    num_groups: int | None = Field(default=None, ge=1)  # expert groups (default router.n_group)
    rebalance_every: int = Field(default=0, ge=0)  # steps between re-placements (0: once)

    @model_validator(mode="after")
    def _redundant(self) -> PlacementConfig:
        if self.kind != "eplb" and self.redundant_experts:
            raise FieldError(
                "redundant_experts", self.redundant_experts, "needs kind: eplb (or set it to 0)"
            )
        return self


class DynamicsConfig(Frozen):
    """Per-step expert popularity over a training run (``moesim simulate --steps N``).

    ``source: parametric``: per layer, log-popularity ``z`` follows an AR(1)
    process around the scenario's own popularity (``routing.distribution``):
    ``z[t+1] = mu + persistence·(z[t] - mu) + drift·N(0, 1)`` starting
    ``initial_scale`` times as skewed as ``mu``, the skew of ``mu`` growing
    linearly, ``max(0, 1 + sharpening·t)`` times ``mu - mean(mu)`` at step ``t``
    (router logits that sharpen over training; fitted to the measured runs by
    ``moesim validate --dynamics``); the router picks by
    ``softmax(z + b)``; ``balancing`` acts on the simulated loads each step:
    ``bias`` is DeepSeek-V3's ``b_i <- b_i + gamma·sign(mean load - load_i)``,
    ``aux_loss`` moves ``b_i`` by ``-aux_rate·(load_i / mean - 1)``.
    ``source: trace``: the per-step, per-layer loads of a parquet file written by
    ``moesim bench --suite dynamics`` (``run`` picks one of its runs).
    """

    source: Literal["parametric", "trace"] = "parametric"
    steps: int = Field(default=0, ge=0)  # 0: one static step (today's simulate)
    persistence: float = Field(default=0.9, ge=0, le=1)
    drift: float = Field(default=0.05, ge=0)  # sd of the per-step innovation, log units
    initial_scale: float = Field(default=1.0, ge=0)
    sharpening: float = Field(default=0.0, ge=-0.1, le=0.1)  # per-step growth of mu's skew
    balancing: Literal["none", "aux_loss", "bias"] = "none"
    gamma: float = Field(default=0.001, ge=0)  # bias update speed, log-popularity units
    aux_rate: float = Field(default=0.0, ge=0)
    trace: str | None = None  # parquet of per-step loads (source: trace)
    run: str | None = None  # which run of the trace (default: the first)
    imbalance_target: float = Field(default=1.2, ge=1.0)  # "time to reach" this max/mean
    series_every: int = Field(default=1, ge=1)  # keep every n-th step in the series

    @model_validator(mode="after")
    def _trace(self) -> DynamicsConfig:
        if self.source == "trace" and not self.trace:
            raise FieldError("trace", None, "required when source is 'trace' (a parquet path)")
        return self
