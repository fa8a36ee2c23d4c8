"""A real pipeline of MoE layers over ``torch.distributed``: 1F1B, timed by parts.

``stages x dp`` ranks (rank ``r`` = replica ``r // stages``, stage ``r % stages``).
Each stage holds ``layers_per_stage`` MoE layers (router, permute, SwiGLU experts,
unpermute: the kernels of :mod:`moesim.kernels`, fp32, every expert on the rank:
EP = 1). With ``vocab`` the model has tied word embeddings, as Megatron-Core runs
them under a pipeline: the first stage looks token ids up in a ``vocab x hidden``
table, the last stage multiplies its output by its own copy of that table (the LM
head) and takes the cross-entropy, and after the step's data-parallel sync the
two copies' gradients are all-reduced over the *embedding group* (the first and
last stage of each replica: ``_allreduce_word_embedding_grads`` of
``finalize_model_grads``). Without ``vocab`` the first stage's inputs are random
activations that require grad, as an embedding's output does, and the loss is
their mean square. One step runs ``micro_batches`` micro-batches
of ``tokens`` tokens per replica through the stages in the 1F1B order of Megatron-Core
(``forward_backward_pipelining_without_interleaving``): stage ``s`` runs
``stages - s - 1`` warm-up forwards, then one forward and one backward in turn,
then the remaining backwards. Activations go forward and their gradients back
with real ``isend`` / blocking ``recv`` (gloo), the backward is autograd's, and
after the last backward each stage all-reduces (sum) its router (and embedding)
gradients, then its expert gradients, over its ``dp`` replicas (Megatron's DDP
without the distributed optimizer and without overlap), then the embedding group
all-reduces the tied embedding's gradient.

Parts, per rank, from wall clocks (``perf_counter``: ``CLOCK_MONOTONIC``, the same
clock in every local process, so send and receive times can be matched):

- ``forward`` / ``backward``: the stage's compute of the forward (loss included on
  the last stage) and backward passes, summed over micro-batches;
- ``sends``: exposed point-to-point time: for each receive, from the later of the
  receive's start and the matching send's start to the data's arrival (a send
  is asynchronous for the sender);
- ``grad_sync``: the gradient all-reduces, each from the last member of its group
  reaching it (before that a rank waits for the other's last backward: bubble, as
  the wait before a send starts is);
- ``bubble``: the rest of the step (waiting for the other stage, before a send
  started, and for the slowest rank at the end).

The step runs from the last rank leaving a barrier to the last rank finishing,
so per rank ``forward + backward + sends + grad_sync + bubble = step``, the
simulator's breakdown. :func:`reference` is the same model in one process: the
pipeline's losses, last-stage outputs and all-reduced gradients are checked
against it.

Legend: T = tokens per micro-batch, D = hidden, S = stages, P = parameters (flat),
R = ranks (ARCHITECTURE.md#shape-letters).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from moesim.errors import UserError
from moesim.kernels.dispatch import permute, unpermute
from moesim.kernels.experts import experts_forward
from moesim.measure.distributed import launch
from moesim.measure.ep_layer import EPCase, EPWeights, gate, make_weights
from moesim.measure.ep_probe import ComputeGap, keep_freed_memory, pin_rank, usable_cores

PARTS = ("forward", "backward", "sends", "bubble", "grad_sync")
#: a DP all-reduce, an embedding-group all-reduce (event kinds of :class:`StepLog`)
SYNC_KINDS = ("sync", "emb_sync")
#: relative tolerance of the pipeline's results against the single-process reference
TOLERANCE = 1e-4


@dataclass(frozen=True)
class PipeCase:
    """One pipeline run. ``tokens`` per micro-batch and replica; fp32 throughout."""

    stages: int = 2
    dp: int = 2
    layers_per_stage: int = 2
    micro_batches: int = 4
    tokens: int = 256
    hidden: int = 128
    ffn: int = 256
    num_experts: int = 8
    top_k: int = 2
    seed: int = 0
    #: tied word embeddings of ``vocab`` tokens (first stage: lookup, last: LM head and
    #: cross-entropy, gradients all-reduced over the embedding group); 0: none
    vocab: int = 0
    #: finish the sends in flight before the next pass computes (after its receive, as
    #: Megatron's ``send_forward_recv_backward`` pairs them): gloo moves the bytes with
    #: the sender's CPU, and a send left beside the next pass's compute on the same
    #: core waits for it (a GPU's copy engines need no SMs); the wait is bubble
    wait_sends: bool = True

    @property
    def world(self) -> int:
        return self.stages * self.dp

    def layer_case(self, layer: int) -> EPCase:
        """Layer ``layer`` (global index) as an EP case: its shapes and weight seed."""
        return EPCase(
            num_experts=self.num_experts, top_k=self.top_k, tokens=self.tokens,
            hidden=self.hidden, ffn=self.ffn, seed=self.seed * 1000 + layer,
        )  # fmt: skip

    def label(self) -> str:
        return (
            f"pp{self.stages} dp{self.dp} L{self.layers_per_stage}/stage m{self.micro_batches} "
            f"T{self.tokens} D{self.hidden} F{self.ffn} E{self.num_experts} k{self.top_k}"
            + (f" V{self.vocab} tied" if self.vocab else "")
        )

    def embedding_groups(self) -> list[list[int]]:
        """Each replica's first and last stage (empty without tied embeddings)."""
        if not self.vocab:
            return []
        S = self.stages
        return [[d * S, d * S + S - 1] for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        """Each stage's data-parallel replicas."""
        return [[d * self.stages + s for d in range(self.dp)] for s in range(self.stages)]


def check_case(case: PipeCase) -> None:
    """Raise :class:`UserError` (one line) for a pipeline that cannot run."""
    for name in ("stages", "dp", "layers_per_stage", "micro_batches", "tokens"):
        if getattr(case, name) < 1:
            raise UserError(f"pipeline {name} = {getattr(case, name)}: must be >= 1")
    if case.stages < 2:
        raise UserError(f"pipeline stages = {case.stages}: a pipeline needs >= 2 stages")
    if case.top_k > case.num_experts:
        raise UserError(f"top_k = {case.top_k}: must be <= num_experts ({case.num_experts})")
    if case.vocab < 0:
        raise UserError(f"pipeline vocab = {case.vocab}: must be >= 0 (0: no embeddings)")


# -- the model ---------------------------------------------------------------------------


def stage_weights(case: PipeCase, stage: int) -> list[EPWeights]:
    """The stage's layers' weights (router and experts require grad; the bias does not)."""
    out = []
    for j in range(case.layers_per_stage):
        w = make_weights(case.layer_case(stage * case.layers_per_stage + j))
        for t in (w.router_DE, *_expert_tensors(w)):
            t.requires_grad_(True)
        out.append(w)
    return out


def dense_params(ws: list[EPWeights]) -> list[torch.Tensor]:
    """Non-expert parameters (the routers), in backward order."""
    return [w.router_DE for w in reversed(ws)]


def expert_params(ws: list[EPWeights]) -> list[torch.Tensor]:
    """Expert parameters, in backward order."""
    return [t for w in reversed(ws) for t in reversed(_expert_tensors(w))]


def _expert_tensors(w: EPWeights) -> list[torch.Tensor]:
    """The routed experts' weights, gate (if gated), up, down."""
    e = w.experts
    return [t for t in (e.w_gate_EDF, e.w_up_EDF, e.w_down_EFD) if t is not None]


def moe_layer(x_TD: torch.Tensor, w: EPWeights, case: PipeCase) -> torch.Tensor:
    """gate -> permute -> experts -> unpermute, differentiable (autograd)."""
    c = case.layer_case(0)
    r = gate(x_TD, w, c.router_spec())
    x_ND, tpe_E, state = permute(x_TD, r, c.dispatch, num_experts=case.num_experts)
    y_ND = experts_forward(
        x_ND, tpe_E, w.experts.w_gate_EDF, w.experts.w_up_EDF, w.experts.w_down_EFD, c.experts
    )
    return unpermute(y_ND, state, c.dispatch)


def run_stage(x_TD: torch.Tensor, ws: list[EPWeights], case: PipeCase) -> torch.Tensor:
    for w in ws:
        x_TD = moe_layer(x_TD, w, case)
    return x_TD


def embedding(case: PipeCase) -> torch.Tensor:
    """The tied ``[vocab, hidden]`` table (standard normal, seeded; requires grad)."""
    g = torch.Generator().manual_seed(case.seed * 7919 + 17)
    return torch.randn(case.vocab, case.hidden, generator=g).requires_grad_(True)


def loss_of(
    out_TD: torch.Tensor, emb_VD: torch.Tensor | None = None, targets_T: torch.Tensor | None = None
) -> torch.Tensor:
    """The last stage's loss: cross-entropy of the tied LM head's logits, or (no
    embeddings) the mean square of the output."""
    if emb_VD is None:
        return out_TD.square().mean()
    assert targets_T is not None
    return torch.nn.functional.cross_entropy(out_TD @ emb_VD.t(), targets_T)


def micro_batch(case: PipeCase, replica: int, mb: int) -> torch.Tensor:
    """Replica ``replica``'s input ``x_TD`` of micro-batch ``mb`` (standard normal, seeded)."""
    g = torch.Generator().manual_seed(case.seed * 1_000_003 + replica * 1009 + mb + 1)
    return torch.randn(case.tokens, case.hidden, generator=g)


def token_ids(case: PipeCase, replica: int, mb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids_T, targets_T)`` of a micro-batch with embeddings (uniform, seeded)."""
    g = torch.Generator().manual_seed(case.seed * 1_000_003 + replica * 1009 + mb + 1)
    ids = torch.randint(case.vocab, (2, case.tokens), generator=g)
    return ids[0], ids[1]


@dataclass(frozen=True)
class Reference:
    """Single-process results: losses ``[dp][m]`` and summed gradients per stage."""

    losses: list[list[float]]
    grads: list[list[torch.Tensor]]  # per stage: its params (:func:`stage_params`)


def holds_embedding(case: PipeCase, stage: int) -> bool:
    return bool(case.vocab) and stage in (0, case.stages - 1)


def stage_params(
    case: PipeCase, stage: int, ws: list[EPWeights], emb_VD: torch.Tensor | None
) -> list[list[torch.Tensor]]:
    """A stage's parameters as its gradient buffers hold them: non-expert (the
    embedding copy, if the stage holds one, then the routers), then the experts'."""
    emb = [emb_VD] if emb_VD is not None and holds_embedding(case, stage) else []
    return [emb + dense_params(ws), expert_params(ws)]


