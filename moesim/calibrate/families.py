"""Op families: which bench rows each one fits, how, and how CostModel prices them.

A family selects its rows (the fastest measured strategy per shape, which is
what a tuned system runs), fits :mod:`moesim.calibrate.fit` lines to them and
returns the pieces of a :class:`~moesim.config.hardware.Calibration`. Its
``predict`` goes through :class:`moesim.costs.CostModel`, so cross-validated
errors are the errors of what the simulator will actually compute.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from moesim.calibrate.fit import Items, LineFit, fit_line
from moesim.config.base import DTYPE_BYTES
from moesim.config.hardware import CommFit, Curve, GemmFit, HardwareProfile, MemoryOpFit
from moesim.costs import CostModel, work
from moesim.errors import UserError

F64 = NDArray[np.float64]
#: the router kind the generic ``gating`` fit prices (the RouterConfig default)
DEFAULT_ROUTER = "softmax_topk"
#: columns that tell one measured shape from another (strategy is what varies within one)
SHAPE = ("suite", "op", "T", "D", "F", "E", "K", "world", "skew", "split", "dtype", "msg_bytes")


@dataclass
class Parts:
    """Pieces of a Calibration, by section (``memory``, ``gemm``, ``dense``, ``alltoall``)."""

    memory: dict[str, MemoryOpFit] = field(default_factory=dict)
    gemm: dict[str, GemmFit] = field(default_factory=dict)
    dense: dict[str, GemmFit] = field(default_factory=dict)
    alltoall: dict[str, CommFit] = field(default_factory=dict)

    def update(self, other: Parts) -> None:
        for name in ("memory", "gemm", "dense", "alltoall"):
            getattr(self, name).update(getattr(other, name))

    def as_dict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in ("memory", "gemm", "dense", "alltoall")}


@dataclass(frozen=True)
class Family:
    """One op family: rows ``suite``/``ops``, a fit and a CostModel prediction per row."""

    name: str
    suite: str
    ops: tuple[str, ...] | None  # None: every op of the suite
    fit: Callable[[pd.DataFrame, float, HardwareProfile], Parts]
    predict: Callable[[CostModel, pd.DataFrame, HardwareProfile], F64]
    extra_key: tuple[str, ...] = ()  # more shape columns (roofline copy sizes live in bytes)
    group: str | None = None  # cross-validate within groups of this column (router kind)
    positive: tuple[str, ...] = ()  # columns a usable row has > 0 (what sizes it)
    tokens: bool = False  # rows need a tokens_per_expert list (they are priced from it)

    def select(
        self, df: pd.DataFrame, strategy: str | None = None
    ) -> tuple[pd.DataFrame, dict[str, int]]:
        """The fastest strategy's row per shape, and how many shapes each strategy won.

        Rows that dropped tokens (a capacity-bound strategy under skew did less
        work) are not candidates: every family prices dropless work. With
        ``strategy``, only that strategy's rows are (to price one implementation).
        """
        rows = self.rows(df)
        if strategy is not None:
            rows = rows[rows["strategy"].astype(str) == strategy]
        if rows.empty:
            return rows, {}
        key = [*SHAPE, *self.extra_key]
        best = rows.loc[rows.groupby(key, sort=True, dropna=False)["median_s"].idxmin()]
        best = best.reset_index(drop=True)
        wins = best["strategy"].astype(str).value_counts().sort_index()
        named = {str(k): int(v) for k, v in wins.items() if k}
        return best, named

    def rows(self, df: pd.DataFrame) -> pd.DataFrame:
        """This family's usable rows, every strategy (dropping ones and unsized ones out)."""
        rows = df[df["suite"] == self.suite]
        if self.ops is not None:
            rows = rows[rows["op"].isin(self.ops)]
        rows = rows[~dropped_tokens(rows)]
        for col in self.positive:
            rows = rows[rows[col] > 0]
        if self.tokens:
            rows = rows[rows["tokens_per_expert"].astype(str).str.startswith("[")]
        return rows


def dropped_tokens(rows: pd.DataFrame) -> NDArray[np.bool_]:
    """True where ``tokens_per_expert`` sums to fewer than the ``T * K`` assignments."""
    m = tokens_matrix(rows)
    listed = np.array(
        [isinstance(s, str) and s.startswith("[") for s in rows["tokens_per_expert"]], dtype=bool
    )
    want = rows["T"].to_numpy(dtype=np.float64) * rows["K"].to_numpy(dtype=np.float64)
    return np.asarray(listed & (m.sum(axis=1) < want), dtype=bool)


