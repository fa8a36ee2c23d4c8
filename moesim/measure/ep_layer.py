"""A real expert-parallel MoE layer over ``torch.distributed``, timed per phase.

Each of R ranks holds E/R experts (contiguous: rank r owns experts
``r*El .. r*El+El-1``, El = E/R) and its own T tokens. One step is

    gate -> permute -> dispatch (all-to-all) -> experts -> combine (all-to-all) -> unpermute

with the real router, permute and SwiGLU expert kernels of :mod:`moesim.kernels`.
Dispatch first exchanges the per-expert counts (a small all-to-all) so every
rank knows its uneven receive splits, then moves the rows with
``all_to_all_single``. :func:`reference_layer` is the single-process layer the
output is checked against.

Legend: T = tokens per rank, D = hidden size, F = expert FFN size, E = experts,
K = top-k, El = local experts per rank, R = ranks, N = rows after permute
(kept token-expert assignments), M = rows received by a rank.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from moesim.config.router import RouterSpec
from moesim.errors import UserError
from moesim.kernels.dispatch import permute, sort_chunks, unpermute
from moesim.kernels.experts import ExpertWeights, experts_forward
from moesim.kernels.gating import Routing, route, router_logits
from moesim.measure.distributed import default_backend, launch
from moesim.measure.ep_probe import keep_freed_memory, pin_rank, usable_cores
from moesim.phases import COMPUTE_PHASES, MOE_LAYER_PHASES

PHASES = MOE_LAYER_PHASES  # one source: moesim/phases.py
#: parts of a phase also reported: the split-size exchange at the start of dispatch and
#: the regroup of received rows by local expert (and back) inside the experts phase
SUB_PHASES = ("dispatch_counts", "experts_regroup")
#: the all-to-all phases (and sub-phase) timed from the last rank's arrival, and the
#: arrival each starts at: a collective starts when its slowest member is in, as the
#: simulator prices it; a rank's wait for the others before that is load imbalance
ARRIVALS = {"dispatch": "dispatch", "dispatch_counts": "dispatch", "combine": "combine"}
#: std of one router logit: Gaussian logits this wide pick top-1 experts with almost
#: the frequencies of Gumbel noise (std pi/sqrt(6)), so a logit bias of
#: ``-skew*log(e+1)`` makes expert popularity close to Zipf(skew)
_LOGIT_STD = math.pi / math.sqrt(6.0)


@dataclass(frozen=True)
class EPCase:
    """One EP-layer configuration. ``tokens`` is per rank; fp32 throughout."""

    num_experts: int
    top_k: int
    tokens: int
    hidden: int
    ffn: int
    skew: float = 0.0  # Zipf exponent of expert popularity (router logit bias)
    capacity_factor: float | None = None  # None = dropless
    seed: int = 0
    dispatch: str = "sort"  # moesim.kernels.dispatch strategy for permute / unpermute
    experts: str = "loop"  # moesim.kernels.experts strategy for the grouped GEMMs

    def router_spec(self) -> RouterSpec:
        return RouterSpec(
            kind="softmax_topk",
            top_k=self.top_k,
            normalize=True,
            capacity_factor=self.capacity_factor,
            drop_policy="probs",
        )

    def label(self) -> str:
        cf = "none" if self.capacity_factor is None else f"{self.capacity_factor:g}"
        return (
            f"E{self.num_experts} k{self.top_k} T{self.tokens} D{self.hidden} F{self.ffn} "
            f"skew{self.skew:g} cf{cf}"
        )


@dataclass(frozen=True)
class EPWeights:
    """The whole layer's parameters (every rank builds them from the seed)."""

    router_DE: torch.Tensor
    bias_E: torch.Tensor
    experts: ExpertWeights  # SwiGLU experts; a rank holds ``experts.block(rank, world)``

    def to(self, device: torch.device | str) -> EPWeights:
        return EPWeights(self.router_DE.to(device), self.bias_E.to(device), self.experts.to(device))


