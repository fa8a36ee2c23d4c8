"""Shared pieces of the config models: a strict frozen base and field errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

#: bytes per element of every dtype a config may name
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "tf32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
}
KNOWN_DTYPES = tuple(DTYPE_BYTES)


class FieldError(ValueError):
    """Raised inside validators: a cross-field rule failed for ``field`` (dotted,
    relative to the model that raised it). The loader turns it into a
    one-line :class:`moesim.errors.ConfigError`."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field} = {value!r}: {reason}")


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


def check_dtype(field: str, value: str) -> str:
    if value not in DTYPE_BYTES:
        raise FieldError(field, value, f"unknown dtype; allowed: {', '.join(KNOWN_DTYPES)}")
    return value