# -- memory-bound ops ------------------------------------------------------------


def _records(rows: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in r.items()} for r in rows.to_dict("records")]


def gate_bytes(rows: pd.DataFrame) -> F64:
    return np.array(
        [
            float(work.gate_bytes(r["T"], r["D"], r["E"], r["K"], DTYPE_BYTES[r["dtype"]]))
            for r in _records(rows)
        ]
    )


def _regroup_bytes(T: int, D: int, K: int, b: float) -> F64:
    return work.regroup_bytes(T * K, D, b)  # a rank receives T*K rows


#: dispatch-suite op -> bytes of one call from (T, D, K, element bytes)
DISPATCH_BYTES: dict[str, Callable[[int, int, int, float], F64]] = {
    "permute": work.permute_bytes,
    "unpermute": work.unpermute_bytes,
    "regroup": _regroup_bytes,
}


def dispatch_bytes(rows: pd.DataFrame) -> F64:
    return np.array(
        [
            float(DISPATCH_BYTES[r["op"]](r["T"], r["D"], r["K"], DTYPE_BYTES[r["dtype"]]))
            for r in _records(rows)
        ]
    )


def memory_fit(line: LineFit) -> MemoryOpFit:
    curve = Curve(x=list(line.knots_x), y=list(line.knots_y))
    return MemoryOpFit(latency_us=_us(line.latency_s), bandwidth_GBps=curve, tflops=line.extra_rate)


def _line(
    size: F64, rows: pd.DataFrame, noise: float, latency_s: float, extra: F64 | None = None
) -> LineFit:
    """A memory/communication line: one item (the bytes) per call, GB/s curve.

    ``latency_s`` is the prior used when the rows cannot separate the latency.
    """
    items = Items.one_per_row(size)
    t = rows["median_s"]
    return fit_line(
        items, t, unit=1e9, per_item=False, noise=noise, extra_R=extra, latency_prior_s=latency_s
    )


def _launch_s(base: HardwareProfile) -> float:
    return base.gpu.kernel_launch_us * 1e-6


def _fit_gating(rows: pd.DataFrame, noise: float, base: HardwareProfile) -> Parts:
    """One fit per router kind, and ``gating`` for the default kind (or all kinds pooled).

    Bytes over a bandwidth curve plus the router GEMM's FLOPs at a fitted rate.
    The FLOPs term is fitted only where the rows vary D or E: with T alone varying
    (the CPU quick grid) FLOPs and bytes both grow as T, the two terms cannot be
    told apart and splitting the time between them only adds held-out error.
    """
    size, flops, lat = gate_bytes(rows), gate_flops(rows), _launch_s(base)
    parts = Parts()
    for kind, idx in rows.groupby("op").indices.items():
        sub = rows.iloc[idx]
        line = _line(size[idx], sub, noise, lat, _separable(sub, flops[idx]))
        parts.memory[f"gating.{kind}"] = memory_fit(line)
    generic = parts.memory.get(f"gating.{DEFAULT_ROUTER}")
    pooled = _separable(rows, flops)
    parts.memory["gating"] = generic or memory_fit(_line(size, rows, noise, lat, pooled))
    return parts


def _separable(rows: pd.DataFrame, flops: F64) -> F64 | None:
    """``flops`` when the rows hold 2+ (D, E) pairs (FLOPs not just bytes x a constant)."""
    return flops if len(rows[["D", "E"]].drop_duplicates()) > 1 else None


def gate_flops(rows: pd.DataFrame) -> F64:
    return np.array([float(work.gate_flops(r["T"], r["D"], r["E"])) for r in _records(rows)])


def _predict_gating(cm: CostModel, rows: pd.DataFrame, base: HardwareProfile) -> F64:
    return np.array(
        [
            float(cm.gate_s(r["T"], r["D"], r["E"], r["K"], r["dtype"], kind=r["op"]))
            for r in _records(rows)
        ]
    )


