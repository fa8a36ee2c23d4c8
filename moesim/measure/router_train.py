"""Train a small MoE language model on CPU and record its expert loads step by step.

Legend: B = sequences, S = sequence length, T = B*S tokens, D = model dim,
F = expert hidden dim, E = experts, K = top-k, V = vocabulary, L = MoE layers.

The model is moesim's own kernels (:func:`moesim.kernels.experts.moe_forward`:
router, sort dispatch, grouped expert GEMMs) in ``L`` residual blocks, each
``x += Linear(LN(shift(x)))`` (causal previous-token mixing) then
``x += MoE(LN(x))``, under a tied-free linear head. The task is next-token
prediction on a synthetic language: a Zipf-distributed vocabulary and a sparse
random Markov chain (each token has 8 likely successors), so tokens are unequal
in frequency and routing has something to specialise on.

The optimiser is Adam at ``lr``, constant or (``lr_schedule="cosine"``) a linear
warm-up over ``warmup`` steps then a half cosine down to ``min_lr·lr`` at the
last step (:func:`lr_factor`), as large-model training runs are scheduled.

Balancing schemes (:data:`SCHEMES`): ``none``; ``aux_loss`` (the Switch / Mixtral
loss, coefficient ``aux_coef``); ``z_loss`` (ST-MoE, ``z_coef``); ``bias``
(DeepSeek-V3's auxiliary-loss-free rule on a sigmoid router: after every step
``b_i <- b_i + gamma·sign(mean load - load_i)``); ``expert_choice`` (each expert
takes its ``ceil(T·K/E)`` best tokens). Token-choice runs are dropless; the
trace keeps every step's assignments per (layer, expert), so drops at any
capacity factor follow from it (:func:`moesim.simulate.dynamics.drop_fraction`).

:func:`train_runs` returns one tidy table: a row per (run, step, layer) with the
loads ``[E]``, the tokens and the loss; :func:`write_trace` writes it to parquet
with the runs' settings and provenance under the schema key ``moesim``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moesim.config.router import RouterSpec
from moesim.errors import UserError
from moesim.kernels.experts import ExpertWeights, moe_forward

SCHEMES = ("none", "aux_loss", "z_loss", "bias", "expert_choice")
LR_SCHEDULES = ("constant", "cosine")
META_KEY = b"moesim"


@dataclass(frozen=True)
class TrainConfig:
    """One run: model size, task, optimiser and balancing scheme (all recorded)."""

    scheme: str = "none"
    seed: int = 0
    steps: int = 300
    layers: int = 2
    experts: int = 16
    top_k: int = 2
    d_model: int = 64
    d_ff: int = 128
    vocab: int = 256
    batch: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    lr_schedule: str = "constant"
    warmup: int = 0
    min_lr: float = 0.1
    aux_coef: float = 0.01
    z_coef: float = 1e-3
    gamma: float = 1e-2
    zipf: float = 1.1
    threads: int = 1

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise UserError(f"--schemes {self.scheme!r}: unknown; allowed: {', '.join(SCHEMES)}")
        if not 1 <= self.top_k <= self.experts:
            raise UserError(f"--top-k {self.top_k}: must be in 1..--experts ({self.experts})")
        if self.steps < 1 or self.layers < 1 or self.experts < 2:
            raise UserError("--steps and --layers must be >= 1 and --experts >= 2")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(
                f"--lr-schedule {self.lr_schedule!r}: unknown; allowed: {', '.join(LR_SCHEDULES)}"
            )
        if not 0 <= self.warmup < self.steps or not 0.0 <= self.min_lr <= 1.0:
            raise UserError("--warmup must be in 0..--steps-1 and --min-lr in 0..1")

    @property
    def run_id(self) -> str:
        return f"{self.scheme}-s{self.seed}"

    def spec(self) -> RouterSpec:
        """The router spec of this scheme (losses weighted by the coefficients)."""
        if self.scheme == "bias":
            return RouterSpec(kind="sigmoid_topk", normalize=True, top_k=self.top_k)
        if self.scheme == "expert_choice":
            return RouterSpec(kind="expert_choice", capacity_factor=1.0, top_k=self.top_k)
        return RouterSpec(
            kind="softmax_topk",
            normalize=True,
            top_k=self.top_k,
            aux_loss_coef=self.aux_coef if self.scheme == "aux_loss" else 0.0,
            z_loss_coef=self.z_coef if self.scheme == "z_loss" else 0.0,
        )


# -- the synthetic language ---------------------------------------------------------
class MarkovText:
    """Zipf unigram start tokens and a sparse random successor table, sampled on the fly."""

    def __init__(self, cfg: TrainConfig) -> None:
        g = torch.Generator().manual_seed(10_000 + cfg.seed)
        V = cfg.vocab
        ranks = torch.arange(1, V + 1, dtype=torch.float64)
        self.unigram_V = (ranks**-cfg.zipf / (ranks**-cfg.zipf).sum()).float()
        succ_V8 = torch.multinomial(self.unigram_V.expand(V, V), 8, generator=g)
        w_8 = torch.tensor([0.4, 0.2, 0.12, 0.08, 0.08, 0.05, 0.04, 0.03])
        self.trans_VV = torch.zeros(V, V).scatter_add_(1, succ_V8, w_8.expand(V, 8))
        self.cfg, self.g = cfg, g

    def batch(self) -> Tensor:
        """int64 ``[B, S + 1]`` token ids."""
        B, S = self.cfg.batch, self.cfg.seq_len
        out = torch.empty(B, S + 1, dtype=torch.int64)
        out[:, 0] = torch.multinomial(self.unigram_V, B, replacement=True, generator=self.g)
        for s in range(S):
            out[:, s + 1] = torch.multinomial(self.trans_VV[out[:, s]], 1, generator=self.g)[:, 0]
        return out


# -- the model ----------------------------------------------------------------------
class MoEBlock(nn.Module):
    """Previous-token mixing, then one MoE layer on moesim's kernels."""

    bias_E: Tensor

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        D, Fd, E = cfg.d_model, cfg.d_ff, cfg.experts
        self.mix_norm, self.moe_norm = nn.LayerNorm(D), nn.LayerNorm(D)
        self.mix = nn.Linear(D, D)
        self.router_DE = nn.Parameter(torch.randn(D, E) * D**-0.5)
        self.w_gate_EDF = nn.Parameter(torch.randn(E, D, Fd) * D**-0.5)
        self.w_up_EDF = nn.Parameter(torch.randn(E, D, Fd) * D**-0.5)
        self.w_down_EFD = nn.Parameter(torch.randn(E, Fd, D) * Fd**-0.5)
        self.register_buffer("bias_E", torch.zeros(E))  # aux-loss-free selection bias

    def forward(self, x_BSD: Tensor, spec: RouterSpec) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, kept assignments per expert [E], router loss)``."""
        B, S, D = x_BSD.shape
        prev = F.pad(self.mix_norm(x_BSD), (0, 0, 1, 0))[:, :-1]
        x_BSD = x_BSD + self.mix(prev)
        experts = ExpertWeights(self.w_gate_EDF, self.w_up_EDF, self.w_down_EFD)
        bias = self.bias_E if spec.kind == "sigmoid_topk" else None
        out = moe_forward(
            self.moe_norm(x_BSD).reshape(B * S, D), self.router_DE, experts, spec, bias_E=bias
        )
        load_E = out.routing.tokens_per_expert()
        return x_BSD + out.y_TD.reshape(B, S, D), load_E, out.routing.loss(spec)


class TinyMoE(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(MoEBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, ids_BS: Tensor, spec: RouterSpec) -> tuple[Tensor, list[Tensor], Tensor]:
        x = self.embed(ids_BS)
        loads, extra = [], torch.zeros(())
        for block in self.blocks:
            x, load_E, loss = block(x, spec)
            loads.append(load_E)
            extra = extra + loss
        return self.head(self.norm(x)), loads, extra


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning rate of ``step`` relative to ``cfg.lr``.

    ``constant``: 1 (after the warm-up). ``cosine``: linear warm-up over
    ``warmup`` steps (``(step + 1) / warmup``), then a half cosine from 1 down to
    ``min_lr`` at the last step.
    """
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(cfg.steps - 1 - cfg.warmup, 1)
    frac = min((step - cfg.warmup) / span, 1.0)
    return cfg.min_lr + (1.0 - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def bias_update(bias_E: Tensor, load_E: Tensor, gamma: float) -> Tensor:
    """DeepSeek-V3's rule: ``b_i + gamma·sign(mean load - load_i)`` (new tensor)."""
    load = load_E.to(torch.float64)
    return bias_E + gamma * torch.sign(load.mean() - load).to(bias_E.dtype)


# -- training -----------------------------------------------------------------------
def train_run(cfg: TrainConfig, advance: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Train one run; a row per (step, layer): loads ``[E]``, tokens, loss, bias spread."""
    cfg.check()
    torch.manual_seed(cfg.seed)
    data = MarkovText(cfg)
    model = TinyMoE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    spec = cfg.spec()
    rows: list[dict[str, Any]] = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step)
        ids = data.batch()
        logits, loads, extra = model(ids[:, :-1], spec)
        ce = F.cross_entropy(logits.reshape(-1, cfg.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (ce + extra).backward()
        opt.step()
        blocks = [cast(MoEBlock, b) for b in model.blocks]
        for layer, (block, load_E) in enumerate(zip(blocks, loads, strict=True)):
            rows.append(_row(cfg, step, layer, load_E, float(ce.detach()), block.bias_E))
            if cfg.scheme == "bias":
                block.bias_E.copy_(bias_update(block.bias_E, load_E, cfg.gamma))
        if advance is not None:
            advance()
    return rows


def _row(
    cfg: TrainConfig, step: int, layer: int, load_E: Tensor, loss: float, bias_E: Tensor
) -> dict[str, Any]:
    return {
        "run": cfg.run_id,
        "scheme": cfg.scheme,
        "seed": cfg.seed,
        "step": step,
        "layer": layer,
        "tokens": cfg.batch * cfg.seq_len,
        "top_k": cfg.top_k,
        "load": [int(v) for v in load_E.tolist()],
        "loss": loss,
        "bias_range": float(bias_E.max() - bias_E.min()),
        "lr": cfg.lr * lr_factor(cfg, step),
    }


def train_runs(
    base: TrainConfig,
    schemes: Sequence[str],
    seeds: Sequence[int],
    advance: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (scheme, seed) run: ``(rows, runs)`` with each run's settings and wall time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(base.threads)
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    try:
        for scheme in schemes:
            for seed in seeds:
                cfg = replace(base, scheme=scheme, seed=seed)
                start = time.perf_counter()
                with torch.enable_grad():
                    rows += train_run(cfg, advance)
                runs.append(_run_meta(cfg, time.perf_counter() - start, rows))
    finally:
        torch.set_num_threads(threads)
    return rows, runs


def _run_meta(cfg: TrainConfig, wall_s: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    spec = cfg.spec()
    mine = [r for r in rows if r["run"] == cfg.run_id]
    last = [r["loss"] for r in mine[-cfg.layers * 10 :]]
    return {
        "run": cfg.run_id,
        "config": asdict(cfg),
        "router": spec.model_dump(mode="json"),
        "task": "synthetic Zipf-Markov next-token prediction (moesim.measure.router_train)",
        "final_loss": sum(last) / max(len(last), 1),
        "uniform_loss": math.log(cfg.vocab),
        "wall_s": wall_s,
    }


def write_trace(
    path: str | Path,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    prov: dict[str, Any] | None = None,
) -> Path:
    """Parquet of ``rows`` with ``{"runs": runs, "provenance": ...}`` under schema key moesim.

    ``prov``: the provenance taken when training started (default: now).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moesim.io import atomic_write, provenance

    table = pa.Table.from_pylist(rows)
    meta = {"kind": "router-dynamics", "runs": runs, "provenance": prov or provenance()}
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, default=str).encode()})
    return atomic_write(path, lambda p: pq.write_table(table, p, compression="zstd"))
