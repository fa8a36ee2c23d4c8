"""Headline figures from hand-made rows."""

from __future__ import annotations

import pytest

from moesim.measure.results import to_frame
from moesim.measure.targets import target_figures


def _r(suite: str, op: str, strategy: str = "", **kw: object) -> dict:
    return {"suite": suite, "op": op, "strategy": strategy, "dtype": "fp32", **kw}


ROWS = [
    _r("dispatch", "permute", "sort", T=64, E=8, pct_of_ceiling=90.0),  # small T: ignored
    _r("dispatch", "permute", "sort", T=1024, E=8, pct_of_ceiling=40.0),
    _r("dispatch", "permute", "index_add", T=1024, E=8, pct_of_ceiling=60.0),
    _r("dispatch", "permute", "sort", T=1024, E=8, skew=1.2, pct_of_ceiling=99.0),  # skewed
    _r("dispatch", "unpermute", "sort", T=1024, E=8, pct_of_ceiling=30.0, status="oom"),
    _r("experts", "experts", "dense", T=256, D=8, F=16, E=1, K=2, achieved_TFLOPs=2.0),
    _r("experts", "experts", "grouped_mm", T=256, D=8, F=16, E=8, K=2, achieved_TFLOPs=1.8),
    _r("experts", "experts", "grouped_mm", T=256, D=8, F=16, E=64, K=2, achieved_TFLOPs=1.0),
    _r("experts", "experts", "grouped_mm", T=64, D=8, F=16, E=8, K=2, achieved_TFLOPs=0.1),
    _r("gating", "softmax_topk", T=512, D=8, E=8, pct_of_ceiling=25.0),
    _r("gating", "hash", T=512, D=8, E=8, pct_of_ceiling=80.0),
]


def test_target_figures_by_hand() -> None:
    t = target_figures(to_frame(ROWS))
    assert t["permute"] == {"pct_of_copy": 60.0, "strategy": "index_add", "T": 1024, "E": 8}
    assert "unpermute" not in t  # its only row was not ok
    assert t["grouped_vs_dense"] == {
        "pct_of_dense": pytest.approx(50.0),
        "strategy": "grouped_mm",
        "T": 256,
        "E": 64,
    }
    assert t["gating"] == {"x_of_roofline": 4.0, "T": 512, "D": 8, "E": 8}


def test_no_rows_no_figures() -> None:
    assert target_figures(to_frame([])) == {}
