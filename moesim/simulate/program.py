"""Op programs: what every pipeline rank runs in one step, as data.

Legend: G = GPUs (all of the cluster), X = EP groups, L = links of one group.

A :class:`~moesim.simulate.schedules.Pipeline` orders *tasks* (forward,
backward, input-grad, weight-grad passes of one micro-batch through one
virtual stage); :class:`Program` expands each task into an ordered list of
:class:`Op` and the engine (:mod:`moesim.simulate.engine`) runs them. Phase
names are defined once, in :data:`PHASES`; tables, traces and JSON derive
from the ops that ran.

API for adding work (what a new parallel dimension or model part calls):

- ``compute(name, seconds, layer)``: an op on each GPU's compute stream.
  ``seconds`` is a float (same on every GPU) or a ``[G]`` array over all GPUs
  of the cluster (each EP group reads its own rows). Compute streams are FIFO.
- ``collective(name, group, coflow, layer, blocking=True)``: a collective on a
  named group (``ep``, ``tp``, ``dp``, ``edp``, ``pp``; see :data:`GROUPS`).
  ``coflow`` is a :class:`~moesim.simulate.plan.Coflows`: bytes per link of
  each EP group's link space ``[X, L]``, latency and solo time per group;
  build it from per-GPU byte demands with
  :meth:`~moesim.simulate.plan.CommPricer.per_gpu` (``scaleup_B``,
  ``network_B`` each GPU sends and receives) or from rows per link with
  :meth:`~moesim.simulate.plan.CommPricer.price`. It starts when its slowest
  participant of the group is ready, shares links max-min fairly with every
  other coflow of the group (all-to-all, sends, gradient buckets), and a
  non-blocking one runs while the task goes on (the step waits for it).
- ``deps``: indices of earlier ops of the same task an op waits for (default:
  the op just before). The MoE forward uses it to run the shared experts
  beside the dispatch.
- ``wait(key)`` / a ``signal`` key on an op: named events across ranks and
  tasks (pipeline receives, parameter all-gathers).
- To add ops to every layer, wrap or replace an entry of :data:`LAYER_OPS`
  (``(program, layer kind, pass, local layer, micro-batch) -> list[Op]``) and
  register the phase name in :data:`PHASES` with its group.

Passes: ``F`` forward; ``B`` backward (2x the forward GEMMs, 1x memory-bound
ops, the all-to-alls again in the combine dtype); zero-bubble schedules split
it into ``Bi`` (input gradients: 1x GEMMs, memory ops, all-to-alls) and ``W``
(weight gradients: 1x GEMMs, no communication).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moesim.simulate.dense import BACKWARD_FACTOR
from moesim.simulate.plan import Coflows, StepPlan
from moesim.simulate.schedules import Layout, Pipeline, Task

F64 = NDArray[np.float64]

#: communication groups an op can run on, and the metric kind each counts as
GROUPS = {"ep": "ep", "tp": "tp", "etp": "tp", "cp": "cp", "dp": "dp", "edp": "dp", "pp": "pp"}
#: exposed-communication kinds reported (plus ``bubble``)
KINDS = ("ep", "tp", "cp", "dp", "pp")

#: every phase name: its stream (compute or a group) and what it is
PHASES: dict[str, tuple[str, str]] = {
    "dense": ("compute", "attention of a MoE layer"),
    "gate": ("compute", "router"),
    "permute": ("compute", "tokens sorted by expert"),
    "shared_experts": ("compute", "shared experts (beside the dispatch)"),
    "dispatch": ("ep", "tokens to their experts' GPUs"),
    "experts": ("compute", "routed expert GEMMs (+ regroup)"),
    "combine": ("ep", "expert outputs back"),
    "unpermute": ("compute", "outputs weighted and summed"),
    "dense_layer": ("compute", "a dense layer (attention + FFN)"),
    "norm": ("compute", "the layer's two RMSNorms"),
    "tp_comm": ("tp", "TP all-gather + reduce-scatter of a block (SP)"),
    "cp_comm": ("cp", "CP ring exchange of K and V (beside the attention)"),
    "etp_comm": ("etp", "expert-TP all-gather + reduce-scatter of the received rows"),
    "head": ("compute", "embedding, LM head and loss (first / last stage)"),
    "recompute": ("compute", "selective recompute before a layer's backward"),
    "pp_send_fwd": ("pp", "activations to the next stage"),
    "pp_send_bwd": ("pp", "activation gradients to the previous stage"),
    "grad_reduce_scatter": ("dp", "non-expert gradients, distributed optimizer"),
    "expert_grad_reduce_scatter": ("edp", "expert gradients over expert-DP"),
    "grad_allreduce": ("dp", "non-expert gradients, no distributed optimizer"),
    "expert_grad_allreduce": ("edp", "expert gradients, no distributed optimizer"),
    "param_all_gather": ("dp", "updated non-expert parameters"),
    "embedding_grad_allreduce": ("dp", "tied embedding gradients, first and last stage"),
    "expert_param_all_gather": ("edp", "updated expert parameters"),
}
#: forward ops whose backward is memory-bound (one pass, or a measured factor)
MEMORY_BOUND = ("gate", "permute", "unpermute")
#: suffixes of the backward passes' and of full recompute's phase names
BWD, WGRAD, RECOMPUTE = "_bwd", "_wgrad", "_recompute"


def phase_group(name: str) -> str:
    """The stream or group of a phase name (suffixes ``_bwd``/``_wgrad``/``_recompute``)."""
    base = name.removesuffix(BWD).removesuffix(WGRAD).removesuffix(RECOMPUTE)
    return PHASES[base][0]


@dataclass(frozen=True, slots=True)
class Op:
    """One step of a task: compute, a collective, a wait for or a signal of an event."""

    name: str
    stream: str  # "compute", a key of GROUPS, "wait" or "signal"
    layer: int = -1  # model layer on this rank (per-layer tables); -1 = none
    seconds: float | F64 = 0.0  # compute: per GPU, scalar or [G]
    coflow: Coflows | None = None  # collective: one per EP-group domain
    deps: tuple[int, ...] | None = None  # earlier ops of the task; None = the previous op
    blocking: bool = True  # collective: False = runs beside the task
    key: Hashable = None  # wait: event awaited; any op: event fired when it ends
    peer: Coflows | None = None  # pp send: the receiver side (ingress links of its group)
    peer_rank: int = -1  # pp send: the pipeline rank receiving


def compute(
    name: str, seconds: float | F64, layer: int = -1, deps: tuple[int, ...] | None = None
) -> Op:
    return Op(name, "compute", layer, seconds, deps=deps)


def collective(
    name: str,
    group: str,
    coflow: Coflows,
    layer: int = -1,
    *,
    blocking: bool = True,
    key: Hashable = None,
    deps: tuple[int, ...] | None = None,
) -> Op:
    if group not in GROUPS:
        raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {group!r}")
    return Op(name, group, layer, coflow=coflow, deps=deps, blocking=blocking, key=key)


def wait(key: Hashable, name: str = "wait") -> Op:
    return Op(name, "wait", key=key)


def signal(key: Hashable) -> Op:
    return Op("signal", "signal", key=key)


# -- layer ops ------------------------------------------------------------------


def moe_forward(prog: Program, j: int, mb: int, sfx: str = "") -> list[Op]:
    """``sfx`` renames the phases (``_recompute`` when full recompute re-runs it).

    Collectives a layout does not need (tp = cp = etp = 1) are left out, so the
    default program is as short as before. The CP ring runs beside the attention
    (the next op waits for both); the shared experts and their TP collective beside
    the dispatch.
    """
    c, w, cf = prog.plan.compute_s, prog.plan.work[j][mb], prog.plan.collectives
    ring, tp = cf.get("cp"), cf.get("tp")
    ops = [compute("norm" + sfx, c["norm"], j)]  # the layer's two RMSNorms
    join: tuple[int, ...] | None = None
    if ring is not None:
        ops.append(collective("cp_comm" + sfx, "cp", ring, j, deps=(0,)))
        join = (1, 2)
    ops.append(compute("dense" + sfx, c["dense"], j, deps=(0,)))
    if tp is not None:
        ops.append(collective("tp_comm" + sfx, "tp", tp, j, deps=join))
        join = None
    ops.append(compute("gate" + sfx, c["gate"], j, deps=join))
    ops.append(compute("permute" + sfx, c["permute"], j))
    permuted = len(ops) - 1
    ops.append(compute("shared_experts" + sfx, c["shared_experts"], j))
    if c["shared_experts"] > 0 and tp is not None:
        ops.append(collective("tp_comm" + sfx, "tp", tp, j))
    shared = len(ops) - 1
    ops.append(collective("dispatch" + sfx, "ep", w.dispatch, j, deps=(permuted,)))
    experts = w.experts_s_G + w.regroup_s_G
    ops.append(compute("experts" + sfx, experts, j, deps=(shared, len(ops) - 1)))
    if w.etp is not None:
        ops.append(collective("etp_comm" + sfx, "etp", w.etp, j))
    ops.append(collective("combine" + sfx, "ep", w.combine, j))
    ops.append(compute("unpermute" + sfx, c["unpermute"], j))
    return ops


def _recompute(prog: Program, j: int, mb: int) -> list[Op]:
    """Megatron recompute before a layer's backward: ``full`` re-runs its forward
    (all-to-alls included), ``selective`` the chosen modules' compute."""
    wl = prog.plan.scn.workload
    if wl.recompute_granularity == "full":
        return moe_forward(prog, j, mb, RECOMPUTE)
    if wl.recompute_granularity != "selective":
        return []
    c, mods = prog.plan.compute_s, wl.recompute_modules
    seconds = sum(c[k] for k, mod in SELECTIVE.items() if mod in mods)
    return [compute("recompute", seconds + prog.plan.work[j][mb].recompute_s_G, j)]


