"""The small CPU MoE trainer: every scheme trains, loads are consistent, the trace round-trips."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from moesim.cli import main
from moesim.measure.router_train import SCHEMES, TrainConfig, bias_update, train_runs, write_trace

TINY = TrainConfig(steps=3, layers=2, experts=8, top_k=2, d_model=16, d_ff=16, vocab=32,
                   batch=2, seq_len=8)  # fmt: skip


def test_bias_update_by_hand_in_torch() -> None:
    b = bias_update(torch.zeros(4), torch.tensor([4, 2, 1, 1]), 0.1)
    assert b.tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])


@pytest.fixture(scope="module")
def all_schemes() -> tuple[list[dict], list[dict]]:
    return train_runs(TINY, list(SCHEMES), [0])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_trains_and_records_consistent_loads(scheme: str, all_schemes) -> None:
    rows = [r for r in all_schemes[0] if r["scheme"] == scheme]
    run = next(r for r in all_schemes[1] if r["config"]["scheme"] == scheme)
    assert len(rows) == TINY.steps * TINY.layers
    T = TINY.batch * TINY.seq_len
    for r in rows:
        assert len(r["load"]) == TINY.experts
        if scheme == "expert_choice":  # each expert takes ceil(T·k/E) tokens
            assert r["load"] == [T * TINY.top_k // TINY.experts] * TINY.experts
        else:  # dropless token choice: every token's k assignments are counted
            assert sum(r["load"]) == T * TINY.top_k
    assert run["router"]["kind"] == replace(TINY, scheme=scheme).spec().kind


def test_bias_moves_under_the_bias_scheme_only(all_schemes) -> None:
    rows = all_schemes[0]
    bias = [r["bias_range"] for r in rows if r["scheme"] == "bias"]
    assert bias[0] == 0.0 and bias[-1] > 0.0
    assert all(r["bias_range"] == 0.0 for r in rows if r["scheme"] == "none")


def test_same_seed_same_loads() -> None:
    a, _ = train_runs(TINY, ["aux_loss"], [1])
    b, _ = train_runs(TINY, ["aux_loss"], [1])
    assert [r["load"] for r in a] == [r["load"] for r in b]


def test_trace_carries_runs_and_provenance(tmp_path: Path) -> None:
    rows, runs = train_runs(replace(TINY, steps=2), ["none"], [0])
    path = write_trace(tmp_path / "t.parquet", rows, runs)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"moesim"])
    assert meta["runs"][0]["run"] == "none-s0"
    assert {"moesim", "commit"} <= set(meta["provenance"])
    assert table.num_rows == 2 * TINY.layers


def test_cli_writes_a_trace_and_rejects_bad_input(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.parquet"
    args = ["train-router", "--schemes", "bias", "--steps", "2", "--layers", "1", "--experts", "8",
            "--batch", "2", "--seq-len", "8", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0 and out.is_file()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # the measured imbalance plot
    assert main(["train-router", "--schemes", "nope", "--out", str(out)]) == 2
    assert "allowed: none" in capsys.readouterr().err
    assert main(["train-router", "--top-k", "9", "--experts", "8", "--out", str(out)]) == 2