def reference(case: PipeCase) -> Reference:
    """Every replica's micro-batches through all layers in one process, gradients summed
    (one embedding table: its gradient is the sum the embedding group's all-reduce makes)."""
    stages = [stage_weights(case, s) for s in range(case.stages)]
    emb = embedding(case) if case.vocab else None
    losses = []
    for d in range(case.dp):
        row = []
        for i in range(case.micro_batches):
            if emb is None:
                x, targets = micro_batch(case, d, i), None
            else:
                ids, targets = token_ids(case, d, i)
                x = torch.nn.functional.embedding(ids, emb)
            for ws in stages:
                x = run_stage(x, ws, case)
            loss = loss_of(x, emb, targets)
            loss.backward()
            row.append(float(loss.detach()))
        losses.append(row)
    grads = [
        [_grad(p) for part in stage_params(case, s, ws, emb) for p in part]
        for s, ws in enumerate(stages)
    ]
    return Reference(losses, grads)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)


# -- one rank ------------------------------------------------------------------------------


def one_f_one_b(stages: int, stage: int, m: int) -> list[tuple[str, int]]:
    """The 1F1B order of ``stage``: ``[("F", mb) | ("B", mb), ...]``."""
    warm = min(stages - stage - 1, m)
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):
        order += [("F", warm + i), ("B", i)]
    return order + [("B", i) for i in range(m - warm, m)]


