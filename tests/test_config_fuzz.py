"""Random and mutated YAML documents: the loader returns a config or a ConfigError, nothing else."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.config import HardwareProfile, Scenario, load_hardware, load_scenario
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


def _load(tmp_path: Path, text: str, loader: Any) -> Any:
    """What the loader made of ``text``: a config object, or the ConfigError it raised.

    Anything else (another exception) propagates and fails the test.
    """
    path = tmp_path / "doc.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        return loader(str(path))
    except ConfigError as err:
        return err


def _assert_one_line_naming_the_file(err: ConfigError, tmp_path: Path) -> None:
    text = str(err)
    assert "\n" not in text and text.startswith(str(tmp_path / "doc.yaml") + ": "), text
    assert len(text) > len(str(tmp_path / "doc.yaml")) + 4  # and says what is wrong


FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(data=st.data(), value=values, delete=st.booleans())
def test_mutated_scenarios(tmp_path: Path, data: st.DataObject, value: Any, delete: bool) -> None:
    path = data.draw(st.sampled_from(_paths(BASE_SCENARIO)))
    doc = _mutate(BASE_SCENARIO, path, value, delete)
    out = _load(tmp_path, yaml.safe_dump(doc), load_scenario)
    if isinstance(out, ConfigError):
        _assert_one_line_naming_the_file(out, tmp_path)
    else:  # accepted: a scenario, and one that survives a round trip unchanged
        assert isinstance(out, Scenario)
        assert Scenario.model_validate(out.model_dump()) == out


@FUZZ
@given(data=st.data(), value=values, delete=st.booleans())
def test_mutated_profiles(tmp_path: Path, data: st.DataObject, value: Any, delete: bool) -> None:
    path = data.draw(st.sampled_from(_paths(BASE_PROFILE)))
    doc = _mutate(BASE_PROFILE, path, value, delete)
    out = _load(tmp_path, yaml.safe_dump(doc), load_hardware)
    if isinstance(out, ConfigError):
        _assert_one_line_naming_the_file(out, tmp_path)
    else:
        assert isinstance(out, HardwareProfile)
        assert HardwareProfile.model_validate(out.model_dump()) == out


def test_a_mutation_that_keeps_the_document_valid_is_accepted_as_written(tmp_path: Path) -> None:
    """The fuzz targets accept valid documents: one known-good mutation, loaded exactly."""
    doc = _mutate(BASE_SCENARIO, ("workload", "seed"), 7, delete=False)
    out = _load(tmp_path, yaml.safe_dump(doc), load_scenario)
    assert isinstance(out, Scenario) and out.workload.seed == 7
    bad = _mutate(BASE_SCENARIO, ("model", "top_k"), "eight", delete=False)
    err = _load(tmp_path, yaml.safe_dump(bad), load_scenario)
    assert isinstance(err, ConfigError) and "top_k" in str(err) and "eight" in str(err)


@FUZZ
@given(doc=values)
def test_random_documents(tmp_path: Path, doc: Any) -> None:
    """A random document of at most 8 leaves cannot hold a scenario's required sections."""
    out = _load(tmp_path, yaml.safe_dump(doc), load_scenario)
    assert isinstance(out, ConfigError)
    _assert_one_line_naming_the_file(out, tmp_path)


@FUZZ
@given(text=st.text(max_size=80))
def test_random_text(tmp_path: Path, text: str) -> None:
    out = _load(tmp_path, text, load_scenario)
    assert isinstance(out, ConfigError)
    _assert_one_line_naming_the_file(out, tmp_path)
