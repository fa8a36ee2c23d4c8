"""Bench results to a calibrated profile file: the one bench -> calibrate workflow.

``moesim calibrate``, ``moesim run`` and ``moesim validate --ep-world`` all go
through :func:`calibrate_to`: choose the spec profile the results' device
starts from (:func:`base_for`, by :data:`moesim.calibrate.profile.DEVICE_PROFILES`),
fit it (:func:`moesim.calibrate.calibrate`) and write it atomically.
Torch-free, like the rest of :mod:`moesim.calibrate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moesim.calibrate.profile import (
    CalibrationReport,
    base_profile_name,
    calibrate,
    peek_device,
    write_profile,
)
from moesim.config.hardware import HardwareProfile
from moesim.config.loader import load_hardware, spec_name
from moesim.errors import UserError


def base_for(paths: Sequence[Path], base: str | HardwareProfile | None = None) -> HardwareProfile:
    """``base`` (a profile, name or path), or the spec profile of the results' device.

    The device's default is its spec profile even where a measured one shadows
    the plain name (:func:`spec_name`). An unknown GPU is a UserError asking for
    ``--base``.
    """
    if isinstance(base, HardwareProfile):
        return base
    return load_hardware(base or spec_name(base_profile_name(*peek_device(list(paths)))))


def calibrate_to(
    paths: Sequence[Path],
    out: Path,
    *,
    base: str | HardwareProfile | None = None,
    name: str | None = None,
    strict: bool = False,
    strategies: dict[str, str] | None = None,
) -> CalibrationReport:
    """Calibrate ``base`` (default: by device) from ``paths`` and write the profile to ``out``.

    ``name`` defaults to ``out``'s stem. An unwritable ``out`` is a UserError.
    """
    if out.suffix not in (".yaml", ".yml"):
        raise UserError(f"--out = {str(out)!r}: must be a .yaml file")
    report = calibrate(
        list(paths),
        base=base_for(paths, base),
        name=name or out.stem,
        strict=strict,
        strategies=strategies,
    )
    try:
        write_profile(report.profile, out)
    except OSError as err:
        raise UserError(f"--out = {str(out)!r}: cannot write ({err.strerror or err})") from None
    return report