@dataclass
class StepLog:
    """One step of one rank: ``(kind, micro-batch, start, end)`` events, kind one of
    ``F``, ``B`` (compute), ``recv_F``, ``recv_B`` (activations, gradients), ``send_F``,
    ``send_B`` (start only), ``sync`` (data-parallel), ``emb_sync`` (embedding group);
    plus the step's start and end."""

    events: list[tuple[str, int, float, float]] = field(default_factory=list)
    start: float = 0.0
    end: float = 0.0
    compute_cpu_s: float = 0.0  # thread CPU seconds of the F and B passes

    @property
    def share(self) -> float:
        """Thread CPU time over wall time of this rank's compute (1: a core to itself)."""
        wall = sum(t1 - t0 for kind, _, t0, t1 in self.events if kind in ("F", "B"))
        return self.compute_cpu_s / max(wall, 1e-12)


class _StageRunner:
    """One rank's stage: runs the 1F1B order of one step and logs its events."""

    def __init__(self, case: PipeCase, rank: int) -> None:
        self.case, self.rank = case, rank
        self.stage, self.replica = rank % case.stages, rank // case.stages
        self.ws = stage_weights(case, self.stage)
        self.emb = embedding(case) if holds_embedding(case, self.stage) else None
        # one flat gradient buffer per part (Megatron's grad buffer, DDP's
        # gradient_as_bucket_view): autograd accumulates into views of it, the
        # all-reduce runs on it in place, nothing is flattened or copied back
        self.parts = stage_params(case, self.stage, self.ws, self.emb)
        self.params = [p for part in self.parts for p in part]
        self.flat_P = [torch.zeros(sum(p.numel() for p in part)) for part in self.parts]
        m = case.micro_batches
        if case.vocab:
            self.ids = [token_ids(case, self.replica, i) for i in range(m)]
        else:
            self.inputs = [micro_batch(case, self.replica, i) for i in range(m)]
        # every rank creates every group, in the same order
        self.groups = [dist.new_group(g) for g in case.dp_groups()]
        emb_groups = [dist.new_group(g) for g in case.embedding_groups()]
        self.emb_group = emb_groups[self.replica] if self.emb is not None else None

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.case.stages - 1

    def step(self) -> tuple[StepLog, list[float]]:
        for part, flat_P in zip(self.parts, self.flat_P, strict=True):
            flat_P.zero_()
            _bind_grads(flat_P, part)
        log, losses = StepLog(), [0.0] * self.case.micro_batches
        sends: list[tuple[Any, torch.Tensor]] = []  # (work, buffer) of each isend
        live: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        dist.barrier()
        log.start = time.perf_counter()
        for kind, i in one_f_one_b(self.case.stages, self.stage, self.case.micro_batches):
            if kind == "F":
                live[i] = self._forward(i, log, sends, losses)
            else:
                self._backward(i, *live.pop(i), log, sends)
        for work, _ in sends:
            work.wait()
        self._sync(log)
        log.end = time.perf_counter()
        return log, losses

    def _recv(self, kind: str, i: int, peer: int, log: StepLog) -> torch.Tensor:
        buf = torch.empty(self.case.tokens, self.case.hidden)
        t0 = time.perf_counter()
        dist.recv(buf, src=peer)
        log.events.append((f"recv_{kind}", i, t0, time.perf_counter()))
        return buf

    def _send(self, kind: str, i: int, t: torch.Tensor, peer: int, log: StepLog, sends: list):
        t0 = time.perf_counter()
        buf = t.detach().contiguous()
        sends.append((dist.isend(buf, dst=peer), buf))  # the buffer lives until the wait
        log.events.append((f"send_{kind}", i, t0, t0))

    def _drain(self, sends: list) -> None:
        """Before a pass computes: wait for the sends in flight (when ``wait_sends``)."""
        if self.case.wait_sends:
            for work, _ in sends:
                work.wait()
            sends.clear()

    def _forward(self, i: int, log: StepLog, sends: list, losses: list[float]):
        if not self.first:
            x = self._recv("F", i, self.rank - 1, log).requires_grad_(True)
        elif self.emb is None:  # as an embedding's output: the first stage computes its
            x = self.inputs[i].requires_grad_(True)  # input's gradient as every stage does
        self._drain(sends)
        t0, c0 = time.perf_counter(), time.thread_time()
        if self.first and self.emb is not None:
            x = torch.nn.functional.embedding(self.ids[i][0], self.emb)
        out = run_stage(x, self.ws, self.case)
        if self.last:
            out = loss_of(out, self.emb, self.ids[i][1] if self.emb is not None else None)
            losses[i] = float(out.detach())
        log.events.append(("F", i, t0, time.perf_counter()))
        log.compute_cpu_s += time.thread_time() - c0
        if not self.last:
            self._send("F", i, out, self.rank + 1, log, sends)
        return x, out

    def _backward(self, i: int, x: torch.Tensor, out: torch.Tensor, log: StepLog, sends: list):
        grad = None if self.last else self._recv("B", i, self.rank + 1, log)
        self._drain(sends)
        t0, c0 = time.perf_counter(), time.thread_time()
        out.backward(grad)
        log.events.append(("B", i, t0, time.perf_counter()))
        log.compute_cpu_s += time.thread_time() - c0
        if not self.first:
            assert x.grad is not None
            self._send("B", i, x.grad, self.rank - 1, log, sends)

    def _sync(self, log: StepLog) -> None:
        """Data-parallel all-reduces, then the embedding group's (finalize_model_grads)."""
        t0 = time.perf_counter()
        if self.case.dp > 1:
            for flat_P in self.flat_P:  # router (and embedding) gradients, then the experts'
                spin_wait(dist.all_reduce(flat_P, group=self.groups[self.stage], async_op=True))
        log.events.append(("sync", -1, t0, time.perf_counter()))
        if self.emb_group is not None and self.case.stages > 1:
            assert self.emb is not None and self.emb.grad is not None
            t0 = time.perf_counter()
            # a view of flat_P[0]
            spin_wait(dist.all_reduce(self.emb.grad, group=self.emb_group, async_op=True))
            log.events.append(("emb_sync", -1, t0, time.perf_counter()))


