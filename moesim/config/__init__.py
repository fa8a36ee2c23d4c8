"""Validated configuration: hardware profiles, scenarios and router specs."""

from moesim.config.base import DTYPE_BYTES, KNOWN_DTYPES, FieldError
from moesim.config.hardware import Calibration, Curve, HardwareProfile
from moesim.config.loader import (
    apply_overrides,
    known_profiles,
    load_hardware,
    load_pair,
    load_scenario,
    read_yaml,
    validate,
)
from moesim.config.router import ROUTER_KINDS, RouterConfig, RouterSpec
from moesim.config.scenario import Scenario

__all__ = [
    "DTYPE_BYTES",
    "KNOWN_DTYPES",
    "ROUTER_KINDS",
    "Calibration",
    "Curve",
    "FieldError",
    "HardwareProfile",
    "RouterConfig",
    "RouterSpec",
    "Scenario",
    "apply_overrides",
    "known_profiles",
    "load_hardware",
    "load_pair",
    "load_scenario",
    "read_yaml",
    "validate",
]
