"""``moesim profiles``: whether each profile is measured, calibrated or spec, and from what."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from moesim.config.hardware import HardwareProfile
from moesim.report.tables import console


def profile_kind(hw: HardwareProfile) -> dict[str, Any]:
    """``{"kind": measured|calibrated|spec, "from": ..., "worst_mape": ...}`` of one profile."""
    cal = hw.calibration
    if cal is None:
        return {"kind": "spec", "from": hw.source, "worst_mape": None}
    worst = max((e.mape for e in cal.errors.values()), default=None)
    if cal.source.measured_by:
        return {"kind": "measured", "from": cal.source.measured_by, "worst_mape": worst}
    return {
        "kind": "calibrated",
        "from": f"moesim bench on {cal.source.device}",
        "worst_mape": worst,
    }


def print_sources(
    names: list[str], profiles: list[HardwareProfile], aliases: dict[str, str]
) -> None:
    table = Table(title="Measured or spec, and from what")
    for col in ("name", "kind", "worst held-out MAPE", "from"):
        table.add_column(col)
    for name, hw in zip(names, profiles, strict=True):
        info = profile_kind(hw)
        mape = "—" if info["worst_mape"] is None else f"{info['worst_mape']:.1%}"
        kind = info["kind"] + (f" (= {aliases[name]})" if name in aliases else "")
        table.add_row(name, kind, mape, str(info["from"]))
    console.print(table)
