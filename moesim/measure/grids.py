"""Shape grids of the benchmark suites: defaults per device and size, user overrides.

A grid is ``{axis: [values]}`` per suite; a suite measures the cartesian product
of its axes (skipping invalid combinations such as K > E). Axes:

========== ==============================================================
gating     T, D, E, K (routers: ``GATE_KINDS``, every kind + ``sigmoid_topk.grouped``)
dispatch   T, D, E, K, skew (``strategies``: default all + ``sort_padded`` + ``sort_chunks``)
experts    T, D, F, E, K, skew (``strategies``: default all + ``dense``)
roofline   copy_MiB (buffer size), gemm (square M = N = K sizes), loss_T x loss_V
           (cross-entropy over T x V logits; none by default)
alltoall   msg_bytes (sent per rank), split (even | uneven)
========== ==============================================================

Users extend a run with a YAML file (``moesim bench --grid FILE``) holding any
of these suites and axes, e.g. ``experts: {T: [4096], skew: [0, 1.5]}``; the
given axes replace the defaults, the others keep them.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import yaml

from moesim.config.router import GATE_KINDS, GROUPED_SIGMOID
from moesim.errors import ConfigError

SUITES: tuple[str, ...] = ("roofline", "gating", "dispatch", "experts", "alltoall")
#: axes whose values are names from a fixed list (strategies are checked by their suites)
_CHOICES: dict[str, tuple[str, ...]] = {"routers": GATE_KINDS, "split": ("even", "uneven")}
Grid = dict[str, list[Any]]

AXES: dict[str, dict[str, type]] = {
    "gating": {"T": int, "D": int, "E": int, "K": int, "routers": str},
    "dispatch": {"T": int, "D": int, "E": int, "K": int, "skew": float, "strategies": str},
    "experts": {"T": int, "D": int, "F": int, "E": int, "K": int, "skew": float, "strategies": str},
    "roofline": {"copy_MiB": float, "gemm": int, "loss_T": int, "loss_V": int},
    "alltoall": {"msg_bytes": int, "split": str},
}

#: ``moesim run`` / ``bench --quick`` on a CPU: ~15 s on 2 cores. Sized for honest
#: held-out errors: every fitted family gets 5+ shapes, the cheap memory-bound ops
#: (copy, gating, dispatch) many sizes half an octave apart around the shapes of
#: ``scenarios/tiny-cpu.yaml`` (T = 512, D = 256, F = 512, E = 16, k = 2), so a
#: held-out shape is priced from neighbours on both sides, and copies densely over
#: the last-level-cache edge (16-64 MB moved) where the copy rate falls ~3x. The
#: expert GEMMs are one rank's grouped call in that scenario: E / ep = 4 local experts
#: (6 MiB of weights, inside the last-level cache as there) with 32-512 rows each
#: (the scenario's 256 in the middle); 16 experts would put 25 MiB of weights on the
#: cache edge, whose place moves from run to run on a shared host. The
#: expensive einsum dispatch (``T x E x C`` masks) is left out: it never wins.
#: Router kinds: those of the shipped scenarios (``sigmoid_topk`` also with
#: DeepSeek-V3's selection bias and groups, see the gating suite).
_QUICK_T = [128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
_CPU_QUICK: dict[str, Grid] = {
    "gating": {
        "T": _QUICK_T,
        "D": [256],
        "E": [16],
        "K": [2],
        "routers": ["softmax_topk", "topk_softmax", "sigmoid_topk", GROUPED_SIGMOID, "switch_top1"],
    },
    "dispatch": {
        "T": _QUICK_T,
        "D": [256],
        "E": [16],
        "K": [2],
        "skew": [0.0],
        "strategies": ["sort", "index_add", "sort_padded", "sort_chunks"],
    },
    "experts": {
        "T": [64, 128, 256, 512, 1024],
        "D": [256],
        "F": [512],
        "E": [4],
        "K": [2],
        "skew": [0.0, 1.2],
    },
    "roofline": {
        "copy_MiB": [1, 1.5, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64],
        "gemm": [128, 192, 256, 384, 512],
    },
    "alltoall": {"msg_bytes": [2**p for p in range(12, 21)], "split": ["even"]},
}
#: every axis a fit prices along has 3+ distinct values, so cross-validation mostly
#: interpolates; copies span the last-level cache (small buffers) and DRAM (large)
#: densely enough to place the cache tier on the bandwidth curve. Gating E stays on
#: multiples of 16: a CPU BLAS sgemm with N = E < 16 (or N = 24) takes a slow path
#: (E = 8 is ~3x slower than E = 16 at half the FLOPs) that no size-based cost
#: line can price; such routers are outside what this profile prices well.
_CPU_FULL: dict[str, Grid] = {
    "gating": {"T": [256, 1024, 4096], "D": [1024], "E": [16, 32, 64], "K": [2]},
    "dispatch": {
        "T": [256, 512, 1024, 2048],
        "D": [512],
        "E": [8, 64],
        "K": [2],
        "skew": [0.0, 1.2],
    },
    "experts": {
        "T": [256, 1024],
        "D": [512],
        "F": [1024],
        "E": [8, 32],
        "K": [2],
        "skew": [0.0, 1.2, 2.0],
    },
    "roofline": {
        "copy_MiB": [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256],
        "gemm": [256, 384, 512, 768, 1024, 1536, 2048],
    },
    "alltoall": {"msg_bytes": [2**p for p in range(12, 25)], "split": ["even", "uneven"]},
}
_CUDA_QUICK: dict[str, Grid] = {
    "gating": {"T": [4096], "D": [2048], "E": [64], "K": [8]},
    "dispatch": {"T": [8192], "D": [2048], "E": [64], "K": [8], "skew": [0.0, 1.2]},
    "experts": {"T": [4096], "D": [2048], "F": [1024], "E": [64], "K": [8], "skew": [0.0, 1.2]},
    "roofline": {"copy_MiB": [256, 1024], "gemm": [2048, 4096]},
    "alltoall": {"msg_bytes": [2**20, 2**26], "split": ["even", "uneven"]},
}
_CUDA_FULL: dict[str, Grid] = {
    "gating": {"T": [1024, 8192, 32768], "D": [4096, 7168], "E": [8, 64, 256], "K": [2, 8]},
    "dispatch": {
        "T": [1024, 8192, 32768],
        "D": [4096, 7168],
        "E": [8, 64, 256],
        "K": [2, 8],
        "skew": [0.0, 1.2],
    },
    "experts": {
        "T": [1024, 8192, 32768],
        "D": [4096],
        "F": [1408, 2048, 14336],
        "E": [8, 64],
        "K": [2, 8],
        "skew": [0.0, 1.2, 2.0],
    },
    "roofline": {"copy_MiB": [16, 64, 256, 1024, 4096], "gemm": [1024, 2048, 4096, 8192]},
    "alltoall": {"msg_bytes": [2**p for p in range(12, 31, 2)], "split": ["even", "uneven"]},
}


def default_grid(suite: str, device: str, quick: bool) -> Grid:
    """A copy of the built-in grid of ``suite`` for ``device`` ("cpu"/"cuda")."""
    table = {
        ("cpu", True): _CPU_QUICK,
        ("cpu", False): _CPU_FULL,
        ("cuda", True): _CUDA_QUICK,
        ("cuda", False): _CUDA_FULL,
    }[("cuda" if device.startswith("cuda") else "cpu", quick)]
    return deepcopy(table[suite])


def resolve_grids(
    suites: list[str], device: str, quick: bool, overrides: dict[str, Grid] | None = None
) -> dict[str, Grid]:
    """The grid of every suite in ``suites``: defaults with ``overrides`` applied."""
    overrides = overrides or {}
    grids = {}
    for suite in suites:
        grid = default_grid(suite, device, quick)
        grid.update(deepcopy(overrides.get(suite, {})))
        grids[suite] = grid
    return grids


def load_grid_file(path: str | Path) -> dict[str, Grid]:
    """Read and check a grid YAML file; raise :class:`ConfigError` naming file and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read grid file ({err.strerror})", file=str(path)) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML ({err})", file=str(path)) from None
    try:
        return check_grids(data if data is not None else {})
    except ConfigError as err:
        raise err.with_file(str(path)) from None


