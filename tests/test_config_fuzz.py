"""Random and mutated YAML documents: the loader returns a config or a ConfigError, nothing else."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.config import load_hardware, load_scenario
from moesim.config.loader import read_yaml
from moesim.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BASE_SCENARIO = read_yaml(REPO / "scenarios" / "deepseek-v3-256xh800.yaml")
BASE_PROFILE = read_yaml(REPO / "hardware_profiles" / "h100-sxm.yaml")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8), inner, max_size=3),
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, child in node.items():
            out += _paths(child, (*prefix, key))
    return out


def _mutate(doc: dict[str, Any], path: tuple[str, ...], value: Any, delete: bool) -> dict:
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return out


def _load_expecting_config_or_error(tmp_path: Path, text: str, loader: Any) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        loader(str(path))
    except ConfigError as err:
        assert "\n" not in str(err)


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data(), value=values, delete=st.booleans())
def test_mutated_scenarios(tmp_path: Path, data: st.DataObject, value: Any, delete: bool) -> None:
    path = data.draw(st.sampled_from(_paths(BASE_SCENARIO)))
    doc = _mutate(BASE_SCENARIO, path, value, delete)
    _load_expecting_config_or_error(tmp_path, yaml.safe_dump(doc), load_scenario)


@FUZZ
@given(data=st.data(), value=values, delete=st.booleans())
def test_mutated_profiles(tmp_path: Path, data: st.DataObject, value: Any, delete: bool) -> None:
    path = data.draw(st.sampled_from(_paths(BASE_PROFILE)))
    doc = _mutate(BASE_PROFILE, path, value, delete)
    _load_expecting_config_or_error(tmp_path, yaml.safe_dump(doc), load_hardware)


@FUZZ
@given(doc=values)
def test_random_documents(tmp_path: Path, doc: Any) -> None:
    _load_expecting_config_or_error(tmp_path, yaml.safe_dump(doc), load_scenario)


@FUZZ
@given(text=st.text(max_size=80))
def test_random_text(tmp_path: Path, text: str) -> None:
    _load_expecting_config_or_error(tmp_path, text, load_scenario)