#: compute_s entry recomputed by each selective-recompute module (Megatron names);
#: ``moe`` and ``moe_act`` are per GPU (``LayerWork.recompute_s_G``)
SELECTIVE = {"attn_core": "core_attn", "norm": "layernorm", "shared_experts": "shared_experts"}


def backward_factors(prog: Program, part: str) -> tuple[float, float]:
    """(GEMM, memory-bound) time of pass ``part`` over the forward's: a calibrated
    profile's measured :class:`~moesim.config.hardware.BackwardFit`, else 2 and 1;
    ``Bi`` and ``W`` take half the GEMM factor each (``W`` no memory-bound ops)."""
    cal = prog.plan.cost.cal
    fit = cal.backward if cal is not None else None
    gemm, mem = (fit.gemm, fit.memory) if fit is not None else (2.0, 1.0)
    return (gemm, mem) if part == "B" else (gemm / 2, mem if part == "Bi" else 0.0)


#: the attention core's backward over the GEMMs' (FLOPs: 2.5 / 2, ``dense.BACKWARD_FACTOR``)
CORE_OVER_GEMM = BACKWARD_FACTOR["attn_core"] / BACKWARD_FACTOR["dense"]


def with_core_backward(c: dict[str, float], key: str, gemm: float, part: str) -> float:
    """Backward seconds of phase ``key`` (attention, or a dense layer) in pass ``part``:
    its GEMMs at ``gemm`` x their forward, the attention core inside it
    (``c["attn_core"]``) at :data:`CORE_OVER_GEMM` x the whole backward's GEMM factor,
    all of it input gradients (in ``B`` and ``Bi``, none in ``W``: it has no weights)."""
    core = c.get("attn_core", 0.0)
    whole = gemm if part == "B" else 2.0 * gemm
    core_s = 0.0 if part == "W" else CORE_OVER_GEMM * whole * core
    return gemm * (c[key] - core) + core_s