def check_grids(data: Any) -> dict[str, Grid]:
    """Validate ``{suite: {axis: [values]}}``; values are converted to the axis type."""
    if not isinstance(data, dict):
        raise ConfigError(
            "must be a mapping of suite -> {axis: [values]}", field="<root>", value=data
        )
    out: dict[str, Grid] = {}
    for suite, axes in data.items():
        if suite not in AXES:
            raise ConfigError(
                f"unknown suite; allowed: {', '.join(AXES)}",
                field=str(suite),
                value=suite,
                has_value=False,
            )
        if not isinstance(axes, dict):
            raise ConfigError("must be a mapping axis -> [values]", field=suite, value=axes)
        out[suite] = {axis: _check_axis(suite, axis, values) for axis, values in axes.items()}
    return out


def _check_axis(suite: str, axis: str, values: Any) -> list[Any]:
    field = f"{suite}.{axis}"
    kinds = AXES[suite]
    if axis not in kinds:
        raise ConfigError(
            f"unknown axis; allowed: {', '.join(kinds)}", field=field, value=axis, has_value=False
        )
    values = values if isinstance(values, list) else [values]
    if not values:
        raise ConfigError("must list at least one value", field=field, value=values)
    kind = kinds[axis]
    try:
        converted = [kind(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"values must be {kind.__name__}s", field=field, value=values) from None
    if kind is not str and any(v < 0 or (kind is int and v == 0) for v in converted):
        raise ConfigError("values must be positive (skew may be 0)", field=field, value=values)
    allowed = _CHOICES.get(axis)
    if allowed is not None:
        check_names(field, converted, allowed)
    return converted


def check_names(field: str, values: list[Any], allowed: Sequence[str]) -> None:
    """Raise :class:`ConfigError` if any of ``values`` is not in ``allowed``."""
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ConfigError(f"allowed: {', '.join(allowed)}", field=field, value=bad)