@dataclass
class RankResult:
    """What one rank reports: per-step phase seconds, its output and its routing."""

    rank: int
    phases_s: dict[str, list[float]]  # phase -> one value per timed step
    step_s: list[float]
    out_TD: torch.Tensor
    expert_ids_TK: torch.Tensor
    kept_TK: torch.Tensor
    recv_rows: int
    cpu_s: dict[str, list[float]] = field(default_factory=dict)  # thread CPU time per phase
    disturbed: int = 0  # steps re-run because other processes took the cores
    start_s: list[float] = field(default_factory=list)  # perf_counter at each step's start
    #: perf_counter when this rank reached each all-to-all phase (:data:`ARRIVALS`), per step
    arrive_s: dict[str, list[float]] = field(default_factory=dict)


def make_weights(case: EPCase) -> EPWeights:
    """Deterministic parameters for ``case`` (same on every rank and in the reference)."""
    g = torch.Generator().manual_seed(case.seed)
    E, D, F = case.num_experts, case.hidden, case.ffn
    router = torch.randn(D, E, generator=g) * (_LOGIT_STD / math.sqrt(D))
    bias = -case.skew * torch.log(torch.arange(1, E + 1, dtype=torch.float32))
    return EPWeights(
        router_DE=router,
        bias_E=bias,
        experts=ExpertWeights(
            w_gate_EDF=torch.randn(E, D, F, generator=g) / math.sqrt(D),
            w_up_EDF=torch.randn(E, D, F, generator=g) / math.sqrt(D),
            w_down_EFD=torch.randn(E, F, D, generator=g) / math.sqrt(F),
        ),
    )


def make_inputs(case: EPCase, rank: int) -> torch.Tensor:
    """Rank ``rank``'s tokens ``x_TD`` (standard normal, seeded by case and rank)."""
    g = torch.Generator().manual_seed(case.seed * 100_003 + rank + 1)
    return torch.randn(case.tokens, case.hidden, generator=g)


def gate(x_TD: torch.Tensor, w: EPWeights, spec: RouterSpec) -> Routing:
    """Router GEMM plus the popularity bias, then the kernels' router (capacity if set)."""
    return route(router_logits(x_TD, w.router_DE, spec, w.bias_E), spec)


def reference_layer(x_TD: torch.Tensor, w: EPWeights, case: EPCase) -> torch.Tensor:
    """Single-process MoE layer on one rank's tokens: ``sum_k kept*w_k*FFN_{e_k}(x)`` per token.

    Obviously right by construction: for each expert, the (token, slot) pairs that
    chose it and were kept go through that expert's SwiGLU and are added back.
    """
    r = gate(x_TD, w, case.router_spec())
    out = torch.zeros_like(x_TD)
    for e in range(case.num_experts):
        tok, slot = ((r.expert_ids_TK == e) & r.kept_TK).nonzero(as_tuple=True)
        x = x_TD[tok]
        ex = w.experts
        assert ex.w_gate_EDF is not None  # the EP layer's experts are SwiGLU
        h = torch.nn.functional.silu(x @ ex.w_gate_EDF[e]) * (x @ ex.w_up_EDF[e])
        out.index_add_(0, tok, (h @ ex.w_down_EFD[e]) * r.weights_TK[tok, slot, None])
    return out


# -- one step, phase by phase ------------------------------------------------------


class _Clock:
    """Phase timer: wall seconds since the last mark (CUDA synchronised first), and the
    thread's CPU seconds over the same span (less than wall when the OS runs others)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t, self.c = self._now(), time.thread_time()
        self.cpu: dict[str, float] = {}

    def now(self) -> float:
        """Wall seconds now, after the device's queued work (no CPU-time bookkeeping)."""
        return self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, phase: str) -> float:
        now, cpu = self._now(), time.thread_time()
        dt, self.t = now - self.t, now
        self.cpu[phase], self.c = cpu - self.c, cpu
        return dt