def moe_backward(prog: Program, j: int, mb: int, part: str) -> list[Op]:
    """``part`` B (all), Bi (input gradients) or W (weight gradients)."""
    c, w, cf = prog.plan.compute_s, prog.plan.work[j][mb], prog.plan.collectives
    gemm, mem = backward_factors(prog, part)
    if mem != 1.0 and part != "W":
        c = {k: v * mem if k in MEMORY_BOUND else v for k, v in c.items()}
    experts = gemm * w.experts_s_G + mem * w.regroup_s_G
    if part == "W":
        sfx = WGRAD
        return [
            compute("experts" + sfx, experts, j),
            compute("shared_experts" + sfx, gemm * c["shared_experts"], j),
            compute("dense" + sfx, with_core_backward(c, "dense", gemm, part), j),
        ]
    tp, ring = cf.get("tp"), cf.get("cp_bwd")
    pre = _recompute(prog, j, mb)
    ops = [compute("unpermute" + BWD, c["unpermute"], j)]
    ops.append(compute("shared_experts" + BWD, gemm * c["shared_experts"], j))
    if c["shared_experts"] > 0 and tp is not None:
        ops.append(collective("tp_comm" + BWD, "tp", tp, j))
    shared = len(ops) - 1
    ops.append(collective("combine" + BWD, "ep", w.grad_dispatch, j, deps=(0,)))  # beside
    if w.etp is not None:
        ops.append(collective("etp_comm" + BWD, "etp", w.etp, j))
    ops.append(compute("experts" + BWD, experts, j))
    ops.append(collective("dispatch" + BWD, "ep", w.combine, j))
    ops.append(compute("permute" + BWD, c["permute"], j, deps=(shared, len(ops) - 1)))
    ops.append(compute("gate" + BWD, c["gate"], j))
    if tp is not None:
        ops.append(collective("tp_comm" + BWD, "tp", tp, j))
    join: tuple[int, ...] | None = None
    attn = with_core_backward(c, "dense", gemm, part)
    if ring is not None:
        before = len(ops) - 1
        ops.append(collective("cp_comm" + BWD, "cp", ring, j, deps=(before,)))
        ops.append(compute("dense" + BWD, attn, j, deps=(before,)))
        join = (len(ops) - 2, len(ops) - 1)
    else:
        ops.append(compute("dense" + BWD, attn, j))
    ops.append(compute("norm" + BWD, c["norm"], j, deps=join))
    body = ops
    return pre + _shift(body, len(pre))


