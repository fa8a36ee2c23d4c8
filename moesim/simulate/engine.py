"""SimPy engine: runs an op program (:mod:`moesim.simulate.program`) on every GPU.

Legend: G = GPUs, X = EP groups, P = EP ranks of a group, L = links of a group.

Design (for speed at thousands of GPUs): one SimPy process per (EP group,
lane) carries a vector of per-GPU times ``t_P`` instead of one process per
GPU. An EP group is one pipeline rank of one data-parallel replica (group
``x`` = rank ``x // groups_per_stage``, replica ``x % groups_per_stage``).
Compute ops need no events: each GPU's compute stream is a FIFO (``free_P``),
so an op starts at ``max(ready, stream free)`` and ends ``seconds * slowdown``
later, all in numpy. A collective is a synchronisation point: it waits until
its slowest participant is ready (``max(t_P)``), starts a coflow on the group's
network domain and sleeps until the fluid model says it is done. A pipeline
send is two coflows, the sender's egress in its domain and the receiver's
ingress in the receiver's, and arrives when both have drained. Events are thus
only collective starts and ends, rate changes and cross-rank signals.

A slot of two lanes (DualPipe's forward-and-backward pairs, or two overlapped
micro-batches) runs as two processes whose compute blocks interleave on the
FIFO stream while the other's collective is in flight.

Communication takes SMs: a compute op that starts while one of its group's
collectives runs takes ``1 / (1 - training.comm_sm_fraction)`` times longer
(judged at its start against the collectives started so far, a running one
counting as running on; the trace marks such ops ``[SMs shared]`` and
``details.comm_sm_slowdown_s`` sums the extra time).

Where time goes: every idle gap of a GPU's compute stream is charged to what
the op after it waited for: a collective of kind ``ep``/``tp``/``dp``/``pp``
(exposed communication), or the pipeline (``bubble``: waiting for another
stage's compute; the part of a receive after the matching send started is
``pp``). The gap after a rank's last compute goes to ``dp`` while its gradient
collectives run (the union of their intervals), the rest to ``bubble`` (sends
finishing, waiting for the other stage of a tied embedding). Per GPU, compute + exposed + bubble =
step time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy
from numpy.typing import NDArray

from moesim.simulate.network import FluidNetwork
from moesim.simulate.plan import Coflows, StepPlan
from moesim.simulate.program import GROUPS, KINDS, Op, Program
from moesim.simulate.schedules import Lane, Task

F64 = NDArray[np.float64]
COMPUTE_TID, COMM_TID, ASYNC_TID = 0, 1, 3
#: the event key tag of a receive's post (``Pipeline.rendezvous`` sends wait for it)
POSTED = "posted"
#: Chrome trace thread names: the compute stream and the comm rows
THREADS = {
    COMPUTE_TID: "compute",
    COMM_TID: "comm",
    COMM_TID + 1: "comm (2nd lane)",
    ASYNC_TID: "comm (sends, gradient buckets)",
}
SM_MARK = " [SMs shared]"


@dataclass
class Recorder:
    """Seconds per phase, per layer, and optional trace events."""

    traced: frozenset[int] = frozenset()  # EP groups whose Chrome trace events are recorded
    trace_gpus: int = 16
    max_events: int = 200_000
    phase_sum: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    phase_n: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    by_layer: dict[tuple[str, int], float] = field(default_factory=lambda: defaultdict(float))
    events: list[dict[str, Any]] = field(default_factory=list)
    log: list[tuple[str, float]] = field(default_factory=list)
    layers: int = 1

    def phase(self, name: str, layer: int, seconds: float) -> None:
        self.phase_sum[name] += seconds
        self.phase_n[name] += 1
        if layer >= 0:
            self.by_layer[name, layer] += seconds  # a float, not an array element: hot path

    def tracing(self, group: int) -> bool:
        return group in self.traced and len(self.events) < self.max_events

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


@dataclass
class Ready:
    """When each GPU may start the next op, and what it waited for (for exposure)."""

    t_P: F64
    reason: str | None = None  # a kind of KINDS, "bubble", or None (its own compute)
    since: float = -np.inf  # gap before this time is bubble, after it ``reason``
    top: float = np.nan  # max(t_P), when known (:meth:`last`)

    def last(self) -> float:
        """When the last GPU is ready: ``max(t_P)``, computed once (``t_P`` is never
        changed in place)."""
        if self.top != self.top:  # NaN: not computed yet
            self.top = float(self.t_P.max())
        return self.top


class StepSim:
    """Shared state of one simulated step: network, named events, per-group ranks."""

    def __init__(self, plan: StepPlan, prog: Program, grad: Any, rec: Recorder) -> None:
        self.env = simpy.Environment()
        self.net = FluidNetwork(self.env, plan.topo.cap_L)
        self.plan, self.prog, self.grad, self.rec = plan, prog, grad, rec
        self.frac = plan.scn.training.comm_sm_fraction
        self.signals: dict[Hashable, simpy.Event] = {}
        self._segments: dict[int, tuple[list[Op], list[tuple[int, Chain | None]]]] = {}
        self.link_bytes_XL = np.zeros((plan.topo.num_groups, plan.topo.num_links))
        self.groups = [GroupSim(self, x) for x in range(plan.topo.num_groups)]

    def segments(self, ops: list[Op]) -> list[tuple[int, Chain | None]]:
        """``ops`` cut into chains of compute (:class:`Chain`) and single ops, each with
        its first op's index; cut once per op list (the programs' lists are shared)."""
        hit = self._segments.get(id(ops))
        if hit is None or hit[0] is not ops:  # the entry keeps its list alive: ids stay unique
            hit = self._segments[id(ops)] = (ops, _segments(ops))
        return hit[1]

    def event(self, key: Hashable) -> simpy.Event:
        ev = self.signals.get(key)
        if ev is None:
            ev = self.signals[key] = self.env.event()
        return ev


class GroupSim:
    """One EP group (one pipeline rank of one replica): its GPUs' streams and lanes."""

    def __init__(self, sim: StepSim, x: int) -> None:
        self.sim, self.x = sim, x
        plan = sim.plan
        self.env, self.rec = sim.env, sim.rec
        self.rank, self.replica = divmod(x, plan.groups_per_stage)
        self.gpus = plan.topo.group_gpus(x)
        P = len(self.gpus)
        self.sl = plan.topo.group_rows(x)  # this group's rows of the plan's [G] arrays
        self.free_P = np.zeros(P)
        self.busy_P = np.zeros(P)
        self.sm_extra_P = np.zeros(P)  # compute seconds added by comm kernels' SMs
        self.exposed = {k: np.zeros(P) for k in (*KINDS, "bubble")}
        self.slow_P = plan.slowdown_G[self.gpus]
        self.slow_max = float(self.slow_P.max())
        self.comm_iv: list[list[float]] = []  # [start, end] of collectives (end inf: running)
        self.comm_s: dict[str, float] = defaultdict(float)  # collective seconds per kind
        self.sent_KT: dict[str, F64] = defaultdict(lambda: np.zeros(2))
        self.sync_iv: list[tuple[float, float]] = []  # gradient / parameter collectives
        self.pending: list[simpy.Process] = []
        self.finish = 0.0
        self.lane_of = 0

    # -- exposure ---------------------------------------------------------------
    def _charge(self, ready: Ready, start_P: F64) -> None:
        gap = start_P - self.free_P
        if gap.max() <= 0:
            return
        kind = ready.reason or "bubble"
        if kind == "pp" and np.isfinite(ready.since):
            before = np.clip(np.minimum(start_P, ready.since) - self.free_P, 0.0, None)
            self.exposed["bubble"] += before
            self.exposed["pp"] += gap - before
        else:
            self.exposed[kind] += gap

    # -- ops --------------------------------------------------------------------
    def compute(self, op: Op, ready: Ready) -> Ready:
        sec = op.seconds
        if isinstance(sec, float):
            if sec <= 0:
                return ready
            dur = sec * self.slow_P
            crit = sec * self.slow_max
        else:
            dur = sec[self.sl] * self.slow_P
            crit = -1.0
        name = op.name
        start = np.maximum(ready.t_P, self.free_P)
        if self.sim.frac > 0 and self._comm_at(float(start.max())):
            slowed = dur / (1.0 - self.sim.frac)
            self.sm_extra_P += slowed - dur
            dur, name, crit = slowed, op.name + SM_MARK, -1.0
        self._charge(ready, start)
        end = start + dur
        self.free_P = end
        self.busy_P += dur
        self.rec.phase(op.name, op.layer, crit if crit >= 0 else float(dur.max()))
        if self.rec.tracing(self.x):
            self.rec.span(self.gpus, COMPUTE_TID, name, start, end)
        return Ready(end)

    def compute_run(self, chain: Chain, ready: Ready) -> list[Ready]:
        """A chain of compute ops, each after the one before (no collective between), in
        one pass of numpy: the same times as :meth:`compute` op by op. Each op's end is
        the chain's start plus the running sum of durations; only the first can wait
        (the stream is then busy to the end). Under ``comm_sm_fraction`` an op is slowed
        as in :meth:`compute`, judged at its start, which moves the ops after it."""
        run, sec_n, arr = chain.ops, chain.sec_n, chain.arr
        n = len(run)
        D_nP = np.multiply.outer(sec_n, self.slow_P)
        for j in arr:
            D_nP[j] = run[j].seconds[self.sl] * self.slow_P  # type: ignore[index]
        start_P = np.maximum(ready.t_P, self.free_P)
        self._charge(ready, start_P)
        slowed = self._sm_slowed(D_nP, start_P) if self.sim.frac > 0 else ()
        # running sums from the stream's start and its busy time, added op by op in
        # order (numpy's cumsum is sequential): the same floats as op by op
        acc = np.empty((n + 1, 2, len(start_P)))
        acc[0, 0], acc[0, 1] = start_P, self.busy_P
        acc[1:, 0] = acc[1:, 1] = D_nP
        np.cumsum(acc, axis=0, out=acc)
        end_nP = acc[1:, 0]
        self.free_P = end_nP[-1].copy()
        self.busy_P = acc[-1, 1].copy()
        crit_n = D_nP.max(axis=1) if arr or slowed else sec_n * self.slow_max
        out: list[Ready] = []
        for j, op in enumerate(run):
            if chain.skip[j]:  # as :meth:`compute`: nothing, no phase
                out.append(out[-1] if out else ready)
                continue
            self.rec.phase(op.name, op.layer, float(crit_n[j]))
            out.append(Ready(end_nP[j]))
        return out

    def _sm_slowed(self, D_nP: F64, start_P: F64) -> tuple[int, ...]:
        """Slow, in place, the ops of a chain that start while a collective runs."""
        now = self.env.now
        self.comm_iv = [iv for iv in self.comm_iv if iv[1] > now]
        if not self.comm_iv:
            return ()
        keep = 1.0 - self.sim.frac
        t0 = float(start_P.max())  # the first op's start; no op starts after ``t1``
        t1 = float((start_P + D_nP.sum(axis=0) / keep).max()) * (1 + 1e-12)  # past rounding
        live = [iv for iv in self.comm_iv if iv[1] > t0 and iv[0] <= t1]
        if not live:
            return ()
        if any(a <= t0 and b > t1 for a, b in live):  # one collective spans the chain
            for j in range(len(D_nP)):
                dur = D_nP[j] / keep
                self.sm_extra_P += dur - D_nP[j]
                D_nP[j] = dur
            return tuple(range(len(D_nP)))
        slowed: list[int] = []
        at_P = start_P.copy()
        for j in range(len(D_nP)):
            if self._comm_at(float(at_P.max())):
                dur = D_nP[j] / keep
                self.sm_extra_P += dur - D_nP[j]
                D_nP[j] = dur
                slowed.append(j)
            at_P += D_nP[j]
        return tuple(slowed)

    def _comm_at(self, t: float) -> bool:
        """Whether one of the group's collectives runs at ``t`` (those still running count)."""
        now = self.env.now
        self.comm_iv = [iv for iv in self.comm_iv if iv[1] > now]
        return any(s <= t < e for s, e in self.comm_iv)

    def _transfer(self, op: Op, cf: Coflows, x: int, start: float) -> simpy.Event:
        self.sim.link_bytes_XL[x] += cf.demand_XL[x]
        lat, solo, peak = cf.scalars_X[x]
        shape = (peak, cf.share_XL[x])
        return self.sim.net.transfer(x, cf.demand_XL[x], lat, solo, start_s=start, shape=shape)

    def collective(
        self, op: Op, ready: Ready, tid: int, iv: list[float] | None = None
    ) -> Generator[simpy.Event, Any, Ready]:
        """Wait for the slowest participant, run the coflow(s), return everyone's end time.

        ``iv``: the op's [start, end] entry of ``comm_iv`` when the caller made it.
        """
        cf = op.coflow
        assert cf is not None
        kind = GROUPS[op.stream]
        start = max(ready.last(), self.env.now)
        lat, solo, _ = cf.scalars_X[self.x]
        if solo <= 0 and lat <= 0 and op.peer is None:
            if iv is not None:
                iv[1] = start
            return Ready(np.full_like(ready.t_P, start), kind, top=start)
        if iv is None:
            iv = [start, np.inf]
            self.comm_iv.append(iv)
        trace = self.rec.tracing(self.x)
        if trace:
            self.rec.log.append((self._logname(op.name, ".start"), start))
        done = [self._transfer(op, cf, self.x, start)]
        if op.peer is not None:
            y = op.peer_rank * self.sim.plan.groups_per_stage + self.replica
            done.append(self._transfer(op, op.peer, y, start))
        if cf.sent_XT is not None:
            self.sent_KT[kind] += cf.sent_XT[self.x]  # each kind's own array
        yield simpy.AllOf(self.env, done) if len(done) > 1 else done[0]
        end = self.env.now
        iv[1] = end
        self.comm_s[kind] += end - start
        if kind == "dp":
            self.sync_iv.append((start, end))
        self.rec.phase(op.name, op.layer, end - start)
        if trace:
            self.rec.log.append((self._logname(op.name, ".end"), end))
            if op.blocking:
                self.rec.span(
                    self.gpus, tid, f"wait {op.name}", ready.t_P, np.full_like(ready.t_P, start)
                )
            full = np.full_like(ready.t_P, start)
            self.rec.span(self.gpus, tid, op.name, full, np.full_like(ready.t_P, end))
        return Ready(np.full_like(ready.t_P, end), kind, start, end)

    def _logname(self, name: str, suffix: str) -> str:
        return f"{name}{suffix}" if self.x == 0 else f"g{self.x}:{name}{suffix}"

    def _async(self, op: Op, ready: Ready, iv: list[float]) -> Generator[simpy.Event, Any, None]:
        if op.peer is not None and self.sim.prog.pipe.rendezvous:  # a send: wait for the post
            ev = self.sim.event((self.replica, POSTED, op.key))
            posted: float = ev.value if ev.triggered else (yield ev)  # type: ignore[assignment]
            if posted > iv[0]:
                ready = Ready(np.maximum(ready.t_P, posted), ready.reason, ready.since)
                iv[0] = posted
        out = yield from self.collective(op, ready, ASYNC_TID, iv)
        if op.key is not None:
            self.sim.event((self.replica, op.key)).succeed(out)

    def wait(self, op: Op, ready: Ready) -> Generator[simpy.Event, Any, Ready]:
        if op.name == "pp_recv" and self.sim.prog.pipe.rendezvous:
            posted = self.sim.event((self.replica, POSTED, op.key))
            if not posted.triggered:  # posted as the input is needed: the stream is free
                at = max(ready.last(), float(self.free_P.max()), self.env.now)
                posted.succeed(at)
        ev = self.sim.event((self.replica, op.key))
        got: Ready = ev.value if ev.triggered else (yield ev)  # type: ignore[assignment]
        same = got.t_P.shape == ready.t_P.shape
        theirs = got.t_P if same else np.full_like(ready.t_P, got.last())
        if got.last() <= ready.last():
            return ready  # it was there before we asked
        return Ready(np.maximum(ready.t_P, theirs), got.reason or "bubble", got.since)

    def run_op(self, op: Op, ready: Ready, tid: int) -> Generator[simpy.Event, Any, Ready]:
        if op.stream == "compute":
            return self.compute(op, ready)
        if op.stream == "wait":
            return (yield from self.wait(op, ready))
        if op.stream == "signal":
            got = Ready(ready.t_P.copy(), "bubble")
            self.sim.event((self.replica, op.key)).succeed(got)
            return ready
        if not op.blocking:
            iv = [max(ready.last(), self.env.now), np.inf]
            self.comm_iv.append(iv)  # known now, so compute issued next sees it
            self.pending.append(self.env.process(self._async(op, ready, iv)))
            return ready
        out = yield from self.collective(op, ready, tid)
        if op.key is not None:
            self.sim.event((self.replica, op.key)).succeed(out)
        return out

    # -- tasks, lanes, the step ---------------------------------------------------
    def ops(
        self, ops: list[Op], tid: int, start: Ready | None = None
    ) -> Generator[simpy.Event, Any, Ready]:
        ends: list[Ready] = []
        ready = start or Ready(np.full(len(self.gpus), float(self.env.now)))
        fuse = not self.rec.tracing(self.x)  # a chain's trace spans are drawn op by op
        for i, chain in self.sim.segments(ops) if fuse else enumerate([None] * len(ops)):
            op = ops[i]
            if op.deps is not None and ends:
                ready = _after(ends, op.deps)
            if chain is not None:
                got = self.compute_run(chain, ready)
                ends.extend(got)
                ready = got[-1]
            else:
                ready = yield from self.run_op(op, ready, tid)
                ends.append(ready)
        return ready

    def task(self, task: Task, tid: int) -> Generator[simpy.Event, Any, None]:
        yield from self.ops(self.sim.prog.task_ops(task), tid)

    def lane(self, lane: Lane, tid: int) -> Generator[simpy.Event, Any, None]:
        for t in lane:
            yield from self.task(t, tid)

    def run(self) -> Generator[simpy.Event, Any, None]:
        grad = self.sim.grad
        if grad is not None:
            yield from self.ops(grad.prologue(self.rank), ASYNC_TID)
        for slot in self.sim.prog.pipe.slots[self.rank]:
            if len(slot) == 1:
                yield from self.lane(slot[0], COMM_TID)
            else:
                yield from self._pair_inputs(slot)
                procs = [self.env.process(self.lane(ln, COMM_TID + i)) for i, ln in enumerate(slot)]
                yield simpy.AllOf(self.env, procs)
        if self.pending:  # the optimizer step needs every reduced gradient
            yield simpy.AllOf(self.env, self.pending)
        if grad is not None:
            after = Ready(np.maximum(self.free_P, self.env.now), "dp")
            ops = grad.epilogue(self.rank) + grad.embedding_ops(self.rank)
            yield from self.ops(ops, COMM_TID, after)
        self.finish = max(float(self.free_P.max()), self.env.now)

    def _pair_inputs(self, slot: tuple[Lane, ...]) -> Generator[simpy.Event, Any, None]:
        """A forward-backward pair starts once both passes' inputs are in (DualPipe's
        ``_forward_backward_chunk`` receives both before it runs either)."""
        ready = Ready(np.full(len(self.gpus), float(self.env.now)))
        for lane in slot:
            first = self.sim.prog.task_ops(lane[0])[0]
            if first.stream == "wait":
                yield from self.wait(first, ready)

    def close(self, step: float) -> None:
        """Charge the gap from the last compute to the step's end: ``dp`` while gradient
        or parameter collectives run (the union of their intervals), the rest (sends
        finishing, waiting for another stage) ``bubble``."""
        dp = np.zeros_like(self.free_P)
        for a, b in _union(self.sync_iv):
            dp += np.clip(b - np.maximum(a, self.free_P), 0.0, None)
        self.exposed["dp"] += dp
        self.exposed["bubble"] += np.clip(step - self.free_P - dp, 0.0, None)


