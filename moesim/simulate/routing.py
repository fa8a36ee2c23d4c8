"""Routing load: how many tokens each source GPU sends to each expert.

Legend: G = source GPUs, S = capacity domains per GPU (sequences; 1 for
per-batch capacity), E = experts, K = top-k, T = tokens, Ly = layers.

A load distribution (:data:`DISTRIBUTIONS`) gives an expert *popularity*
``p_E`` (sums to 1): the share of all token→expert assignments that expert
``e`` receives. Each token picks ``k`` *distinct* experts, so expert ``e`` is
in a token's set with probability ``pi_e = min(1, k * p_e)`` (water-filled so
the ``pi`` sum to ``k``). The count a source sends to ``e`` over ``T`` tokens
is then exactly ``Binomial(T, pi_e)`` — the marginal of any k-distinct
sampler with these inclusion probabilities. Counts of different experts are
drawn independently (documented approximation: a source's total is ``T·k`` in
expectation, not exactly). Where exact per-token ids exist (a trace file or
the real router) they are used as they are.

Popularity persists across layers with ``routing.persistence``: each layer
re-deals the popularity values of a random ``1 - persistence`` share of the
experts among themselves, so the *shape* (the Zipf ranks, say) never changes.
``routing.source_skew`` > 0 gives each source GPU its own popularity,
``Dirichlet(p * E / source_skew)``.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from moesim.config.scenario import RoutingConfig
from moesim.errors import ConfigError, lookup

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]
I64 = NDArray[np.int64]


def _uniform(cfg: RoutingConfig, E: int, rng: np.random.Generator) -> F64:
    return np.full(E, 1.0 / E)


def _zipf(cfg: RoutingConfig, E: int, rng: np.random.Generator) -> F64:
    w = np.arange(1, E + 1, dtype=np.float64) ** -cfg.zipf_exponent
    return rng.permutation(w / w.sum())


def _lognormal(cfg: RoutingConfig, E: int, rng: np.random.Generator) -> F64:
    w = np.exp(cfg.lognormal_sigma * rng.standard_normal(E))
    return w / w.sum()


def _dirichlet(cfg: RoutingConfig, E: int, rng: np.random.Generator) -> F64:
    w = rng.dirichlet(np.full(E, cfg.dirichlet_concentration))
    w = np.maximum(w, 1e-300)  # tiny concentrations underflow to exact zeros
    return w / w.sum()


#: distribution name -> popularity sampler ``(cfg, E, rng) -> p_E``
DISTRIBUTIONS: dict[str, Callable[[RoutingConfig, int, np.random.Generator], F64]] = {
    "uniform": _uniform,
    "zipf": _zipf,
    "lognormal": _lognormal,
    "dirichlet": _dirichlet,
}


def popularity(cfg: RoutingConfig, E: int, rng: np.random.Generator) -> F64:
    """Base expert popularity ``p_E`` (sums to 1) for a synthetic distribution."""
    sampler = lookup(
        DISTRIBUTIONS,
        cfg.distribution,
        field="workload.routing.distribution",
        what="synthetic distribution",
    )
    return sampler(cfg, E, rng)


def layer_popularities(cfg: RoutingConfig, E: int, Ly: int, rng: np.random.Generator) -> F64:
    """``[Ly, E]`` popularity per layer; consecutive layers share ``persistence`` of it."""
    out = np.empty((Ly, E))
    out[0] = popularity(cfg, E, rng)
    for layer in range(1, Ly):
        p = out[layer - 1].copy()
        moved = np.flatnonzero(rng.random(E) >= cfg.persistence)
        p[moved] = p[rng.permutation(moved)]
        out[layer] = p
    return out


def inclusion_probs(p_XE: F64, k: int) -> F64:
    """Per-token inclusion probabilities of k distinct picks: ``min(1, c·p)`` summing to ``k``.

    Water-filling: experts that would exceed 1 are capped and the rest rescaled.
    Works on any leading shape.
    """
    p = np.asarray(p_XE, dtype=np.float64)
    capped = np.zeros(p.shape, dtype=bool)
    pi = p * k
    for _ in range(k + 1):
        over = (pi > 1.0) & ~capped
        if not over.any():
            break
        capped |= over
        free = np.where(capped, 0.0, p)
        budget = k - capped.sum(-1, keepdims=True)
        total = np.maximum(free.sum(-1, keepdims=True), 1e-300)  # all capped: nothing left
        pi = np.where(capped, 1.0, free * budget / total)
    return np.minimum(pi, 1.0)


def source_popularity(p_E: F64, G: int, source_skew: float, rng: np.random.Generator) -> F64 | None:
    """``[G, E]`` per-source popularity, or None when every source shares ``p_E``."""
    if source_skew <= 0 or G <= 1:
        return None
    alpha = np.maximum(p_E * len(p_E) / source_skew, 1e-6)
    p = rng.dirichlet(alpha, size=G)
    p = np.maximum(p, 1e-300)
    return p / p.sum(-1, keepdims=True)


#: bins of the normal quantile table (:func:`standard_normal_f32`)
NORMAL_BINS = 1 << 16


@functools.cache
def _normal_table() -> F32:
    """The standard normal quantile at each bin's midpoint, ``[NORMAL_BINS]`` float32
    (the standard library's, to spare a simulation scipy's import)."""
    inv = statistics.NormalDist().inv_cdf
    return np.array([inv((b + 0.5) / NORMAL_BINS) for b in range(NORMAL_BINS)], np.float32)


def standard_normal_f32(rng: np.random.Generator, shape: tuple[int, ...]) -> F32:
    """Standard normal float32 draws by inversion: a 16-bit uniform picks one of
    :data:`NORMAL_BINS` equal-probability bins, read at its quantile midpoint.

    Three times as fast here as ``rng.standard_normal(dtype=np.float32)``; the count draws
    of a large step spend most of their time here. Within the body the law is the
    normal's to 8e-6 in its CDF (a fraction of a token after rounding); the two end
    bins (|z| > 4.17) are drawn exactly by inversion, so the tails are not cut.
    """
    n = int(np.prod(shape))
    bins = rng.integers(0, NORMAL_BINS, n, dtype=np.uint16)  # 3x faster than rng.bytes here
    out = _normal_table()[bins]
    tail = np.flatnonzero((bins == 0) | (bins == NORMAL_BINS - 1))
    if tail.size:  # 2 in 65536 draws
        u = (bins[tail] + rng.random(tail.size)) / NORMAL_BINS
        inv = statistics.NormalDist().inv_cdf
        out[tail] = [inv(v) for v in np.clip(u, 1e-300, 1.0 - 1e-16).tolist()]
    return out.reshape(shape)


#: cells whose binomial variance is at least this are drawn from the normal approximation
NORMAL_MIN_VAR = 30.0


def draw_counts(rng: np.random.Generator, tokens_S: I64, pi_XE: F64, shape: tuple[int, ...]) -> F32:
    """Tokens each source routes to each expert, ``[*shape, S, E]`` (float32, integral values).

    Cell ``(…, s, e)`` is ``Binomial(tokens_S[s], pi[…, e])``. Cells with variance
    ``>= NORMAL_MIN_VAR`` use the rounded, clipped normal approximation (a
    documented shortcut: 8x faster, and its error in any count's distribution
    is a fraction of a token); the others are exact binomial draws.
    """
    n = np.asarray(tokens_S, dtype=np.float64)[:, None]
    full = (*shape, len(n), pi_XE.shape[-1])
    pi = pi_XE[..., None, :] if pi_XE.ndim > 1 else pi_XE
    mean = (n * pi).astype(np.float32)
    sd = np.sqrt(mean * (1.0 - np.asarray(pi, dtype=np.float32)))
    small = sd * sd >= NORMAL_MIN_VAR
    approx = np.broadcast_to(small, full)
    out = np.empty(full, dtype=np.float32)
    if small.any():
        out = standard_normal_f32(rng, full)
        out *= sd
        out += mean
        np.rint(out, out=out)
        np.clip(out, 0.0, n.astype(np.float32), out=out)
    if not small.all():
        exact = ~approx
        n_full = np.broadcast_to(n, full)[exact].astype(np.int64)
        out[exact] = rng.binomial(n_full, np.broadcast_to(pi, full)[exact])
    return out


# -- exact per-token sampling ------------------------------------------------
def systematic_sample(rng: np.random.Generator, pi_XE: F64, K: int) -> I64:
    """``[X, K]`` distinct picks per row with inclusion probabilities exactly ``pi_XE``.

    Each row's ``pi`` (each ``<= 1``, summing to ``K``) is laid out on ``[0, K]``
    in a fresh random order and hit by the points ``u, u+1, ..., u+K-1``
    (``u ~ U(0, 1]``): an interval of length ``pi_e <= 1`` holds at most one
    point and holds one with probability ``pi_e`` (Madow's systematic
    sampling, with the random order making the joint law exchangeable).
    """
    X, E = pi_XE.shape
    order = np.argsort(rng.random((X, E)), axis=1)
    cum = np.cumsum(np.take_along_axis(pi_XE, order, axis=1), axis=1)
    cum *= K / cum[:, -1:]  # exact total K despite rounding
    u = 1.0 - rng.random((X, 1))  # (0, 1]
    hits = np.minimum(np.floor(cum - u) + 1, K)  # points at or before each interval's end
    picked = np.diff(hits, axis=1, prepend=0.0) > 0
    pos = np.nonzero(picked)[1].reshape(X, K)
    return np.take_along_axis(order, pos, axis=1).astype(np.int64)


def sample_ids(
    rng: np.random.Generator,
    p_XE: F64,
    T: int,
    K: int,
    groups: tuple[int, int] | None = None,
) -> I64:
    """``[X, T, K]`` expert ids: every token picks K distinct experts.

    Without ``groups`` expert ``e`` is in a token's set with probability
    ``inclusion_probs(p, K)[e]`` exactly. With ``groups = (n_group, topk_group)``
    a token first picks ``topk_group`` of the ``n_group`` contiguous expert
    groups (inclusion proportional to the groups' popularity), then K experts
    among those groups only, as group-limited routers (DeepSeek-V3) do.
    """
    X, E = p_XE.shape
    p = np.repeat(p_XE, T, axis=0)  # [X*T, E]
    if groups is not None:
        n_group, topk = groups
        mass = p.reshape(X * T, n_group, -1).sum(-1)
        chosen = systematic_sample(rng, inclusion_probs(mass, topk), topk)
        allowed = np.zeros((X * T, n_group), dtype=bool)
        np.put_along_axis(allowed, chosen, True, axis=1)
        p = p * np.repeat(allowed, E // n_group, axis=1)
        p = p / p.sum(-1, keepdims=True)
    ids = systematic_sample(rng, inclusion_probs(p, K), K)
    return ids.reshape(X, T, K)


# -- exact per-token ids ---------------------------------------------------
def counts_from_ids(ids_GSTK: I64, kept_GSTK: NDArray[np.bool_], E: int) -> I64:
    """``[G, S, E]`` kept assignments per (source, domain, expert) from per-token ids."""
    G, S = ids_GSTK.shape[:2]
    code = (np.arange(G * S).reshape(G, S, 1, 1) * E + ids_GSTK)[kept_GSTK]
    return np.bincount(code.ravel(), minlength=G * S * E).reshape(G, S, E).astype(np.int64)


def distinct_from_ids(ids_GTK: I64, kept_GTK: NDArray[np.bool_], block: int, n_blocks: int) -> I64:
    """``[G, n_blocks]`` tokens of each source with >= 1 kept expert in each block.

    Block ``b`` holds experts ``[b*block, (b+1)*block)`` (an EP rank, or a node).
    """
    G, T, _ = ids_GTK.shape
    tok = np.arange(G * T, dtype=np.int64).reshape(G, T, 1)
    code = (tok * n_blocks + ids_GTK // block)[kept_GTK]
    uniq = np.unique(code)
    src, blk = (uniq // n_blocks) // T, uniq % n_blocks
    return np.bincount(src * n_blocks + blk, minlength=G * n_blocks).reshape(G, n_blocks)


def load_trace(path: str | Path, E: int, K: int) -> I64:
    """Expert ids ``[Ly, T, K]`` from a ``.npy`` / ``.parquet`` trace, loaded without pickle.

    ``.npy``: int array ``[T, K]`` or ``[Ly, T, K]``. ``.parquet``: one column
    ``expert_ids`` of length-K lists (optional ``layer`` column), or K integer
    columns. Any id outside ``[0, E)`` is a ConfigError naming file and value.
    """
    p = Path(path)
    field = "workload.routing.trace"
    if not p.is_file():
        raise ConfigError("trace file not found", field=field, value=str(path))
    if p.suffix == ".npy":
        ids = _load_npy(p)
    elif p.suffix == ".parquet":
        ids = _load_parquet(p)
    else:
        raise ConfigError(
            "unknown trace format; allowed: .npy, .parquet", field=field, value=str(p)
        )
    if ids.ndim == 2:
        ids = ids[None]
    if ids.ndim != 3 or ids.shape[1] == 0:
        raise ConfigError(
            f"trace must be [tokens, k] or [layers, tokens, k], got shape {ids.shape}",
            file=str(p),
        )
    if ids.shape[2] != K:
        raise ConfigError(
            f"trace has k = {ids.shape[2]} ids per token, model.top_k is {K}", file=str(p)
        )
    bad = (ids < 0) | (ids >= E)
    if bad.any():
        raise ConfigError(
            f"expert id {int(ids[bad][0])} out of range; allowed 0..{E - 1} "
            f"(model.num_experts = {E})",
            file=str(p),
        )
    return ids


def _load_npy(p: Path) -> I64:
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ConfigError(f"cannot read .npy trace: {err}", file=str(p)) from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"trace dtype {arr.dtype} is not an integer type", file=str(p))
    return arr.astype(np.int64)


def _load_parquet(p: Path) -> I64:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except Exception as err:  # pyarrow raises many types for bad files
        raise ConfigError(f"cannot read parquet trace: {err}", file=str(p)) from None
    names = table.column_names
    if "expert_ids" in names:
        rows = table.column("expert_ids").to_pylist()
        arr = np.asarray(rows, dtype=np.int64)
        if "layer" in names:
            layer = np.asarray(table.column("layer").to_pylist(), dtype=np.int64)
            layers = np.unique(layer)
            arr = np.stack([arr[layer == v] for v in layers])
        return arr
    import pyarrow.types as pat

    cols = [c for c in names if pat.is_integer(table.schema.field(c).type)]
    if not cols:
        raise ConfigError(
            "parquet trace needs an 'expert_ids' column or integer columns", file=str(p)
        )
    return np.stack([np.asarray(table.column(c).to_pylist(), dtype=np.int64) for c in cols], axis=1)


def tile_trace(ids_LyTK: I64, layer: int, start: int, n: int) -> I64:
    """``n`` consecutive tokens of the trace's ``layer`` (cycled) starting at token ``start``."""
    ids = ids_LyTK[layer % ids_LyTK.shape[0]]
    idx = (start + np.arange(n)) % ids.shape[0]
    return ids[idx]
