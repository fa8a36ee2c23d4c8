"""Synthetic loads: balanced, Zipf-skewed with cold experts at zero, uneven splits."""

from __future__ import annotations

import pytest
import torch

from moesim.config.router import RouterSpec
from moesim.kernels.gating import route
from moesim.measure.loads import (
    even_splits,
    skewed_logits_TE,
    uneven_splits,
    zipf_counts,
    zipf_weights,
)


def test_balanced_counts_differ_by_at_most_one() -> None:
    assert zipf_counts(10, 4, 0.0) == [3, 3, 2, 2]


def test_skewed_counts_are_floor_of_expectation_with_zero_tail() -> None:
    # weights 1/(e+1)^2 over 4 experts: 0.7024, 0.1756, 0.0780, 0.0439
    counts = zipf_counts(20, 4, 2.0)
    assert counts == [16, 3, 1, 0]  # floors 14, 3, 1, 0; remainder 2 to the head
    assert sum(zipf_counts(256, 16, 2.0)) == 256
    assert zipf_counts(256, 16, 2.0)[-1] == 0


def test_zipf_weights() -> None:
    w = zipf_weights(3, 1.0)
    assert w.tolist() == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    with pytest.raises(ValueError):
        zipf_weights(0, 1.0)


def test_skewed_logits_drive_a_real_router_to_the_zipf_load() -> None:
    logits = skewed_logits_TE(20_000, 4, 1.0, torch.Generator().manual_seed(0))
    load = route(logits, RouterSpec(kind="softmax_topk", top_k=1)).tokens_per_expert()
    share = (load / load.sum()).tolist()
    assert share == pytest.approx(zipf_weights(4, 1.0).tolist(), abs=0.02)
    flat = skewed_logits_TE(20_000, 4, 0.0, torch.Generator().manual_seed(0))
    load = route(flat, RouterSpec(kind="softmax_topk", top_k=2)).tokens_per_expert()
    assert (load / load.sum()).tolist() == pytest.approx([0.25] * 4, abs=0.02)


def test_splits() -> None:
    assert even_splits(6, 3) == [[2, 2, 2]] * 3
    with pytest.raises(ValueError):
        even_splits(5, 2)
    S = uneven_splits(12, 3, 1.0)  # shares 6/11, 3/11, 2/11 of 12
    assert S == [[7, 3, 2]] * 3 and all(sum(r) == 12 for r in S)
