"""CostModel: seconds for each op on one device, from a hardware profile.

A spec profile is priced as a roofline: ``launch + max(flops / (peak * eff),
bytes / (hbm * eff))``. A calibrated profile (``calibration:`` section) uses
its fitted curves instead, family by family; families it lacks fall back to
the roofline. Nothing here fits or measures: the hot path only evaluates.
Every method is vectorised over leading array axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import (
    AttentionFit,
    CommFit,
    Curve,
    DeepEPFit,
    GemmFit,
    GemmTable,
    HardwareProfile,
    MemoryOpFit,
)
from moesim.costs import tables, work
from moesim.costs.curves import eval_curve

Tier = Literal["scaleup", "scaleout"]
_T = TypeVar("_T")
#: GEMM table keys a dtype may be priced from, in order (fp8: per-tensor, then block scales)
GEMM_RECIPES = {"fp8": ("fp8", "fp8_block"), "bf16": ("bf16",), "fp16": ("bf16",)}
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
        if self.cal is not None and "gating" not in self.cal.memory and self.cal.gemm_table:
            # measured GPU tables: the router GEMM (bf16 logits) plus the memory-bound rest
            logits = self.gemm_s(T, E, D, "bf16")
            rest = work.gate_bytes(T, 0, E, K, DTYPE_BYTES[dtype]) / self._mem_Bps
            return np.asarray(logits + rest, dtype=np.float64)
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
    def experts_s(
        self,
        tokens_XE: ArrayLike,
        D: int,
        F: int,
        dtype: str,
        scanned_rows: ArrayLike | None = None,
        recipe: str | None = None,
    ) -> F64:
        """One grouped expert-FFN call per row of ``tokens_XE`` (tokens per local expert).

        Returns seconds with the leading shape ``X``. Experts with zero tokens
        cost nothing beyond the call's fixed latency. ``scanned_rows``: routed
        rows the kernel expands and finalizes (default: its own rows; a fused
        MoE fed every token of the group, as after an all-gather, scans ``T*K``),
        priced by a measured fit's ``scan_ps``; a measured fit's ``activation_ps``
        prices the bytes each expert's rows move (``work.expert_activation_bytes``),
        and its ``weight_GBps_by_tiles`` the bandwidth the call's weights stream at,
        read at the output tiles of all its active experts (``work.expert_weight_tiles``).
        ``recipe`` picks a measured fit (``fp8_block``: DeepSeek-style block scales); by
        default ``fp8`` prices from the per-tensor fit, then the block-scaled one.
        """
        m = np.asarray(tokens_XE, dtype=np.float64)
        flops = work.expert_flops(m, D, F)
        fit = self._expert_fit(dtype, recipe)
        if fit is None:
            nbytes = work.expert_bytes(m, D, F, DTYPE_BYTES[dtype])
            rate: float | F64 = self._flops(dtype)
            shape = self.hw.gpu.gemm_shape
            if shape is not None:  # spec shape efficiency: gate/up (m x 2F) and down (m x D)
                eff = tables.shape_efficiency(shape, m, 2 * F) * (2 / 3) + tables.shape_efficiency(
                    shape, m, D
                ) * (1 / 3)
                rate = rate * np.maximum(eff, 1e-6)
            per = np.where(m > 0, np.maximum(flops / rate, nbytes / self._mem_Bps), 0.0)
            return self._launch_s + per.sum(axis=-1)
        x = m if fit.tflops_by == "tokens" else flops
        tflops = (
            eval_curve(fit.tflops, np.maximum(x, 1e-3 if fit.tflops_by == "tokens" else 1.0)) * 1e12
        )
        fixed = fit.per_expert_us * 1e-6
        wbytes = 3.0 * D * F * DTYPE_BYTES[dtype]
        curve = fit.weight_GBps_by_tiles
        if curve is None and fit.weight_GBps is not None:  # weights once per active expert
            fixed = fixed + wbytes / (fit.weight_GBps * 1e9)
        per = fixed + flops / tflops
        if fit.activation_ps:  # the rows' activations through memory
            per = per + work.expert_activation_bytes(m, D, F) * fit.activation_ps * 1e-12
        out = fit.latency_us * 1e-6 + np.where(m > 0, per, 0.0).sum(axis=-1)
        if curve is not None:  # the call's weights at the bandwidth its tiles reach
            tiles = work.expert_weight_tiles(m, D, F).sum(axis=-1)
            active = (m > 0).sum(axis=-1)
            bw = eval_curve(curve, np.maximum(tiles, 1.0)) * 1e9
            out = out + active * wbytes / bw
        if fit.scan_ps:
            rows = (
                m.sum(axis=-1)
                if scanned_rows is None
                else np.asarray(scanned_rows, dtype=np.float64)
            )
            out = out + rows * D * fit.scan_ps * 1e-12
        return np.asarray(out, dtype=np.float64)

    def dense_s(self, flops: ArrayLike, nbytes: ArrayLike, dtype: str) -> F64:
        """A dense op (attention, shared expert, dense FFN): roofline or GEMM curve."""
        f = np.asarray(flops, dtype=np.float64)
        b = np.asarray(nbytes, dtype=np.float64)
        fit = self._dense_fit(dtype) or self._gemm_fit(dtype)
        if fit is not None and fit.tflops_by == "tokens":
            fit = None  # a fused-MoE curve by tokens per expert does not price a bare FLOP count
        if fit is None:
            return self._launch_s + np.maximum(f / self._flops(dtype), b / self._mem_Bps)
        tflops = eval_curve(fit.tflops, np.maximum(f, 1.0)) * 1e12
        return fit.latency_us * 1e-6 + f / tflops

    # -- lookups over measured GPU tables (issue 11); spec fallbacks otherwise -------
    def gemm_s(
        self, m: ArrayLike, n: ArrayLike, k: ArrayLike, dtype: str, recipe: str | None = None
    ) -> F64:
        """One GEMM ``[m, k] x [k, n]`` in ``dtype``: measured table, else the spec roofline.

        ``recipe`` picks a table (``fp8_block``); by default ``fp8`` prices from the
        per-tensor table, then the block-scaled one. The spec roofline is
        ``launch + max(flops / (peak * eff * shape eff), bytes / (hbm * eff))``,
        the shape efficiency only where the profile has ``gpu.gemm_shape``.
        Broadcasts over array arguments.
        """
        tab = self._gemm_table(dtype, recipe)
        if tab is not None:
            return tables.table_s(tab, m, n, k)
        mq, nq, kq = (np.asarray(v, dtype=np.float64) for v in (m, n, k))
        flops = 2.0 * mq * nq * kq
        nbytes = (mq * kq + kq * nq + mq * nq) * DTYPE_BYTES.get(dtype, 2.0)
        rate: float | F64 = self._flops(dtype)
        if self.hw.gpu.gemm_shape is not None:
            rate = rate * np.maximum(tables.shape_efficiency(self.hw.gpu.gemm_shape, mq, nq), 1e-6)
        return np.asarray(self._launch_s + np.maximum(flops / rate, nbytes / self._mem_Bps))

    def has_gemm_table(self, dtype: str) -> bool:
        """Whether a measured GEMM table prices ``dtype`` (:meth:`gemm_s` reads it)."""
        return self._gemm_table(dtype, None) is not None

    def _gemm_table(self, dtype: str, recipe: str | None) -> GemmTable | None:
        if self.cal is None:
            return None
        return _by_recipe(self.cal.gemm_table, dtype, recipe)

    def attention_s(
        self,
        batch: ArrayLike,
        seq: ArrayLike,
        heads: ArrayLike,
        kv_heads: ArrayLike,
        d_qk: ArrayLike,
        d_v: ArrayLike,
        dtype: str,
        mla: bool = False,
    ) -> F64 | None:
        """Causal attention forward (FMHA) of ``batch`` sequences of ``seq`` tokens with
        ``heads`` query and ``kv_heads`` KV heads on the measured fit
        (:class:`~moesim.config.hardware.AttentionFit`), or None where the profile has
        none for ``dtype`` (MLA: DeepSeek's context MLA kernel, ``mla.<dtype>``)."""
        fit = self.attention_fit(dtype, mla)
        if fit is None:
            return None
        return tables.attention_s(fit, batch, seq, heads, kv_heads, d_qk, d_v)

    def attention_fit(self, dtype: str, mla: bool = False) -> AttentionFit | None:
        """The measured attention fit for ``dtype`` (``mla.<dtype>`` with ``mla``), or None."""
        if self.cal is None or not self.cal.attention:
            return None
        return self.cal.attention.get(f"mla.{dtype}" if mla else dtype)

    def collective_s(self, kind: str, gpus: int, nbytes: ArrayLike) -> F64:
        """One NCCL collective (``all_reduce``, ``all_gather``, ``reduce_scatter``,
        ``alltoall``) over ``gpus`` GPUs of ``nbytes`` (nccl-tests' message size).

        Calibrated: the fitted curve for that GPU count, or the nearest measured
        count (:meth:`out_of_range` reports it). Spec: a ring on NVLink inside a
        node, on the NICs across nodes: ``factor(n) * bytes / bw + steps(n) * latency``.
        """
        b = np.asarray(nbytes, dtype=np.float64)
        if gpus <= 1:
            return np.zeros(b.shape)
        if self.cal is not None and self.cal.collectives:
            key, _ = tables.nearest_key(list(self.cal.collectives), kind, gpus)
            if key is not None:
                return tables.curve_s(self.cal.collectives[key], b)
        factor, steps = tables.RING[kind]
        tier: Tier = "scaleup" if gpus <= self.hw.node.gpus_per_node else "scaleout"
        link = self.link(tier)
        return np.where(
            b > 0, steps(gpus) * link.latency_s + factor(gpus) * b / link.bandwidth_Bps, 0.0
        )

    def collective_fit(self, kind: str, gpus: int) -> CommFit | None:
        """The calibrated ``<kind>.<gpus>`` collective fit, measured at exactly that count."""
        if self.cal is None:
            return None
        return self.cal.collectives.get(f"{kind}.{gpus}")

    def deepep_s(
        self,
        mode: str,
        op: str,
        tokens: ArrayLike,
        hidden: int,
        topk: int,
        world: int = 8,
        sms: int | None = None,
        experts: int | None = None,
    ) -> F64 | None:
        """DeepEP ``mode`` (``ll``, ``normal``) ``op`` (``dispatch``, ``combine``) seconds, or None.

        ``tokens`` per rank, each sent to ``topk`` experts; priced on the bytes a
        rank sends to the other ranks (fp8 rows with scales for dispatch, bf16
        for combine). None when the profile has no DeepEP measurements.
        """
        line = self.deepep_line(mode, op, hidden, topk, world, sms=sms, experts=experts)
        if line is None:
            return None
        nbytes = deepep_bytes(op, tokens, hidden, topk, world, experts, mode)
        return tables.curve_s(line, nbytes)

    def deepep_line(
        self,
        mode: str,
        op: str,
        hidden: int,
        topk: int,
        world: int = 8,
        sms: int | None = None,
        experts: int | None = None,
        row: float | None = None,
    ) -> CommFit | None:
        """The DeepEP fit for one shape as a plain ``latency + bytes / bw(bytes)`` line.

        ``row``: bytes of one row in the caller's bytes (default DeepEP's own:
        fp8 + scales for dispatch, bf16 for combine); the per-SM term is per
        element, so it is rescaled to the caller's bytes.

        The shape terms of :class:`~moesim.config.hardware.DeepEPFit` fold in
        exactly: the fixed cost gains ``per_expert E + per_hidden D``, and the
        bandwidth over the bytes a rank sends becomes
        ``1 / (m / bw(m b) + sm_ps K D / (bytes_per_token min(E, sms)))`` with
        ``m = 1 + local_copies row / bytes_per_token``. None without DeepEP fits.
        """
        fit = self.deepep_fit(mode, op, sms)
        if fit is None:
            return None
        E = float(experts or world)
        bpt = max(float(deepep_bytes(op, 1.0, hidden, topk, world, experts, mode)), 1e-30)
        m = 1.0 + fit.local_copies * deepep_row_bytes(op, hidden) / bpt
        own = deepep_row_bytes(op, hidden)
        per_row = own / (row or own)  # caller's bytes per DeepEP byte, inverted
        sm_s_per_byte = fit.sm_ps * 1e-12 * topk * hidden * per_row / (bpt * min(E, fit.sms))
        c = fit.bandwidth_GBps
        y = [1.0 / (m / (v * 1e9) + sm_s_per_byte) / 1e9 for v in c.y]
        lat = fit.latency_us + fit.per_expert_us * E + fit.per_hidden_ns * hidden * 1e-3
        return CommFit(latency_us=lat, bandwidth_GBps=Curve(x=[v / m for v in c.x], y=y))

    def deepep_fit(self, mode: str, op: str, sms: int | None = None) -> DeepEPFit | None:
        if self.cal is None or not self.cal.deepep:
            return None
        name = f"{mode}.{op}"
        if name in self.cal.deepep:
            return self.cal.deepep[name]
        keys = sorted(
            (k for k in self.cal.deepep if k.startswith(name + ".sms")),
            key=lambda k: int(k.rsplit("sms", 1)[1]),
        )
        if sms is not None and f"{name}.sms{sms}" in self.cal.deepep:
            return self.cal.deepep[f"{name}.sms{sms}"]
        return self.cal.deepep[keys[-1]] if keys else None

    def out_of_range(self, family: str, **values: ArrayLike) -> list[dict[str, object]]:
        """Where ``values`` (axis -> value(s)) leave ``family``'s measured range.

        Each item: ``{"family", "axis", "value", "lo", "hi", "factor"}`` (factor:
        how far beyond the edge, >= 1). Empty for spec profiles (nothing measured)
        and for families or axes without a recorded range.
        """
        if self.cal is None or family not in self.cal.ranges:
            return []
        return [{"family": family, **o} for o in tables.outside(self.cal.ranges[family], values)]

    def _flops(self, dtype: str) -> float:
        return self.hw.peak_tflops(dtype) * 1e12 * self.hw.gpu.gemm_efficiency

    def _gemm_fit(self, dtype: str) -> GemmFit | None:
        if self.cal is None:
            return None
        return _by_dtype(self.cal.gemm, dtype, self.cal.dtype)

    def _expert_fit(self, dtype: str, recipe: str | None) -> GemmFit | None:
        """The fused-MoE fit of ``recipe`` if calibrated, else the first of the dtype's
        recipes (:data:`GEMM_RECIPES`) calibrated, else :meth:`_gemm_fit`."""
        if self.cal is None:
            return None
        return _by_recipe(self.cal.gemm, dtype, recipe) or self._gemm_fit(dtype)

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


def deepep_row_bytes(op: str, hidden: int) -> float:
    """Bytes of one DeepEP row: fp8 with one fp32 scale per 128 (dispatch), bf16 (combine)."""
    return hidden + 4.0 * math.ceil(hidden / 128) if op == "dispatch" else 2.0 * hidden


def deepep_bytes(
    op: str,
    tokens: ArrayLike,
    hidden: int,
    topk: int,
    world: int,
    experts: int | None = None,
    mode: str = "ll",
) -> F64:
    """Bytes a rank sends to the other ranks in one DeepEP call (uniform routing).

    Low-latency mode sends one message per (token, expert) copy; normal mode
    sends a token once per destination rank, so with ``experts`` given its
    copies are the expected distinct other ranks among the ``topk`` experts:
    ``(world - 1) (1 - C(E - E/world, K) / C(E, K))``.
    """
    row = deepep_row_bytes(op, hidden)
    share = (world - 1) / world if world > 1 else 1.0
    copies = topk * share
    if mode == "normal" and experts and world > 1 and experts % world == 0:
        miss = math.comb(experts - experts // world, topk) / math.comb(experts, topk)
        copies = (world - 1) * (1.0 - miss)
    return np.asarray(tokens, dtype=np.float64) * copies * row


def _by_recipe(found: Mapping[str, _T], dtype: str, recipe: str | None) -> _T | None:
    """The entry of ``recipe`` if given, else the first of ``dtype``'s recipes
    (:data:`GEMM_RECIPES`) that ``found`` holds (GEMM tables, fused-MoE fits)."""
    keys = (recipe,) if recipe else GEMM_RECIPES.get(dtype, (dtype,))
    return next((found[k] for k in keys if k in found), None)


def _by_dtype(fits: dict[str, GemmFit], dtype: str, measured: str) -> GemmFit | None:
    """The fit for ``dtype``, else the one for the measured dtype, else any."""
    if not fits:
        return None
    return fits.get(dtype) or fits.get(measured) or next(iter(fits.values()))
