"""CostModel: seconds for each op on one device, from a hardware profile.

A spec profile is priced as a roofline: ``launch + max(flops / (peak * eff),
bytes / (hbm * eff))``. A calibrated profile (``calibration:`` section) uses
its fitted curves instead, family by family; families it lacks fall back to
the roofline. Nothing here fits or measures: the hot path only evaluates.
Every method is vectorised over leading array axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import GemmFit, HardwareProfile, MemoryOpFit
from moesim.costs import work
from moesim.costs.curves import eval_curve

Tier = Literal["scaleup", "scaleout"]
MEMORY_OPS = ("gating", "permute", "unpermute", "copy")
F64 = NDArray[np.float64]


@dataclass(frozen=True)
class LinkCost:
    latency_s: float
    bandwidth_Bps: float  # achievable, per GPU per direction


class CostModel:
    """Per-op time lookups over one :class:`HardwareProfile`."""

    def __init__(self, hw: HardwareProfile) -> None:
        self.hw = hw
        self.cal = hw.calibration
        self._launch_s = hw.gpu.kernel_launch_us * 1e-6
        self._mem_Bps = hw.gpu.hbm_GBps * 1e9 * hw.gpu.memory_efficiency

    @property
    def calibrated(self) -> bool:
        return self.cal is not None

    # -- memory-bound ops -------------------------------------------------
    def memory_s(self, op: str, nbytes: ArrayLike) -> F64:
        """Time of a memory-bound op: ``gating``, ``(un)permute``, ``regroup`` or ``copy``.

        ``op`` may name a variant (``gating.sigmoid_topk.grouped``): its own fit is
        used when calibrated, else its parent's (``gating.sigmoid_topk``, then
        ``gating``), else ``copy``, else the spec.
        """
        b = np.asarray(nbytes, dtype=np.float64)
        fit = self._memory_fit(op)
        if fit is None:
            return self._launch_s + b / self._mem_Bps
        bw = eval_curve(fit.bandwidth_GBps, b) * 1e9
        return fit.latency_us * 1e-6 + b / bw

    def _memory_fit(self, op: str) -> MemoryOpFit | None:
        if self.cal is None:
            return None
        parts = op.split(".")  # gating.sigmoid_topk.grouped -> gating.sigmoid_topk -> gating
        for name in [".".join(parts[:n]) for n in range(len(parts), 0, -1)] + ["copy"]:
            if name in self.cal.memory:
                return self.cal.memory[name]
        return None

    def gate_s(
        self, T: ArrayLike, D: int, E: int, K: int, dtype: str, kind: str | None = None
    ) -> F64:
        """Router (logits GEMM, scores, top-k); ``kind`` picks a per-router-kind fit if any."""
        nbytes = work.gate_bytes(T, D, E, K, DTYPE_BYTES[dtype])
        op = f"gating.{kind}" if kind else "gating"
        mem = self.memory_s(op, nbytes)
        flops = work.gate_flops(T, D, E)
        if self.cal is not None and "gating" in self.cal.memory:
            fit = self._memory_fit(op)
            if fit is not None and fit.tflops is not None:
                return mem + flops / (fit.tflops * 1e12)
            return mem  # the fit already includes the router GEMM
        return np.maximum(mem, self._launch_s + flops / self._flops(dtype))

    def permute_s(self, T: ArrayLike, D: int, K: int, dtype: str) -> F64:
        return self.memory_s("permute", work.permute_bytes(T, D, K, DTYPE_BYTES[dtype]))

    def unpermute_s(self, T: ArrayLike, D: int, K: int, dtype: str) -> F64:
        return self.memory_s("unpermute", work.unpermute_bytes(T, D, K, DTYPE_BYTES[dtype]))

    def regroup_s(self, M: ArrayLike, D: int, dtype: str) -> F64:
        """Received rows sorted by local expert before the expert GEMMs and back after."""
        return self.memory_s("regroup", work.regroup_bytes(M, D, DTYPE_BYTES[dtype]))

    # -- GEMMs -------------------------------------------------------------
    def experts_s(self, tokens_XE: ArrayLike, D: int, F: int, dtype: str) -> F64:
        """One grouped expert-FFN call per row of ``tokens_XE`` (tokens per local expert).

        Returns seconds with the leading shape ``X``. Experts with zero tokens
        cost nothing beyond the call's fixed latency.
        """
        m = np.asarray(tokens_XE, dtype=np.float64)
        flops = work.expert_flops(m, D, F)
        fit = self._gemm_fit(dtype)
        if fit is None:
            nbytes = work.expert_bytes(m, D, F, DTYPE_BYTES[dtype])
            per = np.maximum(flops / self._flops(dtype), nbytes / self._mem_Bps)
            return self._launch_s + per.sum(axis=-1)
        tflops = eval_curve(fit.tflops, np.maximum(flops, 1.0)) * 1e12
        per = np.where(m > 0, fit.per_expert_us * 1e-6 + flops / tflops, 0.0)
        return fit.latency_us * 1e-6 + per.sum(axis=-1)

    def dense_s(self, flops: ArrayLike, nbytes: ArrayLike, dtype: str) -> F64:
        """A dense op (attention, shared expert, dense FFN): roofline or GEMM curve."""
        f = np.asarray(flops, dtype=np.float64)
        b = np.asarray(nbytes, dtype=np.float64)
        fit = self._dense_fit(dtype) or self._gemm_fit(dtype)
        if fit is None:
            return self._launch_s + np.maximum(f / self._flops(dtype), b / self._mem_Bps)
        tflops = eval_curve(fit.tflops, np.maximum(f, 1.0)) * 1e12
        return fit.latency_us * 1e-6 + f / tflops

    def _flops(self, dtype: str) -> float:
        return self.hw.peak_tflops(dtype) * 1e12 * self.hw.gpu.gemm_efficiency

    def _gemm_fit(self, dtype: str) -> GemmFit | None:
        if self.cal is None:
            return None
        return _by_dtype(self.cal.gemm, dtype, self.cal.dtype)

    def _dense_fit(self, dtype: str) -> GemmFit | None:
        if self.cal is None:
            return None
        return _by_dtype(self.cal.dense, dtype, self.cal.dtype)

    # -- network -----------------------------------------------------------
    def link(self, tier: Tier, nbytes: float | None = None) -> LinkCost:
        """Latency and achievable bandwidth of one GPU's port on ``tier``.

        With a calibrated all-to-all fit for the tier, the bandwidth is read off
        its curve at ``nbytes`` (bytes one rank sends to the other ranks).
        """
        fit = self.cal.alltoall.get(tier) if self.cal is not None else None
        if fit is not None:
            x = 1.0 if nbytes is None else max(float(nbytes), 1.0)
            bw = float(eval_curve(fit.bandwidth_GBps, x)) * 1e9
            return LinkCost(fit.latency_us * 1e-6, bw)
        if tier == "scaleup":
            su = self.hw.node.scaleup
            return LinkCost(su.latency_us * 1e-6, su.link_GBps * 1e9 * su.efficiency)
        so = self.hw.scaleout
        return LinkCost(so.latency_us * 1e-6, so.nic_GBps * 1e9 * so.efficiency)

    def alltoall_s(self, tier: Tier, nbytes: ArrayLike) -> F64:
        """One all-to-all on ``tier``, each rank sending ``nbytes`` to the others.

        ``latency + nbytes / bw(nbytes)``.

        The same line the calibration fits (``CommFit``), vectorised; uses
        :meth:`link` per element, so the bandwidth follows the fitted curve.
        """
        b = np.asarray(nbytes, dtype=np.float64)
        flat = [self.link(tier, float(x)) for x in b.ravel()]
        lat = np.array([c.latency_s for c in flat]).reshape(b.shape)
        bw = np.array([c.bandwidth_Bps for c in flat]).reshape(b.shape)
        return lat + b / bw


def _by_dtype(fits: dict[str, GemmFit], dtype: str, measured: str) -> GemmFit | None:
    """The fit for ``dtype``, else the one for the measured dtype, else any."""
    if not fits:
        return None
    return fits.get(dtype) or fits.get(measured) or next(iter(fits.values()))
