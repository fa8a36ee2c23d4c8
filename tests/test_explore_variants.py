"""Variant expansion, key aliases, value parsing and per-variant validation."""

from __future__ import annotations

import math

import pytest

from moesim.config.loader import load_scenario
from moesim.errors import ConfigError, UserError
from moesim.explore.stats import t_interval
from moesim.explore.variants import (
    Variant,
    aliases,
    canonical_key,
    check_axes,
    expand,
    format_value,
    hardware_axis,
    parse_value,
    parse_vary,
    variant_scenario,
)

TINY = "scenarios/tiny-cpu.yaml"

VARY_CASES = [
    ("top_k=1,2,4", ("model.top_k", (1, 2, 4))),
    ("capacity_factor=1.0,1.25,null", ("router.capacity_factor", (1.0, 1.25, None))),
    ("router.capacity_factor=2", ("router.capacity_factor", (2,))),
    ("ep=1,2,4", ("parallel.ep", (1, 2, 4))),
    ("dispatcher=alltoall,hierarchical", ("dispatcher", ("alltoall", "hierarchical"))),
    ("pad_to_capacity=true,false", ("router.pad_to_capacity", (True, False))),
    ("dispatch_dtype=fp8, bf16", ("model.dispatch_dtype", ("fp8", "bf16"))),
    ("workload.routing.zipf_exponent=0,1.5", ("workload.routing.zipf_exponent", (0, 1.5))),
]


@pytest.mark.parametrize(("text", "expected"), VARY_CASES)
def test_parse_vary(text: str, expected: tuple) -> None:
    assert parse_vary(text) == expected


def test_aliases_are_unique_last_names() -> None:
    a = aliases()
    assert a["top_k"] == "model.top_k"
    assert a["capacity_factor"] == "router.capacity_factor"
    assert a["ep"] == "parallel.ep"
    assert a["tokens_per_gpu"] == "workload.tokens_per_gpu"
    assert a["hardware"] == "hardware"
    assert len(set(a.values())) == len(a)


@pytest.mark.parametrize("bad", ["topk", "model.topk", "router.capacity", "foo.bar", "exprts"])
def test_bad_key_names_the_valid_keys(bad: str) -> None:
    with pytest.raises(UserError) as info:
        canonical_key(bad)
    msg = str(info.value)
    assert repr(bad) in msg and "valid keys" in msg
    assert "top_k" in msg and "capacity_factor" in msg and "ep" in msg
    assert "\n" not in msg


def test_bad_key_suggests_the_close_one() -> None:
    with pytest.raises(UserError, match="did you mean top_k"):
        canonical_key("topk")


@pytest.mark.parametrize("bad", ["top_k", "top_k=", "=1,2", "nothing"])
def test_malformed_vary(bad: str) -> None:
    with pytest.raises(UserError, match="--vary"):
        parse_vary(bad)


def test_overlapping_axes_are_rejected() -> None:
    with pytest.raises(UserError, match="given twice"):
        check_axes([("model.top_k", (1,)), ("model.top_k", (2,))])
    with pytest.raises(UserError, match="overlaps"):
        check_axes([("router", ({},)), ("router.kind", ("hash",))])


def test_expand_is_the_cartesian_product_first_axis_slowest() -> None:
    vs = expand([("model.top_k", (1, 2)), ("router.capacity_factor", (1.0, None, 2.0))])
    assert [v.values for v in vs] == [
        {"model.top_k": 1, "router.capacity_factor": 1.0},
        {"model.top_k": 1, "router.capacity_factor": None},
        {"model.top_k": 1, "router.capacity_factor": 2.0},
        {"model.top_k": 2, "router.capacity_factor": 1.0},
        {"model.top_k": 2, "router.capacity_factor": None},
        {"model.top_k": 2, "router.capacity_factor": 2.0},
    ]
    assert [v.index for v in vs] == list(range(6))
    assert vs[1].label() == "top_k=1, capacity_factor=null"