class CommBuffers:
    """Receive buffers kept across steps, as EP libraries keep registered buffers
    (DeepEP, NCCL user buffers): a step does not pay for fresh pages each time."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def rows(self, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
        """An ``[n, like.shape[1]]`` view of buffer ``name``, grown when too small."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != like.shape[1:]:
            buf = self._bufs[name] = like.new_empty((max(n, 1), *like.shape[1:]))
        return buf[:n]


def exchange_counts(tokens_per_expert_E: torch.Tensor, world: int) -> torch.Tensor:
    """All-to-all of per-expert counts: ``recv_REl``, rows to receive per (source, local expert)."""
    send = tokens_per_expert_E.to(torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return recv.view(world, -1)


def ep_step(
    x_TD: torch.Tensor,
    w: EPWeights,
    local: ExpertWeights,
    case: EPCase,
    world: int,
    spec: RouterSpec,
    bufs: CommBuffers,
) -> tuple[torch.Tensor, dict[str, float], dict[str, float], Routing, int]:
    """One forward step of the EP layer on this rank.

    Returns the output, wall and thread-CPU seconds per phase, the routing and M.
    """
    clock, t = _Clock(x_TD.device), {}
    routing = gate(x_TD, w, spec)
    t["gate"] = clock.lap("gate")
    x_ND, tpe_E, state = permute(x_TD, routing, case.dispatch, num_experts=case.num_experts)
    t["permute"] = clock.lap("permute")
    t0 = t["arrive_dispatch"] = time.perf_counter()
    recv_REl = exchange_counts(tpe_E, world)
    t["dispatch_counts"] = time.perf_counter() - t0
    send_R = tpe_E.view(world, -1).sum(1).tolist()
    recv_R = recv_REl.sum(1).tolist()
    x_MD = bufs.rows("dispatch", sum(recv_R), x_ND)
    dist.all_to_all_single(x_MD, x_ND.contiguous(), recv_R, send_R)
    t["dispatch"] = clock.lap("dispatch")
    t0 = clock.now()
    x_MD = sort_chunks(x_MD, recv_REl)
    t1 = clock.now()
    y_MD = experts_forward(
        x_MD,
        recv_REl.sum(0),
        local.w_gate_EDF,
        local.w_up_EDF,
        local.w_down_EFD,
        strategy=case.experts,
    )
    t2 = clock.now()
    y_MD = sort_chunks(y_MD, recv_REl, inverse=True)
    t["experts_regroup"] = (t1 - t0) + (clock.now() - t2)
    t["experts"] = clock.lap("experts")
    t["arrive_combine"] = clock.t  # the experts' lap ended now (device synchronised)
    y_ND = bufs.rows("combine", x_ND.shape[0], y_MD)
    dist.all_to_all_single(y_ND, y_MD, send_R, recv_R)
    t["combine"] = clock.lap("combine")
    out_TD = unpermute(y_ND, state, case.dispatch)
    t["unpermute"] = clock.lap("unpermute")
    return out_TD, t, clock.cpu, routing, sum(recv_R)


#: a step counts as undisturbed when every rank's compute got at least this share of
#: what it should (a whole core, or cores / ranks with more ranks than cores)
CLEAN_SHARE = 0.85
#: at most this many times ``steps`` steps are run looking for undisturbed ones
MAX_ATTEMPTS = 4


def run_rank(
    rank: int, world: int, case: EPCase, steps: int, warmup: int, fail_rank: int | None = None
) -> RankResult:
    """Body of one rank (process group already initialised): warm up, then time steps.

    On a CPU shared with other work, a step in which some rank's compute phases got
    less than :data:`CLEAN_SHARE` of their core (thread CPU time over wall time) is
    disturbed by other processes; such steps are re-run, up to ``MAX_ATTEMPTS *
    steps`` in all, and kept only if too few undisturbed ones turned up (the count
    of disturbed steps is reported). Every rank takes the same decision (an
    all-reduce of the smallest share), so the ranks stay in step.

    ``fail_rank`` makes that rank raise before its first step (fault injection for tests
    of the launcher's failure path).
    """
    torch.set_num_threads(1)
    if rank == fail_rank:
        raise RuntimeError(f"injected failure on rank {rank}")
    device = _device()
    cores = usable_cores()  # before pinning narrows this process to one core
    if device.type == "cpu":
        pin_rank(rank)
        keep_freed_memory()  # as the calibration bench: no fresh pages per step
    w = make_weights(case)
    w = w.to(device)
    local = w.experts.block(rank, world)
    x_TD = make_inputs(case, rank).to(device)
    spec = case.router_spec()  # built once: its validation is not part of the gate
    bufs = CommBuffers()
    expected = 1.0 if device.type == "cuda" else min(1.0, cores / world)
    clean: list[_Step] = []
    disturbed: list[_Step] = []
    for i in range(warmup + MAX_ATTEMPTS * steps):
        if len(clean) >= steps:
            break
        dist.barrier()
        t0 = time.perf_counter()
        out_TD, t, c, routing, m = ep_step(x_TD, w, local, case, world, spec, bufs)
        step = _Step(time.perf_counter() - t0, t, c, t0)
        if i < warmup:
            continue
        ok = device.type == "cuda" or _min_share(step.share, device) >= CLEAN_SHARE * expected
        (clean if ok else disturbed).append(step)
    kept = clean if len(clean) >= max(1, steps // 2) else (clean + disturbed)[:steps]
    ids, kept_TK = routing.expert_ids_TK.cpu(), routing.kept_TK.cpu()
    return RankResult(
        rank,
        {p: [s.wall[p] for s in kept] for p in PHASES + SUB_PHASES},
        [s.total for s in kept],
        out_TD.cpu(),
        ids,
        kept_TK,
        m,
        {p: [s.cpu[p] for s in kept] for p in PHASES},
        disturbed=len(disturbed),
        start_s=[s.start for s in kept],
        arrive_s={a: [s.wall[f"arrive_{a}"] for s in kept] for a in set(ARRIVALS.values())},
    )


@dataclass(frozen=True)
class _Step:
    total: float
    wall: dict[str, float]
    cpu: dict[str, float]
    start: float

    @property
    def share(self) -> float:
        """Thread CPU time over wall time of this rank's compute phases."""
        wall = sum(self.wall[p] for p in COMPUTE_PHASES)
        return sum(self.cpu[p] for p in COMPUTE_PHASES) / max(wall, 1e-12)


def _min_share(share: float, device: torch.device) -> float:
    t = torch.tensor([share], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank_entry(
    cases: list[EPCase], steps: int, warmup: int, fail_rank: int | None, repeats: int = 1
) -> list[RankResult]:
    """Every case ``repeats`` times, interleaved: all cases, then all cases again, ..."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return [
        run_rank(rank, world, c, steps, warmup, fail_rank) for _ in range(repeats) for c in cases
    ]


# -- the whole run -----------------------------------------------------------------


@dataclass(frozen=True)
class EPMeasurement:
    """A measured EP layer: seconds are medians over steps of the slowest rank."""

    case: EPCase
    world: int
    backend: str
    phases_s: dict[str, float]
    step_s: float
    step_samples_s: list[float]
    max_abs_error: float  # output vs :func:`reference_layer`, over all ranks
    expert_ids_RTK: torch.Tensor  # routing of every rank (before capacity drops)
    kept_RTK: torch.Tensor
    recv_rows_R: list[int]
    cpu_share: float = 1.0  # see :func:`cpu_share`
    disturbed_steps: int = 0  # steps re-run because other processes took the cores
    #: per repeat (see :func:`run_ep_cases`): end-to-end and per-phase medians
    repeat_step_s: list[float] = field(default_factory=list)
    repeat_phases_s: dict[str, list[float]] = field(default_factory=dict)

    @property
    def tokens_per_source_expert_RE(self) -> torch.Tensor:
        """Kept assignments from each source rank to each expert."""
        ids = self.expert_ids_RTK.masked_fill(~self.kept_RTK, self.case.num_experts)
        counts = [torch.bincount(i.flatten(), minlength=self.case.num_experts + 1) for i in ids]
        return torch.stack(counts)[:, : self.case.num_experts]


def run_ep_layer(case: EPCase, world: int, **kwargs: Any) -> EPMeasurement:
    """One case; see :func:`run_ep_cases` for the arguments."""
    return run_ep_cases([case], world, **kwargs)[0]


def run_ep_cases(
    cases: list[EPCase],
    world: int,
    *,
    steps: int = 10,
    warmup: int = 3,
    backend: str | None = None,
    timeout_s: float = 300.0,
    fail_rank: int | None = None,
    repeats: int = 1,
) -> list[EPMeasurement]:
    """Run the EP layer on ``world`` ranks (gloo on CPU, NCCL on GPU), all cases in one launch.

    With ``repeats`` > 1 the whole list of cases runs that many times, interleaved
    (a slow spell of the machine, or the launch's first-case warm-up, then falls
    on one repeat of every case instead of on all steps of one case); each
    case's figures are the medians over its repeats, which are kept in
    ``repeat_step_s`` / ``repeat_phases_s`` (their spread is the run-to-run noise).
    Every output is checked against the single-process reference. Raises
    :class:`moesim.measure.distributed.DistributedError` (one line) if a rank fails or
    the run outlives ``timeout_s``, and :class:`EPMismatch` if an output is wrong.
    """
    for case in cases:
        _check_case(case, world)
    if repeats < 1:
        raise UserError(f"--repeats = {repeats}: must be >= 1")
    per_rank: list[list[RankResult]] = launch(
        _rank_entry,
        world,
        args=(cases, steps, warmup, fail_rank, repeats),
        backend=backend,
        timeout_s=timeout_s,
    )
    used = backend or default_backend()
    n = len(cases)
    return [
        merge_repeats(
            [
                _summarise(case, world, used, [r[k * n + i] for r in per_rank])
                for k in range(repeats)
            ]
        )
        for i, case in enumerate(cases)
    ]


def merge_repeats(reps: list[EPMeasurement]) -> EPMeasurement:
    """One case measured several times: medians over repeats, each repeat's figures kept.

    Step samples and disturbed-step counts are pooled; the routing is the first
    repeat's (every repeat routes the same seeded tokens).
    """
    phases_PR = {p: [m.phases_s[p] for m in reps] for p in PHASES + SUB_PHASES}
    step_R = [m.step_s for m in reps]
    return replace(
        reps[0],
        phases_s={p: statistics.median(v) for p, v in phases_PR.items()},
        step_s=statistics.median(step_R),
        step_samples_s=[s for m in reps for s in m.step_samples_s],
        max_abs_error=max(m.max_abs_error for m in reps),
        cpu_share=statistics.median([m.cpu_share for m in reps]),
        disturbed_steps=sum(m.disturbed_steps for m in reps),
        repeat_step_s=step_R,
        repeat_phases_s=phases_PR,
    )


def _summarise(case: EPCase, world: int, backend: str, results: list[RankResult]) -> EPMeasurement:
    """End to end: each step's slowest rank, median over steps; phases: :func:`critical_phases`."""
    err = _check_outputs(case, results)
    per_step = torch.tensor([r.step_s for r in results]).amax(0)
    phases = critical_phases(results)
    return EPMeasurement(
        case=case,
        world=world,
        backend=backend,
        phases_s=phases,
        step_s=float(per_step.median()),
        step_samples_s=per_step.tolist(),
        max_abs_error=err,
        expert_ids_RTK=torch.stack([r.expert_ids_TK for r in results]),
        kept_RTK=torch.stack([r.kept_TK for r in results]),
        recv_rows_R=[r.recv_rows for r in results],
        cpu_share=cpu_share(results),
        disturbed_steps=results[0].disturbed,
    )


def _critical_SR(results: list[RankResult]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step, the rank with the most compute wall time; and the step indices."""
    t_PRS = torch.tensor([[r.phases_s[p] for r in results] for p in COMPUTE_PHASES])
    crit_S = t_PRS.sum(0).argmax(0)
    return crit_S, torch.arange(t_PRS.shape[2])


def cpu_share(results: list[RankResult]) -> float:
    """Median over steps of the critical rank's compute CPU time / compute wall time.

    About 1 on an otherwise idle core; well below 1 when other processes took the
    core (the phases then measure the machine's load as much as the kernels).
    """
    crit_S, steps = _critical_SR(results)
    wall = torch.tensor([[r.phases_s[p] for r in results] for p in COMPUTE_PHASES]).sum(0)
    cpu = torch.tensor([[r.cpu_s[p] for r in results] for p in COMPUTE_PHASES]).sum(0)
    return float((cpu[crit_S, steps] / wall[crit_S, steps]).median())


def critical_phases(results: list[RankResult]) -> dict[str, float]:
    """Median over steps of the phases (and sub-phases) of each step's critical rank.

    The critical rank of a step is the one with the most compute (gate + permute +
    experts + unpermute): the slowest GPU, whose all-to-alls wait least for others.
    Taking each phase's maximum over ranks instead would count the other ranks'
    waiting (inside their combine) as communication time. The all-to-all phases
    (:data:`ARRIVALS`) run from the last rank's arrival, as the simulator times a
    collective: what a rank waited for the others before that is not the collective's.
    """
    names = PHASES + SUB_PHASES
    t_PRS = torch.tensor([[r.phases_s[p] for r in results] for p in names], dtype=torch.float64)
    for i, p in enumerate(names):
        if p in ARRIVALS and all(ARRIVALS[p] in r.arrive_s for r in results):
            t_PRS[i] = (t_PRS[i] - _wait_RS(results, ARRIVALS[p])).clamp(min=0.0)
    crit_S, steps = _critical_SR(results)
    return {p: float(t_PRS[i, crit_S, steps].median()) for i, p in enumerate(names)}


def _wait_RS(results: list[RankResult], arrival: str) -> torch.Tensor:
    """Per rank and step, how long the rank waited for the last rank to reach ``arrival``.

    Local ranks read one clock (``perf_counter``: ``CLOCK_MONOTONIC``), so their
    arrival times compare directly.
    """
    at_RS = torch.tensor([r.arrive_s[arrival] for r in results], dtype=torch.float64)
    return at_RS.amax(0, keepdim=True) - at_RS


class EPMismatch(RuntimeError):
    """The EP layer's output differs from the single-process reference (a bug, exit 1)."""


def _check_outputs(case: EPCase, results: list[RankResult], tol: float = 1e-4) -> float:
    w = make_weights(case)
    worst = 0.0
    for r in results:
        ref = reference_layer(make_inputs(case, r.rank), w, case)
        diff = float((r.out_TD - ref).abs().max()) if ref.numel() else 0.0
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        if not diff <= tol * scale:
            raise EPMismatch(
                f"EP layer output of rank {r.rank} differs from the reference by {diff:.3g} "
                f"({case.label()})"
            )
        worst = max(worst, diff)
    return worst


def _check_case(case: EPCase, world: int) -> None:
    if world < 1 or case.num_experts % world:
        raise UserError(
            f"--ep-world = {world}: must be >= 1 and divide num_experts ({case.num_experts})"
        )
    if case.top_k > case.num_experts:
        raise UserError(f"top_k = {case.top_k}: must be <= num_experts ({case.num_experts})")
