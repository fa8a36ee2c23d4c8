"""SimPy engine: each GPU's compute and communication streams through one step.

Legend: G = GPUs, P = EP ranks of a group.

Design (for speed at thousands of GPUs): one SimPy process per (EP group,
micro-batch) carries a vector of per-GPU times ``t_P`` instead of one process
per GPU. Compute ops between two collectives need no events: each GPU's
compute stream is a FIFO (``free_P``), so an op starts at
``max(ready, stream free)`` and ends ``seconds * slowdown`` later, all in
numpy. A collective is the only synchronisation point: the process waits
until its slowest participant is ready (``max(t_P)``), starts a coflow on the
group's network domain and sleeps until the fluid model says it is done.
Events are thus only collective starts, coflow finishes and rate changes.

A micro-batch's compute between two of its collectives is issued as one
block, in issue order (what a CUDA stream does with a fixed program order);
with ``overlap_micro_batches`` two micro-batches run as two processes whose
blocks interleave on the compute stream while the other's all-to-all is in
flight. Shared experts are issued before the dispatch is awaited, so they
overlap it, as Megatron-Core and DeepSeek do.

Per MoE layer, forward: norm → dense (attention) → [CP ring, exposed part] →
[TP all-gather + reduce-scatter] → norm → gate → permute → [shared experts,
their TP collectives] → dispatch → experts → [expert-TP AG + RS] → combine →
unpermute. Backward (training), layers in reverse: [recompute] → unpermute →
[shared experts] → combine (gradients, dispatch direction) → [ETP] → experts →
dispatch (gradients, combine direction) → permute → gate → norm → [TP] → [CP]
→ dense → norm. The micro-batch starts with the leading dense layers and ends
its forward with the LM head and loss (``head``), which its backward starts with.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy
from numpy.typing import NDArray

from moesim.simulate.network import FluidNetwork
from moesim.simulate.plan import Coflows, StepPlan

F64 = NDArray[np.float64]
COMPUTE_TID, COMM_TID = 0, 1
#: Chrome trace thread names: the compute stream and one comm row per overlapped micro-batch
THREADS = {COMPUTE_TID: "compute", COMM_TID: "comm", COMM_TID + 1: "comm (2nd micro-batch)"}


#: compute_s entry recomputed by each selective-recompute module (Megatron names);
#: ``moe`` and ``moe_act`` are per GPU (``LayerWork.recompute_s_G``)
SELECTIVE = {"attn_core": "core_attn", "norm": "layernorm", "shared_experts": "shared_experts"}


@dataclass
class Recorder:
    """Critical-path seconds per phase, per layer, and optional trace events."""

    trace_groups: int = 0  # record Chrome trace events of the first groups
    trace_gpus: int = 16
    max_events: int = 200_000
    phase_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    phase_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    layer_sum: dict[str, F64] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    log: list[tuple[str, float]] = field(default_factory=list)

    def phase(self, name: str, layer: int, seconds: float, layers: int) -> None:
        self.phase_sum[name] += seconds
        self.phase_n[name] += 1
        if name not in self.layer_sum:
            self.layer_sum[name] = np.zeros(layers)
        self.layer_sum[name][layer] += seconds

    def tracing(self, group: int) -> bool:
        return group < self.trace_groups and len(self.events) < self.max_events

    def span(self, gpus: Any, tid: int, name: str, start_P: F64, end_P: F64) -> None:
        n = min(len(gpus), self.trace_gpus)
        for gpu, s, e in zip(gpus[:n], start_P[:n], end_P[:n], strict=True):
            if e > s:
                self.events.append(
                    {
                        "name": name,
                        "ph": "X",
                        "pid": int(gpu),
                        "tid": tid,
                        "ts": float(s) * 1e6,
                        "dur": float(e - s) * 1e6,
                    }
                )


class GroupSim:
    """One EP group's GPUs: compute-stream state and the micro-batch processes."""

    def __init__(
        self, env: simpy.Environment, net: FluidNetwork, plan: StepPlan, group: int, rec: Recorder
    ) -> None:
        self.env, self.net, self.plan, self.group, self.rec = env, net, plan, group, rec
        self.gpus = plan.topo.group_gpus(group)
        P = len(self.gpus)
        self.idx = np.arange(group * P, (group + 1) * P)  # rows of the plan's [G] arrays
        self.free_P = np.zeros(P)
        self.busy_P = np.zeros(P)
        self.slow_P = plan.slowdown_G[self.gpus]
        self.slow_max = float(self.slow_P.max())
        self.comm_s = 0.0  # summed durations of this group's collectives
        self.blocked_s = 0.0  # summed seconds of closed-form TP / CP / ETP collectives
        self.finish = 0.0

    # -- ops -----------------------------------------------------------------
    def compute(self, t_P: F64, seconds: float | F64, name: str, layer: int) -> F64:
        """Run an op on every GPU's compute stream; returns the end times."""
        if isinstance(seconds, float):
            if seconds <= 0:
                return t_P
            dur = seconds * self.slow_P
            crit = seconds * self.slow_max
        else:
            dur = seconds * self.slow_P
            crit = float(dur.max())
        start = np.maximum(t_P, self.free_P)
        end = start + dur
        self.free_P = end
        self.busy_P += dur
        self.rec.phase(name, layer, crit, self.plan.layers)
        if self.rec.tracing(self.group):
            self.rec.span(self.gpus, COMPUTE_TID, name, start, end)
        return end

    def blocking(self, t_P: F64, seconds: float, name: str, layer: int, block: int) -> F64:
        """A collective of blocks of ``block`` consecutive ranks (TP, CP) priced in closed form.

        Each block starts when its slowest member is ready and holds its members
        for ``seconds``; the compute stream stays free for other micro-batches.
        A block larger than the group, or not tiling it, is synchronised per GPU.
        """
        if seconds <= 0:
            return t_P
        P = len(t_P)
        blk = block if 1 < block <= P and P % block == 0 else 1
        start = np.repeat(t_P.reshape(-1, blk).max(1), blk)
        end = start + seconds
        self.blocked_s += seconds
        self.rec.phase(name, layer, seconds, self.plan.layers)
        if self.rec.tracing(self.group):
            self.rec.span(self.gpus, COMM_TID, name, start, end)
        return end

    def collective(
        self, t_P: F64, name: str, layer: int, cf: Coflows, mb: int
    ) -> Generator[simpy.Event, Any, F64]:
        """Wait for the slowest participant, run the coflow, return everyone's end time."""
        if self.plan.topo.ep == 1:
            return t_P
        start = max(float(t_P.max()), self.env.now)
        g = self.group
        trace = self.rec.tracing(g)
        if trace:
            self.rec.log.append((f"{name}.start", start))
        lat, solo = float(cf.latency_X[g]), float(cf.solo_X[g])
        yield self.net.transfer(g, cf.demand_XL[g], lat, solo, start_s=start)
        end = self.env.now
        self.comm_s += end - start
        self.rec.phase(name, layer, end - start, self.plan.layers)
        if trace:
            self.rec.log.append((f"{name}.end", end))
            tid = COMM_TID + mb % 2  # overlapped micro-batches on their own comm rows
            self.rec.span(self.gpus, tid, f"wait {name}", t_P, np.full_like(t_P, start))
            self.rec.span(self.gpus, tid, name, np.full_like(t_P, start), np.full_like(t_P, end))
        return np.full_like(t_P, end)

    # -- one micro-batch -----------------------------------------------------
    def micro_batch(self, mb: int) -> Generator[simpy.Event, Any, None]:
        plan = self.plan
        c = plan.compute_s
        t = np.full(len(self.gpus), self.env.now)
        t = self.compute(t, c["dense_layers"], "dense_layers", 0)
        for layer in range(plan.layers):
            t = yield from self.forward_layer(t, layer, mb)
        t = self.compute(t, c["head"], "head", 0)
        if plan.training:
            t = self.compute(t, 2 * c["head"], "head_bwd", 0)
            for layer in reversed(range(plan.layers)):
                t = yield from self.backward_layer(t, layer, mb)
            t = self.compute(t, 2 * c["dense_layers"], "dense_layers_bwd", 0)
        self.finish = max(self.finish, float(t.max()))

    def forward_layer(
        self, t: F64, layer: int, mb: int, tag: str = ""
    ) -> Generator[simpy.Event, Any, F64]:
        """One MoE layer's forward; ``tag`` renames its phases (``_recompute``)."""
        c, w, par = self.plan.compute_s, self.plan.work[layer][mb], self.plan.scn.parallel
        t = self.compute(t, c["norm"] / 2, "norm" + tag, layer)
        t = self.compute(t, c["dense"], "dense" + tag, layer)
        t = self.blocking(t, c["cp_comm"], "cp_comm" + tag, layer, par.tp * par.cp)
        t = self.blocking(t, c["tp_comm"], "tp_comm" + tag, layer, par.tp)
        t = self.compute(t, c["norm"] / 2, "norm" + tag, layer)
        for op in ("gate", "permute"):
            t = self.compute(t, c[op], op + tag, layer)
        shared = self.compute(t, c["shared_experts"], "shared_experts" + tag, layer)
        if c["shared_experts"] > 0:
            shared = self.blocking(shared, c["tp_comm"], "tp_comm" + tag, layer, par.tp)
        t = yield from self.collective(t, "dispatch" + tag, layer, w.dispatch, mb)
        experts = w.experts_s_G[self.idx] + w.regroup_s_G[self.idx]
        t = self.compute(np.maximum(t, shared), experts, "experts" + tag, layer)
        t = self._etp(t, w.etp_s_G[self.idx], "etp_comm" + tag, layer)
        t = yield from self.collective(t, "combine" + tag, layer, w.combine, mb)
        return self.compute(t, c["unpermute"], "unpermute" + tag, layer)

    def _etp(self, t: F64, seconds_P: F64, name: str, layer: int) -> F64:
        """Expert-TP AG + RS: its ranks sit in other EP groups, so each GPU pays its own."""
        if not seconds_P.any():
            return t
        self.rec.phase(name, layer, float(seconds_P.max()), self.plan.layers)
        self.blocked_s += float(seconds_P.max())
        return t + seconds_P

    def backward_layer(self, t: F64, layer: int, mb: int) -> Generator[simpy.Event, Any, F64]:
        c, w, par = self.plan.compute_s, self.plan.work[layer][mb], self.plan.scn.parallel
        t = yield from self.recompute(t, layer, mb)
        t = self.compute(t, c["unpermute"], "unpermute_bwd", layer)
        shared = self.compute(t, 2 * c["shared_experts"], "shared_experts_bwd", layer)
        if c["shared_experts"] > 0:
            shared = self.blocking(shared, c["tp_comm"], "tp_comm_bwd", layer, par.tp)
        t = yield from self.collective(t, "combine_bwd", layer, w.grad_dispatch, mb)
        experts = 2 * w.experts_s_G[self.idx] + w.regroup_s_G[self.idx]
        t = self._etp(t, w.etp_s_G[self.idx], "etp_comm_bwd", layer)
        t = self.compute(t, experts, "experts_bwd", layer)
        t = yield from self.collective(t, "dispatch_bwd", layer, w.combine, mb)
        t = self.compute(np.maximum(t, shared), c["permute"], "permute_bwd", layer)
        t = self.compute(t, c["gate"], "gate_bwd", layer)
        t = self.compute(t, c["norm"] / 2, "norm_bwd", layer)
        t = self.blocking(t, c["tp_comm"], "tp_comm_bwd", layer, par.tp)
        t = self.blocking(t, c["cp_comm_bwd"], "cp_comm_bwd", layer, par.tp * par.cp)
        t = self.compute(t, 2 * c["dense"], "dense_bwd", layer)
        return self.compute(t, c["norm"] / 2, "norm_bwd", layer)

    def recompute(self, t: F64, layer: int, mb: int) -> Generator[simpy.Event, Any, F64]:
        """Megatron recompute before a layer's backward: ``full`` re-runs its forward
        (all-to-alls included); ``selective`` re-runs the chosen modules' compute."""
        wl = self.plan.scn.workload
        if wl.recompute_granularity == "full":
            return (yield from self.forward_layer(t, layer, mb, "_recompute"))
        if wl.recompute_granularity != "selective":
            return t
        c, mods = self.plan.compute_s, wl.recompute_modules
        seconds = sum(c[k] for k, mod in SELECTIVE.items() if mod in mods)
        extra = self.plan.work[layer][mb].recompute_s_G[self.idx]
        return self.compute(t, seconds + extra, "recompute", layer)

    def run(self) -> Generator[simpy.Event, Any, None]:
        """All micro-batches: one after another, or two at a time when overlapping."""
        mbs = self.plan.micro_batches
        width = 2 if self.plan.scn.workload.overlap_micro_batches else 1
        for first in range(0, mbs, width):
            procs = [
                self.env.process(self.micro_batch(m)) for m in range(first, min(first + width, mbs))
            ]
            yield simpy.AllOf(self.env, procs)


@dataclass
class EngineResult:
    stage_time_s: float  # one pipeline stage, all micro-batches, before the gradient all-reduce
    events: int
    busy_G: F64
    group_finish_X: F64
    comm_X: F64
    recorder: Recorder
    blocked_X: F64  # seconds of TP / CP / ETP collectives per group (not all-to-all)


def run_engine(plan: StepPlan, rec: Recorder) -> EngineResult:
    """Simulate every EP group of ``plan`` in one SimPy environment."""
    env = simpy.Environment()
    net = FluidNetwork(env, plan.topo.cap_L)
    groups = [GroupSim(env, net, plan, g, rec) for g in range(plan.topo.num_groups)]
    for g in groups:
        env.process(g.run())
    events = 0
    while True:
        try:
            env.step()
        except simpy.core.EmptySchedule:
            break
        events += 1
    busy = np.concatenate([g.busy_P for g in groups])
    finish = np.array([g.finish for g in groups])
    return EngineResult(
        float(finish.max()),
        events,
        busy,
        finish,
        np.array([g.comm_s for g in groups]),
        rec,
        np.array([g.blocked_s for g in groups]),
    )