def test_expand_linked_axes_vary_together() -> None:
    vs = expand([("model.top_k", (1, 2))], [[("parallel.ep", (2, 4)), ("parallel.dp", (2, 1))]])
    assert [v.values for v in vs] == [
        {"model.top_k": 1, "parallel.ep": 2, "parallel.dp": 2},
        {"model.top_k": 1, "parallel.ep": 4, "parallel.dp": 1},
        {"model.top_k": 2, "parallel.ep": 2, "parallel.dp": 2},
        {"model.top_k": 2, "parallel.ep": 4, "parallel.dp": 1},
    ]
    with pytest.raises(UserError, match="same number of values"):
        expand([], [[("parallel.ep", (2, 4)), ("parallel.dp", (2,))]])


def test_expand_with_no_axes_is_the_base() -> None:
    (v,) = expand([])
    assert v.values == {} and v.label() == "base"


def test_variant_scenario_applies_and_validates() -> None:
    base = load_scenario(TINY).model_dump(mode="json")
    v = Variant(
        0, {"model.top_k": 4, "router.capacity_factor": None, "parallel.ep": 2, "parallel.tp": 2}
    )
    scn = variant_scenario(base, v, file=TINY)
    assert scn.model.top_k == 4 and scn.router.capacity_factor is None
    assert scn.parallel.ep == 2 and scn.parallel.tp == 2
    assert scn.model.hidden_size == 256  # untouched fields come from the base
    same = variant_scenario(base, Variant(0, {}), file=TINY)
    assert same == load_scenario(TINY)


def test_invalid_variant_names_file_variant_field_and_value() -> None:
    base = load_scenario(TINY).model_dump(mode="json")
    with pytest.raises(ConfigError) as info:
        variant_scenario(base, Variant(3, {"model.top_k": 32}), file=TINY)
    msg = str(info.value)
    assert TINY in msg and "top_k=32" in msg and "model.top_k = 32" in msg
    with pytest.raises(ConfigError, match=r"parallel\.ep = 3"):
        variant_scenario(base, Variant(0, {"parallel.ep": 3}), file=TINY)
    with pytest.raises(ConfigError, match=r"router\.kind"):
        variant_scenario(base, Variant(0, {"router.kind": "bogus"}), file=TINY)


def test_hardware_axis() -> None:
    assert hardware_axis("h100-sxm, b200") == ("hardware", ("h100-sxm", "b200"))
    with pytest.raises(UserError):
        hardware_axis(" , ")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", 1),
        ("1.5", 1.5),
        ("null", None),
        ("~", None),
        ("fp8", "fp8"),
        ("true", True),
        ("[", "["),
    ],
)
def test_parse_value_yaml_scalars(text: str, value: object) -> None:
    assert parse_value(text) == value


def test_format_value() -> None:
    assert [format_value(v) for v in (None, math.nan, 1.0, 1.25, True, 8, "x")] == [
        "null",
        "null",
        "1.0",
        "1.25",
        "true",
        "8",
        "x",
    ]


# -- stats --------------------------------------------------------------------
def test_t_interval_hand_computed() -> None:
    # mean 2, s = 1, n = 3: half width = t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051
    e = t_interval([1.0, 2.0, 3.0])
    assert e.mean == pytest.approx(2.0)
    assert e.half_width == pytest.approx(4.302652729749464 / math.sqrt(3))
    assert e.n == 3 and e.low < 2 < e.high


def test_t_interval_edge_cases() -> None:
    one = t_interval([5.0])
    assert (one.mean, one.half_width, one.n) == (5.0, 0.0, 1)
    same = t_interval([2.0, 2.0, 2.0, 2.0])
    assert same.half_width == 0.0
    assert t_interval([]).n == 0 and math.isnan(t_interval([]).mean)
    assert t_interval([1.0, math.nan, 3.0]).n == 2


def test_t_interval_covers_the_mean_about_95_percent() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    hits = sum(
        t_interval(rng.normal(10.0, 2.0, size=5)).overlaps(t_interval([10.0])) for _ in range(2000)
    )
    assert 0.93 < hits / 2000 < 0.97