def spin_wait(work: Any) -> None:
    """Wait for a gloo collective by polling it, yielding the core between polls.

    A GPU rank waiting in a collective spins (NCCL's kernels poll); a gloo rank
    blocked in ``wait`` sleeps, and after tens of milliseconds
    asleep it takes milliseconds to resume (measured here: a 1 MiB all-reduce whose
    other member had waited 42 ms in it, 4-8 ms from the last arrival; after a
    64-byte all-reduce that brought both in, 1.0-1.2 ms). Polling keeps the waiting
    rank runnable; ``sched_yield`` lets gloo's own threads on the same core run.
    Collectives only: gloo's point-to-point requests complete only inside ``wait``.
    """
    while not work.is_completed():
        os.sched_yield()
    work.wait()  # raises the request's error, if any


def _bind_grads(flat_P: torch.Tensor, params: list[torch.Tensor]) -> None:
    """Make each parameter's ``.grad`` a view of its slice of ``flat_P``."""
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat_P[at : at + n].view_as(p)
        at += n


#: a step counts as undisturbed when every rank's compute got at least this share of
#: what it should (a core, or cores / ranks with more ranks than cores)
CLEAN_SHARE = 0.85
#: at most this many times ``steps`` steps are run looking for undisturbed ones
MAX_ATTEMPTS = 3