@dataclass(frozen=True)
class Chain:
    """Consecutive compute ops of a task, each after the one before."""

    ops: list[Op]
    sec_n: F64  # each op's seconds where equal on every GPU (0 where per GPU)
    arr: tuple[int, ...]  # ops whose seconds are per GPU ([G])
    skip: tuple[bool, ...]  # ops of no time: no phase, their input passed on (as compute)

    @classmethod
    def of(cls, ops: list[Op]) -> Chain:
        sec_n, arr, skip = np.zeros(len(ops)), [], []
        for j, op in enumerate(ops):
            if isinstance(op.seconds, float):
                sec_n[j] = max(op.seconds, 0.0)
                skip.append(op.seconds <= 0)
            else:
                arr.append(j)
                skip.append(False)
        return cls(ops, sec_n, tuple(arr), tuple(skip))


def _segments(ops: list[Op]) -> list[tuple[int, Chain | None]]:
    out: list[tuple[int, Chain | None]] = []
    i, n = 0, len(ops)
    while i < n:
        k = i + 1
        if ops[i].stream == "compute":
            while k < n and _chained(ops[k], k):
                k += 1
        out.append((i, Chain.of(ops[i:k]) if k - i > 1 else None))
        i = k
    return out


def _chained(op: Op, i: int) -> bool:
    """Whether op ``i`` of a task is compute that starts after op ``i - 1`` alone."""
    return op.stream == "compute" and (op.deps is None or op.deps == (i - 1,))