def dense_forward(prog: Program, j: int, mb: int) -> list[Op]:
    """A dense layer; with CP its ring runs beside it, with TP its two blocks' AG + RS."""
    cf = prog.plan.collectives
    ops = [compute("dense_layer", prog.plan.compute_s["dense_layer"], j)]
    if "cp" in cf:
        ops = [compute("dense_layer", 0.0, j), collective("cp_comm", "cp", cf["cp"], j)]
        ops.append(compute("dense_layer", prog.plan.compute_s["dense_layer"], j, deps=(0,)))
    if "tp2" in cf:
        deps = (1, 2) if "cp" in cf else None
        ops.append(collective("tp_comm", "tp", cf["tp2"], j, deps=deps))
    return ops


def dense_backward(prog: Program, j: int, mb: int, part: str) -> list[Op]:
    gemm = {"B": 2.0, "Bi": 1.0, "W": 1.0}[part]
    sfx = WGRAD if part == "W" else BWD
    layer = with_core_backward(prog.plan.compute_s, "dense_layer", gemm, part)
    ops = [compute("dense_layer" + sfx, layer, j)]
    cf = prog.plan.collectives
    if part != "W":
        if "tp2" in cf:
            ops.append(collective("tp_comm" + sfx, "tp", cf["tp2"], j))
        if "cp_bwd" in cf:
            ops.append(collective("cp_comm" + sfx, "cp", cf["cp_bwd"], j))
    return ops


LayerOps = Callable[..., list[Op]]
#: (layer kind, pass) -> ops of one layer; backward builders take the part as last argument
LAYER_OPS: dict[tuple[str, str], LayerOps] = {
    ("moe", "F"): moe_forward,
    ("moe", "B"): moe_backward,
    ("dense", "F"): dense_forward,
    ("dense", "B"): dense_backward,
}


# -- the program ----------------------------------------------------------------