def _dispatch_family(op: str) -> Family:
    def fit(rows: pd.DataFrame, noise: float, base: HardwareProfile) -> Parts:
        line = _line(dispatch_bytes(rows), rows, noise, _launch_s(base))
        return Parts(memory={op: memory_fit(line)})

    def predict(cm: CostModel, rows: pd.DataFrame, base: HardwareProfile) -> F64:
        prices: dict[str, Callable[[int, int, int, str], F64]] = {
            "permute": cm.permute_s,
            "unpermute": cm.unpermute_s,
            "regroup": lambda T, D, K, dt: cm.regroup_s(T * K, D, dt),
        }
        price = prices[op]
        return np.array([float(price(r["T"], r["D"], r["K"], r["dtype"])) for r in _records(rows)])

    return Family(op, "dispatch", (op,), fit, predict, positive=("T", "D", "K"))


def _fit_copy(rows: pd.DataFrame, noise: float, base: HardwareProfile) -> Parts:
    size = rows["bytes"].to_numpy(dtype=np.float64)
    return Parts(memory={"copy": memory_fit(_line(size, rows, noise, _launch_s(base)))})


def _predict_copy(cm: CostModel, rows: pd.DataFrame, base: HardwareProfile) -> F64:
    return cm.memory_s("copy", rows["bytes"].to_numpy(dtype=np.float64))


def _fit_loss(rows: pd.DataFrame, noise: float, base: HardwareProfile) -> Parts:
    """The LM head's cross-entropy: a line over the bytes of its logits' two passes."""
    size = rows["bytes"].to_numpy(dtype=np.float64)
    return Parts(memory={"loss": memory_fit(_line(size, rows, noise, _launch_s(base)))})


def _predict_loss(cm: CostModel, rows: pd.DataFrame, base: HardwareProfile) -> F64:
    return cm.memory_s("loss", rows["bytes"].to_numpy(dtype=np.float64))


# -- GEMMs -----------------------------------------------------------------------


def tokens_matrix(rows: pd.DataFrame) -> F64:
    """``[R, Emax]`` tokens per expert from the rows' JSON lists (zero-padded)."""
    lists = [_int_list(s) for s in rows["tokens_per_expert"]]
    width = max((len(v) for v in lists), default=0)
    out = np.zeros((len(lists), max(width, 1)))
    for i, v in enumerate(lists):
        out[i, : len(v)] = v
    return out


def _int_list(text: object) -> list[float]:
    if not isinstance(text, str) or not text:
        return []
    try:
        values = json.loads(text)
        return [float(v) for v in values]
    except (ValueError, TypeError):
        raise UserError(f"tokens_per_expert = {text[:40]!r}: not a JSON list of counts") from None


def expert_flops_matrix(rows: pd.DataFrame) -> F64:
    m = tokens_matrix(rows)
    D = rows["D"].to_numpy(dtype=np.float64)[:, None]
    F = rows["F"].to_numpy(dtype=np.float64)[:, None]
    return work.expert_flops(m, 1, 1) * D * F


def gemm_fit(line: LineFit) -> GemmFit:
    curve = Curve(x=list(line.knots_x), y=list(line.knots_y))
    return GemmFit(latency_us=_us(line.latency_s), per_expert_us=_us(line.per_item_s), tflops=curve)


def _fit_experts(rows: pd.DataFrame, noise: float, base: HardwareProfile) -> Parts:
    """Per dtype: call latency, per-expert cost and TFLOP/s over one expert's FLOPs."""
    parts = Parts()
    for dtype, idx in rows.groupby("dtype").indices.items():
        sub = rows.iloc[idx]
        items = Items.from_matrix(expert_flops_matrix(sub))
        t, lat = sub["median_s"], _launch_s(base)
        line = fit_line(items, t, unit=1e12, per_item=True, noise=noise, latency_prior_s=lat)
        parts.gemm[str(dtype)] = gemm_fit(line)
    return parts


def _predict_experts(cm: CostModel, rows: pd.DataFrame, base: HardwareProfile) -> F64:
    m = tokens_matrix(rows)
    return np.array(
        [
            float(cm.experts_s(m[i], r["D"], r["F"], r["dtype"]))
            for i, r in enumerate(_records(rows))
        ]
    )


def _fit_dense(rows: pd.DataFrame, noise: float, base: HardwareProfile) -> Parts:
    parts = Parts()
    for dtype, idx in rows.groupby("dtype").indices.items():
        sub = rows.iloc[idx]
        items = Items.one_per_row(sub["flops"].to_numpy(dtype=np.float64))
        t, lat = sub["median_s"], _launch_s(base)
        line = fit_line(items, t, unit=1e12, per_item=False, noise=noise, latency_prior_s=lat)
        parts.dense[str(dtype)] = gemm_fit(line)
    return parts


