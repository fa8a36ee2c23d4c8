"""Errors that the CLI turns into exit codes.

`UserError` (and subclasses) mean the user's input is wrong: the CLI prints
its one-line message on stderr and exits 2. Anything else is a bug: exit 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

V = TypeVar("V")


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is one line, printed as is."""


class ConfigError(UserError):
    """A configuration value is invalid.

    The message names the file, the dotted field path, the bad value and what
    is allowed: ``scenarios/x.yaml: model.top_k = 9: must be <= model.num_experts (8)``.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        field: str | None = None,
        value: Any = None,
        has_value: bool = True,
    ) -> None:
        self.reason = reason
        self.file = file
        self.field = field
        self.value = value
        self.has_value = has_value and field is not None
        super().__init__(self._format())

    def _format(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.field:
            parts.append(f"{self.field} = {_short(self.value)}" if self.has_value else self.field)
        parts.append(self.reason)
        return ": ".join(parts).replace("\n", " ")

    def with_file(self, file: str) -> ConfigError:
        return ConfigError(
            self.reason, file=file, field=self.field, value=self.value, has_value=self.has_value
        )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lookup(registry: Mapping[str, V], name: str, *, field: str, what: str) -> V:
    """``registry[name]``, or a ConfigError naming the field, the value and the valid names."""
    try:
        return registry[name]
    except KeyError:
        allowed = ", ".join(registry)
        raise ConfigError(f"unknown {what}; allowed: {allowed}", field=field, value=name) from None
