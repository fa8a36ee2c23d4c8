"""Routing loads from the real router on synthetic hidden states (``distribution: router``).

The simulator is torch-free and imports this module lazily (``importlib``), so
this is the one torch-backed load source. Legend: T = tokens, D = hidden
size, E = experts, K = top-k.

Hidden states are ``x_TD = mu_D + N(0, 1)``, where the shared mean ``mu_D``
(norm ``0.5 sqrt(D)``) stands in for the anisotropy of real hidden states
and gives the router a preference, and the router weight is
``N(0, 1/D)`` per layer: the loads come out of :func:`moesim.kernels.gating.route`
with the scenario's router exactly as a model would route. At most
:data:`MAX_UNIQUE_TOKENS` distinct tokens are routed per (layer, micro-batch)
and tiled to the requested count, to bound the cost.
"""

from __future__ import annotations

import numpy as np
import torch

from moesim.config.scenario import Scenario
from moesim.kernels.gating import route

MAX_UNIQUE_TOKENS = 16384


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def router_ids(
    scn: Scenario, layer: int, mb: int, n_tokens: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(expert_ids [n, K] int64, weights [n, K] float64)`` for ``n_tokens`` tokens.

    Capacity is *not* applied here (the simulator applies it in numpy), so the
    router runs dropless.
    """
    D, E = scn.model.hidden_size, scn.model.num_experts
    spec = scn.router_spec().model_copy(update={"capacity_factor": None})
    g_layer = _generator(seed, 7, layer)
    mu_D = torch.randn(D, generator=g_layer)
    mu_D = mu_D / mu_D.norm() * 0.5 * D**0.5
    w_DE = torch.randn(D, E, generator=g_layer) / D**0.5
    n = min(n_tokens, MAX_UNIQUE_TOKENS)
    g_tok = _generator(seed, 8, layer, mb)
    with torch.no_grad():
        x_TD = mu_D + torch.randn(n, D, generator=g_tok)
        r = route(x_TD @ w_DE, spec, generator=g_tok)
    ids = r.expert_ids_TK.numpy().astype(np.int64)
    weights = r.weights_TK.double().numpy()
    reps = -(-n_tokens // n)
    return np.tile(ids, (reps, 1))[:n_tokens], np.tile(weights, (reps, 1))[:n_tokens]
