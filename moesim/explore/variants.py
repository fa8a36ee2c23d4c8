"""Variants of one scenario: ``--vary key=v1,v2`` axes, their product, and validation.

Keys and their short aliases live in :mod:`moesim.config.keys` (re-exported
here), the one table that ``--set`` uses too. ``hardware`` is a key like any other (the
scenario's ``hardware`` field), which is how ``--hardware a,b`` becomes an axis.
Values are YAML scalars: ``1``, ``1.25``, ``null``, ``true``, ``fp8``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from moesim.config.keys import aliases, canonical_key, leaf_keys, scenario_keys, short_name
from moesim.config.loader import apply_overrides, validate
from moesim.config.scenario import Scenario
from moesim.errors import UserError

__all__ = [
    "Axis",
    "Variant",
    "aliases",
    "canonical_key",
    "check_axes",
    "expand",
    "format_value",
    "hardware_axis",
    "leaf_keys",
    "parse_value",
    "parse_vary",
    "scenario_keys",
    "short_name",
    "variant_scenario",
]

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