@dataclass
class PipeRankResult:
    rank: int
    stage: int
    replica: int
    steps: list[StepLog]
    losses: list[float]  # last stage: the last step's losses per micro-batch
    grads: list[torch.Tensor]  # the last step's all-reduced gradients
    disturbed: int = 0  # steps re-run because other processes took the cores
    min_share: float = 1.0  # median over kept steps of the smallest rank's compute share
    probe_s: dict[str, float] = field(default_factory=dict)  # :class:`HostProbe`, kept steps


class HostProbe:
    """The layer's expert GEMMs (the run's shape, uniform load, skew 0), timed between a
    rank's steps as the experts suite times them (:func:`moesim.measure.suites.experts.measure`
    on flushed caches, this thread's CPU clock): the host's speed in the run's own time
    window, for :func:`moesim.validation.pipeline.host_drift` to set against the
    calibration's fit. On this VM the speed drifts 10-30 % within a minute, so
    re-timing before and after the run (tens of seconds apart) misses what the steps
    saw, and a roofline GEMM's speed need not follow the layer's grouped GEMMs'."""

    def __init__(self, case: PipeCase, budget_s: float = 0.05) -> None:
        from moesim.measure.suites.common import BenchContext, Case

        self.case = Case("experts", "experts", strategy="loop", dtype="fp32", T=case.tokens,
                         D=case.hidden, F=case.ffn, E=case.num_experts, K=case.top_k)  # fmt: skip
        self.ctx = BenchContext(budget_s=budget_s, warmup_s=0.0, threads=1)
        self.samples: dict[str, list[float]] = {"flushed": [], "solo": [], "together": []}

    def time(self, key: str) -> None:
        """``flushed``: as the experts suite benches it (alone); ``solo`` / ``together``:
        on warm caches (a stage's working set stays in the shared last-level cache),
        alone and with every rank at once: the co-run interference in the run's window."""
        from moesim.measure.suites import experts
        from moesim.measure.timer import cpu_flush_by_default

        with cpu_flush_by_default(key == "flushed"):
            row = experts.measure(self.case, self.ctx)
        self.samples[key].append(float(row["median_s"]))

    def median(self, key: str, keep: list[int]) -> float:
        got = [self.samples[key][i] for i in keep]
        return float(torch.tensor(got).median()) if got else 0.0


def probe_between_steps(probe: HostProbe, rank: int, world: int) -> None:
    """Each rank alone (flushed, then warm), then all at once (warm)."""
    for r in range(world):
        if r == rank:
            probe.time("flushed")
            probe.time("solo")
        dist.barrier()
    probe.time("together")
    dist.barrier()


