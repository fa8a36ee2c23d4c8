"""Variants of one scenario: ``--vary key=v1,v2`` axes, their product, and validation.

A *key* is a dotted path into the scenario (``router.capacity_factor``) or a
short alias for one (``capacity_factor``): every scenario field whose last name
is unique in the scenario tree is its own alias, so ``top_k``, ``ep`` and
``tokens_per_gpu`` all work. ``hardware`` is a key like any other (the
scenario's ``hardware`` field), which is how ``--hardware a,b`` becomes an axis.
Values are YAML scalars: ``1``, ``1.25``, ``null``, ``true``, ``fp8``.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from moesim.config.loader import apply_overrides, validate
from moesim.config.scenario import Scenario
from moesim.errors import UserError

#: an axis: canonical dotted key and the values it takes, in order
Axis = tuple[str, tuple[Any, ...]]


@dataclass(frozen=True)
class Variant:
    """One point of the grid: ``values`` maps canonical dotted keys to values."""

    index: int
    values: dict[str, Any]

    def label(self) -> str:
        """``top_k=2, capacity_factor=1.25`` (short names), or ``base`` if nothing varies."""
        if not self.values:
            return "base"
        return ", ".join(f"{short_name(k)}={format_value(v)}" for k, v in self.values.items())


# -- keys ---------------------------------------------------------------------
@functools.cache
def scenario_keys() -> tuple[str, ...]:
    """Every settable dotted path of :class:`Scenario`, leaves and sub-sections."""
    return tuple(_walk(Scenario, ""))


def _walk(model: type[BaseModel], prefix: str) -> Iterable[str]:
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        sub = _submodel(info.annotation)
        if sub is not None:
            yield from _walk(sub, f"{path}.")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X`` or ``X | None`` (not inside lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if getattr(annotation, "__origin__", None) in (list, dict):
        return None
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


@functools.cache
def leaf_keys() -> tuple[str, ...]:
    keys = scenario_keys()
    return tuple(k for k in keys if not any(o.startswith(k + ".") for o in keys))


@functools.cache
def aliases() -> dict[str, str]:
    """Short name -> dotted path, for every leaf whose last name is unique."""
    by_last: dict[str, list[str]] = {}
    for key in leaf_keys():
        by_last.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    return {last: paths[0] for last, paths in by_last.items() if len(paths) == 1}


def short_name(key: str) -> str:
    """The alias of ``key`` if it has one, else ``key`` itself."""
    last = key.rsplit(".", 1)[-1]
    return last if aliases().get(last) == key else key


def canonical_key(key: str, *, flag: str = "--vary") -> str:
    """``top_k`` -> ``model.top_k``; an unknown key is a UserError naming the valid ones."""
    key = key.strip()
    if key in scenario_keys():
        return key
    if key in aliases():
        return aliases()[key]
    candidates = [*aliases(), *scenario_keys()]
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(
        f"{flag} {key!r}: unknown scenario key; {hint}valid keys: "
        f"{', '.join(sorted(aliases()))}, or their dotted paths "
        "(e.g. model.top_k, router.capacity_factor, parallel.ep)"
    )


# -- values -------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A YAML scalar: ``'1'`` -> 1, ``'null'`` -> None, ``'fp8'`` -> ``'fp8'``."""
    text = text.strip()
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    return value


def format_value(value: Any) -> str:
    """How a value reads in a label or table cell: ``None`` is ``null``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return str(value)


def parse_vary(text: str) -> Axis:
    """``'top_k=1,2,4'`` -> ``('model.top_k', (1, 2, 4))``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise UserError(
            f"--vary {text!r}: expected key=v1,v2[,...], e.g. --vary top_k=1,2,4 "
            "or --vary router.capacity_factor=1.0,1.25,null"
        )
    values = tuple(parse_value(v) for v in raw.split(","))
    return canonical_key(key), values


def hardware_axis(text: str) -> Axis:
    """``--hardware a,b`` -> the ``hardware`` axis."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise UserError(f"--hardware {text!r}: expected NAME[,NAME...] or a profile path")
    return "hardware", names


def check_axes(axes: Sequence[Axis], *, flag: str = "--vary") -> None:
    """Keys appear once and no key is inside another (``router`` and ``router.kind``)."""
    seen: list[str] = []
    for key, values in axes:
        if not values:
            raise UserError(f"{flag} {key}: needs at least one value")
        for other in seen:
            if key == other or key.startswith(other + ".") or other.startswith(key + "."):
                raise UserError(f"{flag} {key}: given twice (overlaps {other})")
        seen.append(key)


# -- grid -----------------------------------------------------------------------
def expand(axes: Sequence[Axis], linked: Sequence[Sequence[Axis]] = ()) -> list[Variant]:
    """The cartesian product of ``axes`` (first axis slowest) and of each linked group.

    A *linked* group is a list of axes of equal length that vary together
    (``ep=[8,16]`` with ``dp=[2,1]``): it contributes one dimension to the product.
    """
    dims: list[list[dict[str, Any]]] = [[{key: v} for v in values] for key, values in axes]
    for group in linked:
        lengths = {len(values) for _, values in group}
        if len(lengths) != 1:
            keys = ", ".join(k for k, _ in group)
            raise UserError(f"linked axes {keys}: need the same number of values, got {lengths}")
        n = lengths.pop()
        dims.append([{key: values[i] for key, values in group} for i in range(n)])
    variants = []
    for i, combo in enumerate(itertools.product(*dims)):
        values: dict[str, Any] = {}
        for part in combo:
            values.update(part)
        variants.append(Variant(i, values))
    return variants


def variant_scenario(
    base: Mapping[str, Any], variant: Variant, *, file: str | None = None
) -> Scenario:
    """``base`` (a scenario as plain JSON data) with the variant applied, validated."""
    overrides = [f"{key}={json.dumps(value)}" for key, value in variant.values.items()]
    data = apply_overrides(base, overrides)
    where = f"{file} (variant {variant.label()})" if file else f"variant {variant.label()}"
    return validate(Scenario, data, file=where)