class Program:
    """Ops of every task of one step; the engine asks :meth:`task_ops` for each task."""

    def __init__(self, plan: StepPlan, pipe: Pipeline, layout: Layout, grad: Any = None) -> None:
        self.plan, self.pipe, self.layout, self.grad = plan, pipe, layout, grad
        self.local = self._local_indices()
        self._cache: dict[Task, list[Op]] = {}

    def _local_indices(self) -> dict[tuple[int, int], list[int]]:
        """(rank, chunk) -> index of each of the chunk's layers among the rank's layers."""
        out: dict[tuple[int, int], list[int]] = {}
        for r in range(self.pipe.ranks):
            counts = {"moe": 0, "dense": 0}
            for c, (stage, _) in enumerate(self.pipe.chunks(r)):
                idx = []
                for kind in self.layout.stage_layers[stage]:
                    idx.append(counts[kind])
                    counts[kind] += 1
                out[r, c] = idx
        return out

    def layers_of(self, stage: int, mb: int) -> list[tuple[str, int]]:
        """(kind, rank-local index) of the layers of ``stage`` as ``mb``'s owner holds them."""
        r = self.pipe.owner(stage, mb)
        idx = self.local[r, self.pipe.chunk_of(stage, mb)]
        return list(zip(self.layout.stage_layers[stage], idx, strict=True))

    def task_ops(self, task: Task) -> list[Op]:
        ops = self._cache.get(task)
        if ops is None:
            ops = self._cache[task] = self._build(task)
        return ops

    def _build(self, task: Task) -> list[Op]:
        kind, stage, mb = task
        ops = self._inputs(task)
        ops += _shift(self._head_bwd(task), len(ops))
        layers = self.layers_of(stage, mb)
        if kind != "F":
            layers = layers[::-1]
        for layer_kind, j in layers:
            if kind == "F":
                body = LAYER_OPS[layer_kind, "F"](self, j, mb)
            else:
                body = LAYER_OPS[layer_kind, "B"](self, j, mb, kind)
            if self.grad is not None:
                body = self.grad.around_layer(self, task, layer_kind, j, body)
            ops += _shift(body, len(ops))
        return ops + self._head(task) + self._outputs(task)

    def _head(self, task: Task) -> list[Op]:
        """Embedding, LM head and loss: after the last stage's forward, before its backward."""
        kind, stage, _ = task
        head = self.plan.compute_s.get("head", 0.0)
        if stage != self.pipe.stages - 1 or head <= 0:
            return []
        if kind == "F":
            return [compute("head", head)]
        return []

    def _head_bwd(self, task: Task) -> list[Op]:
        kind, stage, _ = task
        head = self.plan.compute_s.get("head", 0.0)
        if kind == "F" or stage != self.pipe.stages - 1 or head <= 0:
            return []
        gemm, mem = backward_factors(self, kind)
        mem_s = self.plan.compute_s.get("head_mem", 0.0)
        seconds = gemm * (head - mem_s) + mem * mem_s
        return [compute("head" + (WGRAD if kind == "W" else BWD), seconds)]

    def _inputs(self, task: Task) -> list[Op]:
        """Wait for the previous stage's activations / the next stage's gradients."""
        kind, s, mb = task
        V = self.pipe.stages
        if kind == "F" and s > 0:
            return [wait(("F", s - 1, mb), "pp_recv")]
        if kind in ("B", "Bi") and s < V - 1:
            return [wait(("B", s + 1, mb), "pp_recv")]
        return []

    def _outputs(self, task: Task) -> list[Op]:
        kind, s, mb = task
        V = self.pipe.stages
        nxt = s + 1 if kind == "F" else s - 1
        if kind == "W" or not 0 <= nxt < V:
            return []
        key = ("F" if kind == "F" else "B", s, mb)
        here, there = self.pipe.owner(s, mb), self.pipe.owner(nxt, mb)
        if here == there:
            return [signal(key)]
        out, inn = self.plan.pp_send(here, there)
        name = "pp_send_fwd" if kind == "F" else "pp_send_bwd"
        return [Op(name, "pp", coflow=out, blocking=False, key=key, peer=inn, peer_rank=there)]


def _shift(ops: list[Op], by: int) -> list[Op]:
    """Ops of a layer appended after ``by`` ops: their ``deps`` move with them."""
    if by == 0:
        return ops
    out = []
    for o in ops:
        if o.deps is not None:
            o = replace(o, deps=tuple(d + by for d in o.deps))
        out.append(o)
    return out