def run_rank(case: PipeCase, steps: int, warmup: int) -> PipeRankResult:
    """Body of one rank (process group initialised): warm up, then log ``steps`` steps.

    As in :func:`moesim.measure.ep_layer.run_rank`, a step in which some rank's
    compute got less than :data:`CLEAN_SHARE` of its core is disturbed by other
    processes and re-run (up to ``MAX_ATTEMPTS * steps`` steps); disturbed steps are
    kept only when too few clean ones turned up. All ranks decide alike (an
    all-reduce of the smallest share), so they stay in step.
    """
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    cores = usable_cores()  # before pinning narrows this process to one core
    pin_rank(rank)  # rank r on core r % cores: with 2 cores, each stage's replicas share one
    keep_freed_memory()
    runner = _StageRunner(case, rank)
    expected = min(1.0, cores / world)
    probe = HostProbe(case)
    clean: list[tuple[StepLog, float, int]] = []
    disturbed: list[tuple[StepLog, float, int]] = []
    losses: list[float] = []
    for k in range(warmup + MAX_ATTEMPTS * steps):
        if len(clean) >= steps:
            break
        log, losses = runner.step()
        share = _min_share(log.share)
        if k >= warmup:
            probe_between_steps(probe, rank, world)
            got = (log, share, len(probe.samples["solo"]) - 1)
            (clean if share >= CLEAN_SHARE * expected else disturbed).append(got)
    kept = clean if len(clean) >= max(1, steps // 2) else (clean + disturbed)[:steps]
    grads = [_grad(p) for p in runner.params]
    return PipeRankResult(
        rank, runner.stage, runner.replica, [g for g, _, _ in kept], losses, grads,
        disturbed=len(disturbed),
        min_share=float(torch.tensor([s for _, s, _ in kept]).median()),
        probe_s={k: probe.median(k, [i for _, _, i in kept]) for k in probe.samples},
    )  # fmt: skip


def _min_share(share: float) -> float:
    t = torch.tensor([share], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


# -- the whole run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PipeMeasurement:
    """Medians over steps of each part, mean over ranks (and the step, the slowest rank)."""

    case: PipeCase
    parts_s: dict[str, float]  # mean over ranks, median over steps
    step_s: float
    step_samples_s: list[float]
    per_rank_s: list[dict[str, float]]  # per rank, median over steps
    max_rel_error: float  # losses and gradients vs :func:`reference`
    cpu_share: float = 1.0  # compute CPU time / wall, mean over ranks, median over steps
    disturbed_steps: int = 0
    probe_s: list[dict[str, float]] = field(default_factory=list)  # per rank (HostProbe)


class PipeMismatch(RuntimeError):
    """The pipeline's results differ from the single-process reference (a bug, exit 1)."""


def run_pipeline(
    case: PipeCase, *, steps: int = 8, warmup: int = 2, timeout_s: float = 300.0
) -> PipeMeasurement:
    """Run the pipeline on ``case.world`` local gloo ranks, check it, summarise its parts."""
    check_case(case)
    results: list[PipeRankResult] = launch(
        run_rank, case.world, args=(case, steps, warmup), backend="gloo", timeout_s=timeout_s
    )
    err = check_against_reference(case, results)
    kept = len(results[0].steps)
    per_step = [step_parts([r.steps[k] for r in results], case.stages) for k in range(kept)]
    m = summarise(case, per_step, err)
    share_S = torch.tensor([[r.steps[k].share for r in results] for k in range(kept)]).mean(1)
    return replace(m, cpu_share=float(share_S.median()), disturbed_steps=results[0].disturbed,
                   probe_s=[r.probe_s for r in results])  # fmt: skip


def step_parts(logs: list[StepLog], stages: int | None = None) -> list[dict[str, float]]:
    """Parts of one step, per rank (``logs`` by rank); the step is shared by all ranks.

    ``stages``: rank ``r`` is stage ``r % stages``; a stage's ranks form its
    data-parallel group (default: every rank its own stage).
    """
    start, end = max(g.start for g in logs), max(g.end for g in logs)
    S = stages or len(logs)
    R = len(logs)
    arrived = {
        kind: [min((t0 for k, _, t0, _ in g.events if k == kind), default=0.0) for g in logs]
        for kind in SYNC_KINDS
    }
    # the last member's arrival: a stage's replicas (DP), a replica's first and last stage
    group_in = {
        "sync": [max(arrived["sync"][q] for q in range(r % S, R, S)) for r in range(R)],
        "emb_sync": [max(arrived["emb_sync"][r - r % S], arrived["emb_sync"][r - r % S + S - 1])
                     for r in range(R)],
    }  # fmt: skip
    sends = {
        (r, kind.removeprefix("send_"), i): t0
        for r, g in enumerate(logs)
        for kind, i, t0, _ in g.events
        if kind.startswith("send_")
    }
    out = []
    for r, g in enumerate(logs):
        parts = dict.fromkeys(PARTS, 0.0)
        for kind, i, t0, t1 in g.events:
            if kind == "F":
                parts["forward"] += t1 - t0
            elif kind == "B":
                parts["backward"] += t1 - t0
            elif kind in SYNC_KINDS:  # from the last member's arrival, as for a receive
                parts["grad_sync"] += max(0.0, t1 - max(t0, group_in[kind][r]))
            elif kind.startswith("recv_"):
                d = kind.removeprefix("recv_")
                peer = r - 1 if d == "F" else r + 1
                sent = sends.get((peer, d, i), t0)
                parts["sends"] += max(0.0, t1 - max(t0, sent))
        parts["step"] = end - start
        parts["bubble"] = parts["step"] - sum(parts[p] for p in PARTS if p != "bubble")
        out.append(parts)
    return out


def summarise(
    case: PipeCase, per_step: list[list[dict[str, float]]], err: float
) -> PipeMeasurement:
    """Medians over steps of the mean over ranks of each part."""
    names = (*PARTS, "step")
    t_SRP = torch.tensor([[[r[p] for p in names] for r in step] for step in per_step])
    mean_SP = t_SRP.mean(1)
    med_P = mean_SP.median(0).values
    per_rank = t_SRP.median(0).values
    return PipeMeasurement(
        case=case,
        parts_s={p: float(med_P[j]) for j, p in enumerate(PARTS)},
        step_s=float(med_P[-1]),
        step_samples_s=mean_SP[:, -1].tolist(),
        per_rank_s=[{p: float(row[j]) for j, p in enumerate(names)} for row in per_rank],
        max_rel_error=err,
    )


def check_against_reference(case: PipeCase, results: list[PipeRankResult]) -> float:
    """Largest relative difference of losses and gradients; raise :class:`PipeMismatch`."""
    ref = reference(case)
    worst = 0.0
    for r in results:
        pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = [
            (f"gradient {j}", got, want)
            for j, (got, want) in enumerate(zip(r.grads, ref.grads[r.stage], strict=True))
        ]
        if r.stage == case.stages - 1:
            pairs.append(("losses", torch.tensor(r.losses), torch.tensor(ref.losses[r.replica])))
        for what, got, want in pairs:
            scale = max(float(want.abs().max()), 1e-30)
            diff = float((got - want).abs().max()) / scale
            if not diff <= TOLERANCE:
                raise PipeMismatch(
                    f"pipeline {what} of rank {r.rank} (stage {r.stage}) differs from the "
                    f"single-process reference by {diff:.3g} relative ({case.label()})"
                )
            worst = max(worst, diff)
    return worst


def to_jsonable(m: PipeMeasurement) -> dict[str, Any]:
    return {
        "parts_s": m.parts_s,
        "step_s": m.step_s,
        "step_samples_s": m.step_samples_s,
        "per_rank_s": m.per_rank_s,
        "max_rel_error": m.max_rel_error,
        "cpu_share": m.cpu_share,
        "disturbed_steps": m.disturbed_steps,
        "probe_s": m.probe_s,
    }


# -- point-to-point and all-reduce costs in the run's rank layout --------------------


def comm_rank(case: PipeCase, sizes: list[int], reps: int) -> dict[str, list[list[float]]]:
    """On the pipeline's own ranks, pinned as it pins them, per size (bytes of fp32) and
    rep, ``perf_counter`` stamps (one clock for all local processes):

    - ``p2p_in`` / ``p2p_out``: stage ``2j`` of every replica sends to stage ``2j + 1``,
      all pairs at once (as the pipeline's replicas send at once), the receiver already
      waiting in ``recv`` (the sender computes a second gap): when each side entered
      ``send`` / ``recv``, and when it left. Gloo's point-to-point is a rendezvous
      (the bytes move once the receive is posted), so this is the transfer the
      simulator starts at the later of send and post; both entering at once instead
      adds the ready notice's round trip and a long tail (measured here, 512 KiB:
      mean 1.7 ms, median 0.40, against 0.28 / 0.28 with the receiver waiting);
    - ``ar_in`` / ``ar_out``: the same for an ``all_reduce`` on every gradient group
      at once (:func:`sync_groups`: the stages' data-parallel groups, or with ``dp`` 1
      the replicas' embedding groups; empty with neither).

    Each call comes after :class:`~moesim.measure.ep_probe.ComputeGap` (the pipeline's
    come after passes; ranks sharing a core reach it at different times, as theirs
    do). The figures carry what the run's layout costs: with more ranks than cores a
    group's members share a core, and gloo moves bytes with its time.
    """
    torch.set_num_threads(1)
    rank = dist.get_rank()
    cores = usable_cores()  # before pinning narrows this process to one core
    pin_rank(rank)
    keep_freed_memory()
    stage = rank % case.stages
    groups = [dist.new_group(g) for g in sync_groups(case)]
    mine = next((grp for g, grp in zip(sync_groups(case), groups, strict=True) if rank in g), None)
    sender, receiver = stage % 2 == 0 and stage + 1 < case.stages, stage % 2 == 1
    gap = ComputeGap(ranks_per_core=-(-dist.get_world_size() // max(cores, 1)))
    out: dict[str, list[list[float]]] = {k: [] for k in ("p2p_in", "p2p_out", "ar_in", "ar_out")}
    for nbytes in sizes:
        buf = torch.zeros(max(nbytes // 4, 1))
        got: dict[str, list[float]] = {k: [] for k in out}
        for k in range(reps + 1):
            dist.barrier()
            gap()
            if sender:  # the receiver is waiting in its receive when the message leaves
                gap()
            t0 = time.perf_counter()
            if sender:
                dist.send(buf, dst=rank + 1)
            elif receiver:
                dist.recv(buf, src=rank - 1)
            t1 = time.perf_counter()
            dist.barrier()
            gap()
            t2 = time.perf_counter()
            if mine is not None:
                spin_wait(dist.all_reduce(buf, group=mine, async_op=True))
            t3 = time.perf_counter()
            if k:  # the first round warms the connections and the pages
                for key, t in zip(got, (t0, t1, t2, t3), strict=True):
                    got[key].append(t)
        for key in out:
            out[key].append(got[key])
    return out


def measure_comm(
    case: PipeCase, sizes: list[int], reps: int = 31, timeout_s: float = 120.0
) -> dict[str, Any]:
    """``{"bytes", "p2p_s", "allreduce_s"}`` on ``case.world`` local gloo ranks laid out as
    the pipeline's (:func:`comm_rank`), each timed as the pipeline's parts are
    (:func:`step_parts`): a message from the later of the send's and the receive's
    start to its arrival, an all-reduce on each rank from the last member's arrival
    to the rank's end. Per size, means over reps and sending pairs (ranks).

    Means, not medians: on shared cores a message either arrives at once or waits for
    its receiver's core (a scheduler slice), and the parts the pipeline is judged on
    are sums over many messages, whose expectation is the mean."""
    got = launch(comm_rank, case.world, args=(case, sizes, reps), backend="gloo",
                 timeout_s=timeout_s)  # fmt: skip
    S = case.stages
    pairs = [(r, r + 1) for r in range(case.world) if r % S % 2 == 0 and r % S + 1 < S]

    def stamps(key: str, ranks: list[int]) -> torch.Tensor:  # [ranks, sizes, reps]
        return torch.tensor([got[r][key] for r in ranks], dtype=torch.float64)

    send_in, recv_in = (
        stamps("p2p_in", [a for a, _ in pairs]),
        stamps("p2p_in", [b for _, b in pairs]),
    )
    one_way = stamps("p2p_out", [b for _, b in pairs]) - torch.maximum(send_in, recv_in)
    groups = sync_groups(case)
    members = [r for g in groups for r in g]
    reduce = torch.cat([
        stamps("ar_out", g) - stamps("ar_in", g).amax(0, keepdim=True)  # the group's last in
        for g in groups
    ]) if groups else torch.zeros(0, len(sizes), reps)  # [members, sizes, reps]  # fmt: skip
    return {
        "bytes": list(sizes),
        "ranks": case.world,
        "p2p_s": one_way.permute(1, 0, 2).flatten(1).mean(1).tolist(),
        "allreduce_s": reduce.permute(1, 0, 2).flatten(1).mean(1).tolist() if members else [],
        "allreduce_group": len(groups[0]) if groups else 0,
    }


def sync_groups(case: PipeCase) -> list[list[int]]:
    """The gradient groups whose all-reduce :func:`measure_comm` times: each stage's
    data-parallel group (``dp`` > 1), else each replica's embedding group."""
    if case.dp > 1:
        return case.dp_groups()
    return case.embedding_groups()


# -- backward over forward of one layer's kernels ---------------------------------------------


def backward_ratios(case: PipeCase, reps: int = 15) -> dict[str, float]:
    """Median autograd backward / forward time of one layer's kernels in this process.

    ``gemm``: the expert GEMMs (``experts_forward`` on the permuted rows; input and
    weight gradients); ``memory``: the layer with identity experts (router, permute,
    unpermute). Thread CPU seconds, so other processes sharing the core do not count;
    forwards are timed with autograd recording, as the pipeline runs them, and freed
    memory is kept (:func:`keep_freed_memory`) as in the pipeline's ranks.
    """
    torch.set_num_threads(1)
    keep_freed_memory()
    w = stage_weights(case, 0)[0]
    x_TD = micro_batch(case, 0, 0).requires_grad_(True)
    c = case.layer_case(0)
    r = gate(x_TD.detach(), w, c.router_spec())
    x_ND, tpe_E, _ = permute(x_TD.detach(), r, c.dispatch, num_experts=case.num_experts)
    x_ND.requires_grad_(True)

    def experts() -> torch.Tensor:
        return experts_forward(
            x_ND, tpe_E, w.experts.w_gate_EDF, w.experts.w_up_EDF, w.experts.w_down_EFD, c.experts
        )

    def routing_only() -> torch.Tensor:
        rt = gate(x_TD, w, c.router_spec())
        y_ND, _, state = permute(x_TD, rt, c.dispatch, num_experts=case.num_experts)
        return unpermute(y_ND, state, c.dispatch)

    fe, be = _fwd_bwd(experts, reps)
    fm, bm = _fwd_bwd(routing_only, reps)
    return {
        "gemm": be / fe,
        "memory": bm / fm,
        "experts_forward_s": fe,
        "experts_backward_s": be,
        "memory_forward_s": fm,
        "memory_backward_s": bm,
    }


def _fwd_bwd(fn: Any, reps: int) -> tuple[float, float]:
    """Median thread CPU seconds of ``fn()`` and of its output's backward (2 warm-ups)."""
    fwd, bwd = [], []
    for k in range(reps + 2):
        t0 = time.thread_time()
        y = fn()
        t1 = time.thread_time()
        y.backward(torch.ones_like(y))
        t2 = time.thread_time()
        if k >= 2:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return float(torch.tensor(fwd).median()), float(torch.tensor(bwd).median())