def _predict_dense(cm: CostModel, rows: pd.DataFrame, base: HardwareProfile) -> F64:
    return np.array([float(cm.dense_s(r["flops"], r["bytes"], r["dtype"])) for r in _records(rows)])


# -- all-to-all --------------------------------------------------------------------


def tiers(rows: pd.DataFrame, base: HardwareProfile) -> NDArray[np.str_]:
    """``scaleup`` for ranks on one node (all CPU ranks share loopback), else ``scaleout``."""
    on_cpu = rows["device"].astype(str).str.startswith("cpu").to_numpy()
    one_node = rows["world"].to_numpy() <= base.node.gpus_per_node
    return np.where(on_cpu | one_node, "scaleup", "scaleout")


def egress_bytes(rows: pd.DataFrame) -> F64:
    """Bytes a rank sends to the other ranks: ``msg_bytes`` less its own share (1/world).

    The link model prices what leaves a GPU, as the simulator's network does; an
    uneven split is priced at the same mean egress (its skew shows as error).
    """
    world = rows["world"].to_numpy(dtype=np.float64).clip(1.0)
    share = np.where(world > 1, (world - 1.0) / world, 1.0)
    return rows["msg_bytes"].to_numpy(dtype=np.float64) * share


def _fit_alltoall(rows: pd.DataFrame, noise: float, base: HardwareProfile) -> Parts:
    parts = Parts()
    tier = tiers(rows, base)
    size = egress_bytes(rows)
    for name in np.unique(tier):
        idx = np.flatnonzero(tier == name)
        line = _line(size[idx], rows.iloc[idx], noise, _tier_latency_s(base, str(name)))
        curve = Curve(x=list(line.knots_x), y=list(line.knots_y))
        parts.alltoall[str(name)] = CommFit(latency_us=_us(line.latency_s), bandwidth_GBps=curve)
    return parts


def _predict_alltoall(cm: CostModel, rows: pd.DataFrame, base: HardwareProfile) -> F64:
    tier = tiers(rows, base)
    size = egress_bytes(rows)
    out = np.empty(len(rows))
    for name in np.unique(tier):
        idx = tier == name
        out[idx] = cm.alltoall_s(str(name), size[idx])  # type: ignore[arg-type]
    return out


def _tier_latency_s(base: HardwareProfile, tier: str) -> float:
    spec = base.node.scaleup if tier == "scaleup" else base.scaleout
    return spec.latency_us * 1e-6


def _us(seconds: float) -> float:
    return float(f"{seconds * 1e6:.6g}")


#: every family, in report order
FAMILIES: tuple[Family, ...] = (
    Family(
        "gating",
        "gating",
        None,
        _fit_gating,
        _predict_gating,
        group="op",
        positive=("T", "D", "E", "K"),
    ),
    _dispatch_family("permute"),
    _dispatch_family("unpermute"),
    _dispatch_family("regroup"),
    Family(
        "copy",
        "roofline",
        ("copy",),
        _fit_copy,
        _predict_copy,
        extra_key=("bytes",),
        positive=("bytes",),
    ),
    Family(
        "loss",
        "roofline",
        ("loss",),
        _fit_loss,
        _predict_loss,
        extra_key=("bytes",),
        positive=("bytes",),
    ),
    Family(
        "experts",
        "experts",
        None,
        _fit_experts,
        _predict_experts,
        positive=("D", "F"),
        tokens=True,
    ),
    Family(
        "gemm",
        "roofline",
        ("gemm",),
        _fit_dense,
        _predict_dense,
        extra_key=("flops",),
        positive=("flops",),
    ),
    Family("alltoall", "alltoall", None, _fit_alltoall, _predict_alltoall, positive=("msg_bytes",)),
)
#: what prices a family when its suite is missing
FALLBACK = {
    "gating": "the copy fit if calibrated, else the spec roofline",
    "permute": "the copy fit if calibrated, else the spec roofline",
    "unpermute": "the copy fit if calibrated, else the spec roofline",
    "regroup": "the copy fit if calibrated, else the spec roofline",
    "copy": "the spec roofline (hbm_GBps x memory_efficiency)",
    "loss": "the copy fit if calibrated, else the spec roofline",
    "experts": "the spec roofline (peak_tflops x gemm_efficiency)",
    "gemm": "the experts GEMM fit if calibrated, else the spec roofline",
    "alltoall": "the spec link figures (node.scaleup, scaleout)",
}
