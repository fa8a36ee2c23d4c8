"""Gradient synchronisation as Megatron-Core's DDP + distributed optimizer does it.

Legend: X = EP groups, P = EP ranks of a group.

Each pipeline rank's parameters are cut into *buckets* of about
``training.bucket_size_params`` (Megatron default ``max(40M, 1M x DP size)``),
filled in backward order, layer by layer. Non-expert gradients are synchronised
over the data-parallel group (``dp x cp`` GPUs of a stage: expert parallelism
folds into DP for the dense part), expert gradients over the expert-DP group
(``edp`` GPUs holding the same experts). Once per step, after the last
micro-batch's weight gradients of a bucket exist:

- distributed optimizer (ZeRO-1): reduce-scatter the gradients (in
  ``training.grad_reduce_dtype``), and all-gather the updated parameters (model
  dtype); with ``overlap_param_gather`` the gathers are issued at the start of
  the (next) step and each layer's first forward waits for its bucket;
- without it: one all-reduce of the gradients;
- ``overlap_grad_reduce``: a bucket's collective starts (without blocking) right
  after the backward of its last layer; otherwise all run after the last task.

Collectives are priced as NCCL runs them on a multi-node group, hierarchically
over every rail: each GPU moves ``(g-1)/g · B`` over NVLink (``g`` group members
per node) and ``(N-1)/N · B/g`` over its own NIC (``N`` nodes), twice that for an
all-reduce, with one latency per ring hop of each tier. A group inside one node
whose size the profile has measured (``calibration.collectives``) takes the
measured collective's time alone on its links instead. Each EP group prices its
own GPUs' share on its own links (sharing them with its all-to-alls and sends);
groups of one stage run the same program, so they reach a bucket together up to
their load imbalance.

Tied word embeddings under a pipeline (Megatron-Core's
``_allreduce_word_embedding_grads`` in ``finalize_model_grads``): the first and
the last stage each hold a copy of the ``vocab x hidden / tp`` table, and after
the data-parallel sync the ranks that hold them all-reduce its gradient (in
``training.grad_reduce_dtype``), GPU by GPU of the same position, blocking. Each
waits for the other to arrive (that wait is bubble); with DualPipeV both ends sit on
one rank and nothing is exchanged.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from moesim.config.base import DTYPE_BYTES
from moesim.config.scenario import Scenario
from moesim.simulate.plan import Coflows, StepPlan, _dense_layer_params, _non_expert_params
from moesim.simulate.program import Op, Program, _shift, collective, signal, wait
from moesim.simulate.schedules import Pipeline, Task

#: Megatron-Core's default bucket: max(40M, 1M x data-parallel size) parameters
BUCKET_MIN_PARAMS, BUCKET_PER_DP = 40_000_000, 1_000_000


@dataclass(frozen=True)
class Bucket:
    """Layers (rank-local ``(kind, index)``) and parameters per GPU of one bucket."""

    layers: tuple[tuple[str, int], ...]  # backward order
    dense_params: float
    expert_params: float


def layer_params(scn: Scenario, kind: str) -> tuple[float, float]:
    """(non-expert, expert) parameters of one layer on one GPU."""
    m, par = scn.model, scn.parallel
    if kind == "dense":
        n = m.dense.num_dense_layers if m.dense is not None else 0
        return _dense_layer_params(scn) / max(n, 1) / par.tp, 0.0
    expert = (m.num_experts // par.ep) * 3 * m.hidden_size * m.moe_intermediate_size / par.etp
    return _non_expert_params(scn) / par.tp, float(expert)


def group_shape(n: int, stride: int, gpn: int) -> tuple[int, int]:
    """(members per node ``g``, nodes ``N``) of ``n`` GPUs spaced ``stride`` apart."""
    if n <= 1:
        return 1, 1
    per_node = max(1, gpn // stride) if stride < gpn else 1
    g = min(n, per_node)
    return g, max(1, n // g)


class GradSync:
    """Buckets of every (rank, chunk) and the ops that synchronise them."""

    def __init__(self, scn: Scenario, plan: StepPlan, pipe: Pipeline, prog: Program) -> None:
        self.scn, self.plan, self.pipe = scn, plan, pipe
        self.cfg = scn.training
        self.bucket_params = self.cfg.bucket_size_params or max(
            BUCKET_MIN_PARAMS, BUCKET_PER_DP * self._members("dp")
        )
        self.buckets = {key: self._buckets(prog, *key) for key in prog.local}
        self.first = {(r, c): (first, stage) for r in range(pipe.ranks)
                      for c, (stage, first) in enumerate(pipe.chunks(r))}  # fmt: skip
        self.last = self._last_wgrad()
        self._coflows: dict[tuple[str, float, str], Coflows] = {}

    # -- layout of the buckets -------------------------------------------------
    def _buckets(self, prog: Program, r: int, c: int) -> list[Bucket]:
        stage = self.pipe.chunks(r)[c][0]
        layers = list(zip(prog.layout.stage_layers[stage], prog.local[r, c], strict=True))[::-1]
        out: list[Bucket] = []
        cur: list[tuple[str, int]] = []
        dense = expert = 0.0
        for kind, j in layers:
            d, e = layer_params(self.scn, kind)
            cur.append((kind, j))
            dense, expert = dense + d, expert + e
            if dense + expert >= self.bucket_params:
                out.append(Bucket(tuple(cur), dense, expert))
                cur, dense, expert = [], 0.0, 0.0
        if cur:
            out.append(Bucket(tuple(cur), dense, expert))
        return out

    def _last_wgrad(self) -> dict[tuple[int, int], Task]:
        """(rank, chunk) -> the last task that adds weight gradients (B or W)."""
        out: dict[tuple[int, int], Task] = {}
        for r, slots in enumerate(self.pipe.slots):
            for slot in slots:
                for lane in slot:
                    for t in lane:
                        if t[0] in ("B", "W"):
                            out[r, self.pipe.chunk_of(t[1], t[2])] = t
        return out

    def _where(self, task: Task) -> tuple[int, int]:
        r = self.pipe.owner(task[1], task[2])
        return r, self.pipe.chunk_of(task[1], task[2])

    # -- ops -------------------------------------------------------------------
    def around_layer(
        self, prog: Program, task: Task, kind: str, j: int, body: list[Op]
    ) -> list[Op]:
        """Gather waits before a layer's first forward; bucket collectives after its last wgrad."""
        r, c = self._where(task)
        cfg = self.cfg
        for b, bucket in enumerate(self.buckets[r, c]):
            if (kind, j) != bucket.layers[-1]:
                continue
            first_mb, _ = self.first[r, c]
            if task[0] == "F" and task[2] == first_mb and self._gathers_overlap():
                # the body's deps index its own ops: shift them past the wait
                return [wait(("gather", r, c, b), "param_all_gather"), *_shift(body, 1)]
        if task[0] in ("B", "W") and cfg.overlap_grad_reduce and self.last.get((r, c)) == task:
            for bucket in self.buckets[r, c]:
                if (kind, j) == bucket.layers[-1]:
                    return body + self.reduce_ops(bucket, blocking=False)
        return body

    def _gathers_overlap(self) -> bool:
        return self.cfg.distributed_optimizer and self.cfg.overlap_param_gather

    def prologue(self, rank: int) -> list[Op]:
        """Parameter all-gathers issued at the step's start (overlap_param_gather)."""
        if not self._gathers_overlap():
            return []
        ops: list[Op] = []
        for c in range(len(self.pipe.chunks(rank))):
            for b, bucket in reversed(list(enumerate(self.buckets[rank, c]))):
                ops += self.gather_ops(bucket, blocking=False, key=("gather", rank, c, b))
        return ops

    def epilogue(self, rank: int) -> list[Op]:
        """What runs after the rank's last task: the syncs that were not overlapped."""
        ops: list[Op] = []
        chunks = range(len(self.pipe.chunks(rank)))
        if not self.cfg.overlap_grad_reduce:
            for c in chunks:
                for bucket in self.buckets[rank, c]:
                    ops += self.reduce_ops(bucket, blocking=True)
        if self.cfg.distributed_optimizer and not self.cfg.overlap_param_gather:
            for c in chunks:
                for bucket in self.buckets[rank, c]:
                    ops += self.gather_ops(bucket, blocking=True)
        return ops

    def embedding_members(self) -> list[int]:
        """Pipeline ranks holding the first or last stage when embeddings are tied and
        more than one rank holds them (else none)."""
        m = self.scn.model
        if not (m.tie_word_embeddings and m.vocab_size):
            return []
        ends = (0, self.pipe.stages - 1)
        owners = {r for r in range(self.pipe.ranks) for s, _ in self.pipe.chunks(r) if s in ends}
        return sorted(owners) if len(owners) > 1 else []

    def embedding_ops(self, rank: int) -> list[Op]:
        """The tied embedding's all-reduce on ``rank`` after every other sync: signal the
        arrival, wait for the other members', all-reduce (:meth:`embedding_coflow`)."""
        members = self.embedding_members()
        if rank not in members:
            return []
        waits = [wait(("embedding_in", o), "embedding_wait") for o in members if o != rank]
        cf = self.embedding_coflow(members)
        return [signal(("embedding_in", rank)), *waits,
                collective("embedding_grad_allreduce", "dp", cf)]  # fmt: skip

    def embedding_coflow(self, members: list[int]) -> Coflows:
        """A ring all-reduce of the table's gradient over ``n`` members (one GPU of each):
        each GPU moves ``2 (n-1)/n`` of it in ``2 (n-1)`` hops, over NVLink when all
        members share a node (then a measured ``all_reduce.<n>`` takes its time) or
        over the NICs."""
        m, n = self.scn.model, len(members)
        nbytes = (m.vocab_size or 0) * m.hidden_size / self.scn.parallel.tp
        nbytes *= DTYPE_BYTES[self.cfg.grad_reduce_dtype]
        local = all(self.plan.same_node(members[0], r) for r in members[1:])
        X, P = self.plan.topo.num_groups, self.plan.topo.ep
        moved = np.full((X, P), 2.0 * (n - 1) / n * nbytes)
        zero = np.zeros((X, P))
        hops = np.tile([[2.0 * (n - 1), 0.0] if local else [0.0, 2.0 * (n - 1)]], (X, 1))
        su, net = (moved, zero) if local else (zero, moved)
        cf = self.plan.pricer.per_gpu(su, net, steps_XT=hops)
        return self.plan.pricer.measured(cf, [("all_reduce", n, nbytes)]) if local else cf

    def reduce_ops(self, bucket: Bucket, *, blocking: bool) -> list[Op]:
        b = DTYPE_BYTES[self.cfg.grad_reduce_dtype]
        if self.cfg.distributed_optimizer:
            names, kind = ("grad_reduce_scatter", "expert_grad_reduce_scatter"), "reduce_scatter"
        else:
            names, kind = ("grad_allreduce", "expert_grad_allreduce"), "all_reduce"
        return self._pair(names, bucket, b, kind, blocking, None)

    def gather_ops(self, bucket: Bucket, *, blocking: bool, key: Hashable = None) -> list[Op]:
        b = DTYPE_BYTES[self.scn.model.dtype]
        names = ("param_all_gather", "expert_param_all_gather")
        return self._pair(names, bucket, b, "all_gather", blocking, key)

    def _pair(
        self,
        names: tuple[str, str],
        bucket: Bucket,
        nbytes: float,
        kind: str,
        blocking: bool,
        key: Hashable,
    ) -> list[Op]:
        ops = []
        pairs = (("dp", names[0], bucket.dense_params), ("edp", names[1], bucket.expert_params))
        live = [(g, n, p) for g, n, p in pairs if p > 0 and self._members(g) > 1]
        for i, (group, name, params) in enumerate(live):
            cf = self.coflow(group, params * nbytes, kind)
            last = i == len(live) - 1
            ops.append(collective(name, group, cf, blocking=blocking, key=key if last else None))
        if key is not None and not live:
            ops.append(signal(key))
        return ops

    def _members(self, group: str) -> int:
        """GPUs of a gradient group: non-expert over DP x CP, experts over EDP (folding)."""
        par, n = self.scn.parallel, self.scn.cluster.num_gpus
        return par.attention_dp(n) * par.cp if group == "dp" else par.expert_dp(n)

    def coflow(self, group: str, nbytes: float, kind: str = "reduce_scatter") -> Coflows:
        """One ``kind`` collective of a ``nbytes`` buffer per GPU on ``group``, hierarchical.

        ``kind``: ``reduce_scatter``, ``all_gather`` (each GPU moves the buffer once) or
        ``all_reduce`` (twice). A group inside one node whose size the profile has a
        measured collective for (``calibration.collectives["<kind>.<n>"]``: NCCL
        tables, or the gloo collectives measured on this host's rank layout) takes
        that fit's time alone on its links; others are priced from the links.
        """
        hit = self._coflows.get((group, nbytes, kind))
        if hit is not None:
            return hit
        par, gpn = self.scn.parallel, self.scn.cluster.gpus_per_node
        n = self._members(group)
        g, N = group_shape(n, par.tp if group == "dp" else par.etp * par.ep, gpn)
        moved = nbytes * (2.0 if kind == "all_reduce" else 1.0)
        su = (g - 1) / g * moved
        net = (N - 1) / N * moved / g
        X, P = self.plan.topo.num_groups, self.plan.topo.ep
        steps = np.tile([[g - 1.0, N - 1.0]], (X, 1))
        cf = self.plan.pricer.per_gpu(np.full((X, P), su), np.full((X, P), net), steps_XT=steps)
        if N == 1:
            cf = self.plan.pricer.measured(cf, [(kind, g, nbytes)])
        self._coflows[group, nbytes, kind] = cf
        return cf
