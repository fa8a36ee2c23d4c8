"""Peak memory of the real MoE layer (moesim kernels, forward and backward) on this CPU.

Legend: T = tokens, D = model dim, F = expert FFN dim, E = experts, K = top-k.

:func:`measure_layer_peak` builds the layer's leaves (input ``x_TD``, router and
SwiGLU expert weights, all ``requires_grad``), runs
:func:`~moesim.kernels.experts.moe_forward` (sort dispatch, the chosen expert
strategy) and ``y.sum().backward()`` under ``torch.profiler`` with
``profile_memory=True``, and replays the allocator's ``[memory]`` events (each
allocation and free, in bytes, as the CPU allocator reports them) in time
order: the running sum's maximum is the peak. Everything the layer allocates is
inside the profiled region, so nothing is assumed about what existed before.
On a CUDA device the caching allocator's statistics give the peak instead
(``max_memory_allocated`` above what was allocated before the layer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from moesim.kernels.experts import ExpertWeights, moe_forward
from moesim.kernels.gating import RouterSpec, Routing


@dataclass(frozen=True)
class MemCase:
    """One layer shape; ``skew`` scales a router bias towards low expert ids (hot experts)."""

    tokens: int
    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    capacity_factor: float | None = None
    skew: float = 0.0
    strategy: str = "loop"
    seed: int = 0

    def label(self) -> str:
        cf = "dropless" if self.capacity_factor is None else f"cf {self.capacity_factor:g}"
        return (
            f"T={self.tokens} D={self.hidden} F={self.ffn} E={self.num_experts} "
            f"k={self.top_k} {cf}" + (f" skew {self.skew:g}" if self.skew else "")
        )


@dataclass(frozen=True)
class MemMeasurement:
    """The measured peak and what the layer routed (to predict the same step)."""

    case: MemCase
    peak_bytes: float
    expert_ids_TK: Any  # numpy int64 [T, K]
    kept_rows: int
    events: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": asdict(self.case),
            "peak_bytes": self.peak_bytes,
            "kept_rows": self.kept_rows,
            "events": self.events,
        }


def _leaves(
    case: MemCase, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, ExpertWeights, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    T, D, F, E = case.tokens, case.hidden, case.ffn, case.num_experts

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    x_TD, w_DE = leaf(T, D), leaf(D, E, scale=D**-0.5)
    ws = [leaf(E, a, b, scale=a**-0.5) for a, b in ((D, F), (D, F), (F, D))]
    bias_E = (-case.skew * torch.log1p(torch.arange(E, dtype=torch.float32))).to(device)
    return x_TD, w_DE, ExpertWeights(ws[0], ws[1], ws[2]), bias_E


def _layer(case: MemCase, device: torch.device) -> Routing:
    """Build the leaves, run forward and backward; the routing it used."""
    spec = RouterSpec(kind="softmax_topk", top_k=case.top_k, normalize=True,
                      capacity_factor=case.capacity_factor)  # fmt: skip
    x_TD, w_DE, experts, bias_E = _leaves(case, device)
    out = moe_forward(x_TD, w_DE, experts, spec, router_bias_E=bias_E,
                      expert_strategy=case.strategy)  # fmt: skip
    out.y_TD.sum().backward()
    return out.routing


def measure_layer_peak(case: MemCase, device: str = "cpu") -> MemMeasurement:
    """Peak bytes of one forward + backward of the MoE layer ``case`` (module docstring)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        r = _layer(case, dev)
        torch.cuda.synchronize(dev)
        peak, events = torch.cuda.max_memory_allocated(dev) - before, 0
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            r = _layer(case, dev)
        peak, events = replay_peak(prof)
    return MemMeasurement(
        case=case,
        peak_bytes=float(peak),
        expert_ids_TK=r.expert_ids_TK.cpu().numpy().copy(),
        kept_rows=int(r.kept_TK.sum()),
        events=events,
    )


def replay_peak(prof: profile) -> tuple[int, int]:
    """``(peak, number of events)`` of the running sum of the profiler's memory events."""
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:  # pragma: no cover - profiler without results
        raise RuntimeError("the profiler recorded no results")
    events = sorted(
        (e.start_ns(), e.nbytes())  # type: ignore[attr-defined]  # not in torch's stubs
        for e in results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, len(events)
