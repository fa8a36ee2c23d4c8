"""Pipeline schedules: which task every pipeline rank runs, in which order.

A *task* is one pass of one micro-batch through one *virtual stage* (a
contiguous run of model layers): ``F`` forward, ``B`` backward (input and weight
gradients), ``Bi`` input gradients only and ``W`` weight gradients only (the
zero-bubble split). A schedule gives every rank an ordered list of *slots*; a
slot is one or two *lanes* run at once (DualPipe's forward-and-backward pairs),
a lane a list of tasks run one after another. The engine waits for a task's
inputs (the previous virtual stage's forward, the next one's backward), so a
schedule only states order; the dependencies come from :class:`Pipeline`.

Registered schedules (``parallel.pp_schedule``; p = ``pp``, v = ``vpp``, m =
micro-batches):

- ``1f1b``: warm-up ``p - r - 1`` forwards, then one forward and one backward
  in turn (Megatron-Core ``forward_backward_pipelining_without_interleaving``).
  Bubble ``(p - 1)(F + B)``.
- ``interleaved``: ``v`` chunks per rank, virtual stage ``c·p + r``, Megatron-Core's
  interleaved order; needs ``m % p == 0``. Bubble ``(p - 1)(F + B) / v``.
- ``zb_h1``: 1F1B with the backward split into ``Bi`` and ``W``; rank r keeps
  ``r`` weight passes back to fill the cool-down (Qi et al., ICLR 2024,
  ZB-H1). Bubble ``(p - 1)(F + B - 2W)``.
- ``dualpipev``: ``2p`` virtual stages in a V (rank r holds stages ``r`` and
  ``2p - 1 - r``), DeepSeek's DualPipeV step order (warm-up, ``F0 B1 | F1 B0``
  pairs that overlap one micro-batch's all-to-all with another's compute,
  zero-bubble cool-down); needs ``m >= 2p``.
- ``dualpipe``: bidirectional DualPipe (DeepSeek-V3 report sec. 3.2.1): half the
  micro-batches enter at rank 0, half at rank ``p - 1``; each rank holds two
  stages; needs even ``p``, even ``m`` and ``m >= 2p``. Bubble
  ``(p/2 - 1)(F&B + B - 3W)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from moesim.config.scenario import Scenario
from moesim.errors import ConfigError, lookup

#: one task: (kind, virtual stage, micro-batch); kind is F, B, Bi or W
Task = tuple[str, int, int]
Lane = tuple[Task, ...]
Slot = tuple[Lane, ...]


@dataclass
class Pipeline:
    """A schedule's virtual stages, their owners and every rank's slots."""

    name: str
    ranks: int  # p
    stages: int  # V virtual stages a micro-batch passes through
    micro_batches: int
    slots: list[list[Slot]] = field(default_factory=list)  # [rank] -> slots
    reverse_half: bool = False  # dualpipe: the second half of micro-batches runs p-1 -> 0
    v_shape: bool = False  # dualpipev: stage s >= p lives on rank 2p - 1 - s
    #: a send moves once its receiver has posted the receive, which it posts when it
    #: needs the input (Megatron's blocking 1F1B p2p; gloo and NCCL point-to-point
    #: are rendezvous); False: receives are posted ahead (interleaved with
    #: ``overlap_p2p_comm``, DualPipe), so a send moves as it is issued
    rendezvous: bool = False

    def owner(self, stage: int, mb: int) -> int:
        """The rank that runs ``stage`` of micro-batch ``mb``."""
        p = self.ranks
        if self.v_shape:
            return stage if stage < p else 2 * p - 1 - stage
        if self.reverse_half and mb >= self.micro_batches // 2:
            return p - 1 - stage
        return stage % p

    def chunks(self, rank: int) -> list[tuple[int, int]]:
        """(virtual stage, first micro-batch it applies to) of each model chunk on ``rank``."""
        p, m = self.ranks, self.micro_batches
        if self.v_shape:
            return [(rank, 0), (2 * p - 1 - rank, 0)]
        if self.reverse_half:
            return [(rank, 0), (p - 1 - rank, m // 2)]
        return [(c * p + rank, 0) for c in range(self.stages // p)]

    def chunk_of(self, stage: int, mb: int) -> int:
        """Index into :meth:`chunks` of the owner's chunk that runs (``stage``, ``mb``)."""
        if self.reverse_half:
            return int(mb >= self.micro_batches // 2)
        if self.v_shape:
            return int(stage >= self.ranks)
        return stage // self.ranks


def _one(*tasks: Task) -> Slot:
    return (tuple(tasks),)


def one_f_one_b(p: int, v: int, m: int, training: bool) -> Pipeline:
    pipe = Pipeline("1f1b", p, p, m, rendezvous=True)
    for r in range(p):
        if not training:
            pipe.slots.append([_one(("F", r, i)) for i in range(m)])
            continue
        warm = min(p - r - 1, m)
        order = [("F", r, i) for i in range(warm)]
        for i in range(m - warm):
            order += [("F", r, warm + i), ("B", r, i)]
        order += [("B", r, i) for i in range(m - warm, m)]
        pipe.slots.append([_one(t) for t in order])
    return pipe


def overlapped_pairs(m: int, training: bool) -> Pipeline:
    """One rank, two micro-batches at a time (``workload.overlap_micro_batches``).

    Each lane runs one micro-batch's forward (and backward): one micro-batch's
    all-to-all hides under the other's compute.
    """
    pipe = Pipeline("1f1b", 1, 1, m)
    slots: list[Slot] = []
    for first in range(0, m, 2):
        lanes: list[Lane] = [(("F", 0, i), ("B", 0, i)) if training else (("F", 0, i),)
                             for i in range(first, min(first + 2, m))]  # fmt: skip
        slots.append(tuple(lanes))
    pipe.slots.append(slots)
    return pipe


def interleaved(p: int, v: int, m: int, training: bool) -> Pipeline:
    """Megatron-Core's interleaved 1F1B: virtual micro-batch k runs chunk ``(k // p) % v``."""
    if m % p:
        raise ConfigError(
            f"interleaved 1F1B needs micro-batches divisible by parallel.pp ({p}); "
            f"use {m + (-m) % p} or 1f1b",
            field="workload.micro_batches",
            value=m,
        )
    pipe = Pipeline("interleaved", p, p * v, m)
    total = m * v

    def fwd(k: int, r: int) -> Task:
        return ("F", ((k // p) % v) * p + r, (k // (p * v)) * p + k % p)

    def bwd(k: int, r: int) -> Task:
        return ("B", (v - 1 - (k // p) % v) * p + r, (k // (p * v)) * p + k % p)

    for r in range(p):
        if not training:
            pipe.slots.append([_one(fwd(k, r)) for k in range(total)])
            continue
        warm = min((p - r - 1) * 2 + (v - 1) * p, total)
        order = [fwd(k, r) for k in range(warm)]
        for i in range(total - warm):
            order += [fwd(warm + i, r), bwd(i, r)]
        order += [bwd(k, r) for k in range(total - warm, total)]
        pipe.slots.append([_one(t) for t in order])
    return pipe


def zb_h1(p: int, v: int, m: int, training: bool) -> Pipeline:
    """ZB-H1: 1F1B order with the backward split; rank r holds ``r`` weight passes back.

    The held passes run in the cool-down, where rank ``r`` would otherwise wait for
    the gradients of the ranks after it; the last rank defers the most, so that it
    runs the next forward first and the ranks before it receive gradients sooner.
    """
    if not training:
        return one_f_one_b(p, v, m, training)
    pipe = Pipeline("zb_h1", p, p, m, rendezvous=True)
    for r in range(p):
        pipe.slots.append([_one(t) for t in _zb_h1_rank(p, r, m)])
    return pipe


def _zb_h1_rank(p: int, r: int, m: int) -> list[Task]:
    warm = min(p - r - 1, m)
    order: list[Task] = [("F", r, i) for i in range(warm)]
    pending: list[int] = []
    for i in range(m):
        if i < m - warm:
            order.append(("F", r, warm + i))
        order.append(("Bi", r, i))
        pending.append(i)
        while len(pending) > r:
            order.append(("W", r, pending.pop(0)))
    return order + [("W", r, i) for i in pending]


class _DualPipeRank:
    """DeepSeek's DualPipe / DualPipeV step order for one rank (their ``step`` loop).

    ``half_ranks``, ``half_rank`` and ``chunks`` are DualPipe's ``num_half_ranks``,
    ``half_rank`` and ``half_num_chunks`` (DualPipeV: ``num_ranks``, ``rank``,
    ``num_chunks``); ``stage_of[c]`` is the virtual stage of the rank's chunk ``c``
    and ``first_mb[c]`` the first micro-batch that chunk runs.
    """

    def __init__(self, R: int, r: int, C: int, stage_of: list[int], first_mb: list[int]):
        self.R, self.r, self.C = R, r, C
        self.stage_of, self.first_mb = stage_of, first_mb
        self.nf, self.nb = [0, 0], [0, 0]
        self.w_queue: list[Task] = []
        self.slots: list[Slot] = []

    def f(self, c: int) -> Task:
        t = ("F", self.stage_of[c], self.first_mb[c] + self.nf[c])
        self.nf[c] += 1
        return t

    def b(self, c: int, zb: bool = False) -> Task:
        mb = self.first_mb[c] + self.nb[c]
        self.nb[c] += 1
        if zb:
            self.w_queue.append(("W", self.stage_of[c], mb))
            return ("Bi", self.stage_of[c], mb)
        return ("B", self.stage_of[c], mb)

    def fb(self, cf: int, cb: int) -> None:
        self.slots.append(((self.f(cf),), (self.b(cb),)))

    def add(self, t: Task) -> None:
        self.slots.append(_one(t))

    def w(self) -> None:
        self.add(self.w_queue.pop(0))

    def run(self, special: bool) -> list[Slot]:
        R, r, C = self.R, self.r, self.C
        for _ in range((R - r - 1) * 2):
            self.add(self.f(0))
        for _ in range(r + 1):
            self.add(self.f(0))
            self.add(self.f(1))
        for _ in range(R - r - 1):
            self.add(self.b(1, zb=True))
            self.w()
            self.add(self.f(1))
        for i in range(C - 2 * R + r + 1):
            if i == 0 and special:  # DeepSeek: not overlapped, to shrink the bubble
                self.add(self.f(0))
                self.add(self.b(1))
            else:
                self.fb(0, 1)
            self.fb(1, 0)
        for _ in range(R - r - 1):
            self.add(self.b(1))
            self.fb(1, 0)
        zb = False
        for i in range(r + 1):
            if i == (r + 1) // 2 and r % 2 == 1:
                zb = True
            self.add(self.b(1, zb=zb))
            if i == (r + 1) // 2 and r % 2 == 0:
                zb = True
            self.add(self.b(0, zb=zb))
        for _ in range(R - r - 1):
            self.w()
            self.add(self.b(0, zb=True))
        while self.w_queue:
            self.w()
        return self.slots


def dualpipev(p: int, v: int, m: int, training: bool) -> Pipeline:
    _need_training("dualpipev", training)
    if m < 2 * p:
        raise ConfigError(
            f"DualPipeV needs at least 2 x parallel.pp = {2 * p} micro-batches; "
            f"use >= {2 * p} or 1f1b",
            field="workload.micro_batches",
            value=m,
        )
    pipe = Pipeline("dualpipev", p, 2 * p, m, v_shape=True)
    for r in range(p):
        rank = _DualPipeRank(p, r, m, [r, 2 * p - 1 - r], [0, 0])
        pipe.slots.append(rank.run(special=r == p - 1))
    return pipe


def dualpipe(p: int, v: int, m: int, training: bool) -> Pipeline:
    _need_training("dualpipe", training)
    if p % 2 or p < 2:
        raise ConfigError(
            "DualPipe needs an even number of pipeline ranks (it pairs rank r with p-1-r); "
            f"use pp={p + 1 if p > 1 else 2} or dualpipev",
            field="parallel.pp",
            value=p,
        )
    if m % 2 or m < 2 * p:
        raise ConfigError(
            f"DualPipe needs an even number of micro-batches, at least 2 x parallel.pp = "
            f"{2 * p}; use {max(2 * p, m + m % 2)}",
            field="workload.micro_batches",
            value=m,
        )
    pipe = Pipeline("dualpipe", p, p, m, reverse_half=True)
    H = p // 2
    for r in range(p):
        second = r >= H
        h = min(r, p - 1 - r)
        # chunk 0 is the direction entering at this rank's end of the pipeline
        dirs = [1, 0] if second else [0, 1]
        stage_of = [r if d == 0 else p - 1 - r for d in dirs]
        first = [0 if d == 0 else m // 2 for d in dirs]
        rank = _DualPipeRank(H, h, m // 2, stage_of, first)
        pipe.slots.append(rank.run(special=h == H - 1))
    return pipe


def _need_training(name: str, training: bool) -> None:
    if not training:
        raise ConfigError(
            f"{name} schedules forward and backward passes; use 1f1b for inference",
            field="parallel.pp_schedule",
            value=name,
        )


# -- layout ---------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Layers of every virtual stage: ``stage_layers[s]`` = kinds in model order."""

    stage_layers: list[list[str]]


def split_layers(
    kinds: list[str], stages: int, first: int | None, last: int | None, how: str = ""
) -> Layout:
    """Contiguous layers per virtual stage: ``first``/``last`` fixed, the rest even.

    Raises :class:`~moesim.errors.ConfigError` when the rest does not split evenly;
    ``how`` says where the stage count came from (for the message).
    """
    n = len(kinds)
    if stages == 1:
        return Layout([kinds])
    fixed = [x for x in (first, last) if x is not None]
    rest_stages = stages - len(fixed)
    rest = n - sum(fixed)
    if rest < 0 or (rest_stages == 0 and rest) or (rest_stages and rest % rest_stages):
        raise ConfigError(
            f"{n} layers (dense + MoE) do not split over {stages} virtual stages{how} "
            f"with pp_first_stage_layers={first}, pp_last_stage_layers={last}; "
            + _split_hint(n, stages),
            field="parallel.pp",
            value=stages if not how else how.strip(" ()"),
        )
    each = rest // rest_stages if rest_stages else 0
    sizes = [each] * stages
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    out, at = [], 0
    for size in sizes:
        out.append(kinds[at : at + size])
        at += size
    return Layout(out)


def _split_hint(n: int, stages: int) -> str:
    each = -(-n // stages)
    left = n - (stages - 1) * each
    if n % stages == 0:
        return "unset pp_first_stage_layers / pp_last_stage_layers"
    if left > 0:
        return f"e.g. set parallel.pp_last_stage_layers={left} ({stages - 1} stages of {each})"
    return "choose pp (x vpp) dividing the layer count, or set pp_first/last_stage_layers"


def layout_for(scn: Scenario) -> tuple[Pipeline, Layout]:
    """The scenario's pipeline schedule and the layers of each virtual stage."""
    par, m = scn.parallel, scn.model
    training = scn.workload.mode == "training"
    mbs = scn.workload.micro_batches
    if scn.workload.overlap_micro_batches and par.pp == 1 and par.pp_schedule == "1f1b":
        pipe = overlapped_pairs(mbs, training)
    else:
        pipe = build_pipeline(par.pp_schedule, par.pp, par.vpp, mbs, training)
    dense = m.dense.num_dense_layers if m.dense is not None else 0
    # leading dense layers, then each MoE layer after its interleaved dense ones
    # (moe_layer_freq), then the MTP modules' MoE layers on the last stage
    block = ["dense"] * (m.moe_layer_freq - 1) + ["moe"]
    kinds = ["dense"] * dense + block * m.num_moe_layers + ["moe"] * m.mtp_num_layers
    how = f" (pp={par.pp} x vpp={par.vpp})" if par.vpp > 1 else ""
    if pipe.v_shape:
        how = f" (2 x pp={par.pp}, DualPipeV)"
    first, last = par.pp_first_stage_layers, par.pp_last_stage_layers
    return pipe, split_layers(kinds, pipe.stages, first, last, how)


def moe_layers_per_rank(pipe: Pipeline, layout: Layout) -> int:
    """The most MoE layers one rank holds (over all its chunks)."""
    return max(
        sum(layout.stage_layers[s].count("moe") for s, _ in pipe.chunks(r))
        for r in range(pipe.ranks)
    )


SCHEDULES: dict[str, Callable[[int, int, int, bool], Pipeline]] = {
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
    "zb_h1": zb_h1,
    "dualpipev": dualpipev,
    "dualpipe": dualpipe,
}


def build_pipeline(name: str, p: int, v: int, m: int, training: bool) -> Pipeline:
    """The schedule ``name`` for ``p`` ranks, ``v`` chunks each, ``m`` micro-batches."""
    make = lookup(SCHEDULES, name, field="parallel.pp_schedule", what="pipeline schedule")
    if v > 1 and name != "interleaved":
        raise ConfigError(
            f"only the interleaved schedule uses virtual stages; set parallel.vpp=1 for {name}",
            field="parallel.vpp",
            value=v,
        )
    return make(p, v, m, training)