def _after(ends: list[Ready], deps: tuple[int, ...]) -> Ready:
    """When every op in ``deps`` has ended (the reason of the last to end)."""
    if len(deps) == 1:
        return ends[deps[0]]
    got = [ends[d] for d in deps]
    last = max(got, key=Ready.last)
    t_P = got[0].t_P
    for d in got[1:]:
        t_P = np.maximum(t_P, d.t_P)
    return Ready(t_P, last.reason, last.since, last.last())


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint intervals covering ``iv``, in order."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass
class EngineResult:
    step_time_s: float
    events: int
    busy_G: F64
    sm_extra_G: F64
    exposed_KG: dict[str, F64]
    group_finish_X: F64
    comm_XK: dict[str, F64]  # collective seconds per group and kind (not exposure)
    sent_KT: dict[str, F64]  # mean bytes per GPU per kind and tier (scale-up, network)
    link_bytes_XL: F64
    recorder: Recorder


def run_engine(plan: StepPlan, prog: Program, grad: Any, rec: Recorder) -> EngineResult:
    """Simulate every EP group of ``plan`` running ``prog`` in one SimPy environment."""
    rec.layers = max(plan.layers, 1)
    sim = StepSim(plan, prog, grad, rec)
    for g in sim.groups:
        sim.env.process(g.run())
    events = 0
    while True:
        try:
            sim.env.step()
        except simpy.core.EmptySchedule:
            break
        events += 1
    groups = sim.groups
    finish = np.array([g.finish for g in groups])
    step = float(finish.max())
    for g in groups:
        g.close(step)
    X = len(groups)
    sent = {k: sum((g.sent_KT[k] for g in groups), np.zeros(2)) / X for k in KINDS}
    return EngineResult(
        step_time_s=step,
        events=events,
        busy_G=np.concatenate([g.busy_P for g in groups]),
        sm_extra_G=np.concatenate([g.sm_extra_P for g in groups]),
        exposed_KG={k: np.concatenate([g.exposed[k] for g in groups]) for k in (*KINDS, "bubble")},
        group_finish_X=finish,
        comm_XK={k: np.array([g.comm_s[k] for g in groups]) for k in KINDS},
        sent_KT=sent,
        link_bytes_XL=sim.link_bytes_XL,
        recorder=rec,
    )
