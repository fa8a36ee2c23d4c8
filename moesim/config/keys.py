"""Scenario keys: the dotted paths users type, and their short aliases (one table).

A *key* is a dotted path into the scenario (``router.capacity_factor``) or a
short alias for one (``capacity_factor``): every scenario field whose last name
is unique in the scenario tree is its own alias, so ``top_k``, ``ep`` and
``tokens_per_gpu`` all work. ``--set``, ``--vary``, sweep-file ``axes:`` and
``set:``, and :mod:`moesim.api` overrides all resolve keys here, so a key that
works in one place works in all of them.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from moesim.config.scenario import Scenario
from moesim.errors import UserError


@functools.cache
def scenario_keys() -> tuple[str, ...]:
    """Every settable dotted path of :class:`Scenario`, leaves and sub-sections."""
    return tuple(_walk(Scenario, ""))


def _walk(model: type[BaseModel], prefix: str) -> Iterable[str]:
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path
        sub = model_inside(info.annotation)
        if sub is not None:
            yield from _walk(sub, f"{path}.")


def model_inside(annotation: Any, *, into_lists: bool = False) -> type[BaseModel] | None:
    """The pydantic model inside ``X`` or ``X | None`` (and ``list[X]`` if ``into_lists``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if not into_lists and getattr(annotation, "__origin__", None) in (list, dict):
        return None
    for arg in getattr(annotation, "__args__", ()):
        found = model_inside(arg, into_lists=into_lists)
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
