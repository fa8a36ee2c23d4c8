"""``calibrate()``: bench results in, a calibrated :class:`HardwareProfile` out.

Missing suites are not an error by default: the families they would fit are
priced from the base profile's spec values, and ``calibration.fallbacks``
says which and how. ``strict=True`` turns any missing family into one
:class:`UserError` line naming the suites to run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from moesim.calibrate import gpu, results
from moesim.calibrate.crossval import MIN_ROWS, family_error, heldout_predictions
from moesim.calibrate.families import FALLBACK, FAMILIES, Family, Parts
from moesim.calibrate.fit import noise_scale
from moesim.config.hardware import (
    Calibration,
    CalibrationSource,
    FamilyError,
    HardwareProfile,
)
from moesim.config.loader import validate
from moesim.costs import CostModel
from moesim.errors import UserError
from moesim.io import atomic_write_text, git_commit

#: ``progress(family_name)``: called as each family starts
Progress = Callable[[str], None]


@dataclass(frozen=True)
class CalibrationReport:
    """A calibrated profile, its per-family held-out error and what it was made from."""

    profile: HardwareProfile
    families: dict[str, dict[str, float]]  # name -> {"mape", "max_ape", "n"}
    files: list[Path]
    fallbacks: list[str] = field(default_factory=list)
    strategies: dict[str, dict[str, int]] = field(default_factory=dict)
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    noise: dict[str, float] = field(default_factory=dict)  # family -> typical timing spread

    def to_json(self, path: str | Path) -> dict[str, Any]:
        """The ``--json`` object: ``{"profile": PATH, "families": {...}}``."""
        return {"profile": str(path), "families": self.families}


def calibrate(
    paths: list[Path],
    *,
    base: HardwareProfile,
    name: str | None = None,
    strict: bool = False,
    strategies: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> CalibrationReport:
    """Fit every family the results cover, cross-validate it, and build the profile.

    ``strategies`` (family -> strategy, e.g. ``{"experts": "loop"}``) prices that
    family by one measured strategy instead of the fastest per shape.
    """
    start = time.perf_counter()
    df, metas, files = results.load(list(paths))
    forced = check_strategies(df, strategies or {})
    source = _source(df, metas, files, paths)
    fitted = _Fitted()
    for fam in FAMILIES:
        if progress is not None:
            progress(fam.name)
        fitted.add(fam, df, base, source, forced.get(fam.name))
    measured = _gpu_tables(df, base, source, progress)  # imported GPU tables (moesim import)
    fitted.errors.update(measured.errors)
    fitted.notes.extend(measured.notes)
    fallbacks = _fallbacks(fitted.missing, strict and not measured.errors, files)
    if measured.errors:
        fallbacks = [
            f"{f.name}: not in the measured tables; priced by {FALLBACK[f.name]}"
            for f, _ in fitted.missing
        ]
        source = source.model_copy(update={"measured_by": _measured_by(df)})
    if not fitted.errors and not fitted.notes:
        raise UserError(f"{_names(files)}: no suite has {MIN_ROWS}+ usable rows to fit")
    parts = fitted.parts.as_dict()
    parts["gemm"] = {**parts["gemm"], **measured.parts.gemm}
    parts["alltoall"] = {**gpu.alltoall_tiers(measured.parts), **parts["alltoall"]}
    cal = Calibration(
        source=source,
        dtype=_dtype(df),
        errors=fitted.errors,
        fallbacks=fallbacks,
        notes=fitted.notes,
        strategies=fitted.strategies,
        gemm_table=measured.parts.gemm_table,
        collectives=measured.parts.collectives,
        deepep=measured.parts.deepep,
        attention=measured.parts.attention,
        ranges=measured.parts.ranges,
        **parts,
    )
    profile = _profile(base, cal, name or f"{base.name}-calibrated", files)
    families = {k: e.model_dump() for k, e in fitted.errors.items()}
    elapsed = time.perf_counter() - start
    return CalibrationReport(
        profile, families, files, fallbacks, fitted.strategies, elapsed, fitted.notes, fitted.noise
    )


@dataclass
class _Fitted:
    """What the families fitted so far: calibration parts, errors, strategies, gaps."""

    parts: Parts = field(default_factory=Parts)
    errors: dict[str, FamilyError] = field(default_factory=dict)
    strategies: dict[str, dict[str, int]] = field(default_factory=dict)
    missing: list[tuple[Family, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    noise: dict[str, float] = field(default_factory=dict)

    def add(
        self,
        fam: Family,
        df: pd.DataFrame,
        base: HardwareProfile,
        src: CalibrationSource,
        strategy: str | None = None,
    ) -> None:
        rows, wins = fam.select(df, strategy)
        if len(rows) < MIN_ROWS:
            self.missing.append((fam, len(rows)))
            return
        noise = noise_scale(rows["median_s"], rows["p20_s"], rows["p80_s"])
        self.noise[fam.name] = noise
        self.parts.update(fam.fit(rows, noise, base))
        err = _crossval(fam, rows, noise, base, src)
        if err.n > 0:
            self.errors[fam.name] = err
        else:
            self.notes.append(f"{fam.name}: fitted on {len(rows)} rows; no shape to hold out")
        if wins:
            self.strategies[fam.name] = wins


def _gpu_tables(
    df: pd.DataFrame, base: HardwareProfile, source: CalibrationSource, progress: Progress | None
) -> gpu.GpuFit:
    if not df["suite"].isin(gpu.SUITES).any():
        return gpu.GpuFit()
    return gpu.fit_all(df, base, source, progress)


def _measured_by(df: pd.DataFrame) -> str:
    """``aiconfigurator_core 0.12.0: gemm trtllm 1.3.0rc20 (collected ...), ...``."""
    if "source" not in df or not (df["source"].astype(str) != "").any():
        return ""
    src = str(df["source"].astype(str).mode().iloc[0])
    parts = []
    for suite, g in df.groupby("suite"):
        first = g.iloc[0]
        parts.append(
            f"{suite} {first['framework']} {first['source_version']} ({first['collected']})"
        )
    return f"{src}: " + "; ".join(parts)


def check_strategies(df: pd.DataFrame, wanted: dict[str, str]) -> dict[str, str]:
    """``wanted`` if every family names a strategy measured for it, else a UserError."""
    families = {f.name: f for f in FAMILIES}
    for name, strategy in wanted.items():
        if name not in families:
            raise UserError(
                f"--strategy {name}={strategy}: unknown family; allowed: {', '.join(families)}"
            )
        measured = sorted(set(families[name].rows(df)["strategy"].astype(str)) - {""})
        if strategy not in measured:
            raise UserError(
                f"--strategy {name}={strategy}: not measured; measured: "
                f"{', '.join(measured) or '(none)'}"
            )
    return wanted


def _crossval(
    fam: Family, rows: pd.DataFrame, noise: float, base: HardwareProfile, src: CalibrationSource
) -> FamilyError:
    def cost_model(parts: Parts) -> CostModel:
        cal = Calibration(source=src, **parts.as_dict())
        return CostModel(base.model_copy(update={"calibration": cal}))

    pred = heldout_predictions(fam, rows, noise, base, cost_model)
    return family_error(pred, rows["median_s"].to_numpy(dtype=float))


def _fallbacks(missing: list[tuple[Family, int]], strict: bool, files: list[Path]) -> list[str]:
    if strict and missing:
        need = sorted({f.suite for f, _ in missing})
        what = ", ".join(f"{f.name} ({n} rows)" for f, n in missing)
        raise UserError(
            f"{_names(files)}: too few rows (< {MIN_ROWS}) for {what}; "
            f"run `moesim bench --suite {','.join(need)}` or drop --strict"
        )
    return [
        f"{f.name}: {n} rows in suite '{f.suite}' (< {MIN_ROWS}); priced by {FALLBACK[f.name]}"
        for f, n in missing
    ]


def _source(
    df: pd.DataFrame, metas: list[dict[str, Any]], files: list[Path], given: list[Path]
) -> CalibrationSource:
    meta = metas[0] if metas else {}
    prov: dict[str, Any] = meta["provenance"] if isinstance(meta.get("provenance"), dict) else {}
    threads = meta.get("threads")
    return CalibrationSource(
        results=[str(f) for f in files],
        commit=meta.get("commit") or prov.get("commit"),
        device=str(df["device_name"].iloc[0]),
        torch=meta.get("torch") or prov.get("torch"),
        threads=int(threads) if isinstance(threads, int | float) else None,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        calibrated_commit=git_commit(),
        quick=bool(meta["quick"]) if "quick" in meta else None,
    )


def _dtype(df: pd.DataFrame) -> str:
    """The dtype the GEMM curves were measured in (the most common one)."""
    gemm_rows = df[df["suite"].isin(["experts", "roofline"])]
    if gemm_rows.empty:  # imported tables: any but the attention core's (not a GEMM curve)
        gemm_rows = df[df["suite"] != "attention"]
    col = (gemm_rows if not gemm_rows.empty else df)["dtype"].astype(str)
    return str(col.mode().iloc[0])


def _profile(
    base: HardwareProfile, cal: Calibration, name: str, files: list[Path]
) -> HardwareProfile:
    data = base.model_dump(mode="json")
    data.update(
        name=name,
        description=f"{base.name} calibrated on {cal.source.device} by `moesim calibrate`",
        source=f"measured: {_names(files)}; spec values from {base.name} ({base.source})",
        calibration=cal.model_dump(mode="json"),
    )
    return validate(HardwareProfile, data, file=name)


def _names(files: list[Path]) -> str:
    return ", ".join(str(f) for f in files)


def write_profile(profile: HardwareProfile, path: str | Path) -> Path:
    """Write ``profile`` as YAML atomically; it loads back with the same schema."""
    header = (
        f"# Calibrated hardware profile written by `moesim calibrate` from\n"
        f"# {', '.join(profile.calibration.source.results) if profile.calibration else '?'}.\n"
        f"# Curves: y(x) linear in log(x) between points, flat outside. Do not edit by hand.\n"
    )
    body = yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False, width=100)
    return atomic_write_text(path, header + body)


#: spec profile for a device, by a word in its name (first match wins)
DEVICE_PROFILES = (
    ("H100", "h100-sxm"),
    ("H200", "h200-sxm"),
    ("H800", "h800-sxm"),
    ("A100", "a100-sxm-80gb"),
    ("B200", "b200"),
    ("MI300X", "mi300x"),
)


def peek_device(paths: list[Path]) -> tuple[str, str]:
    """``(device, device_name)`` of the results (e.g. ``("cpu", "AMD EPYC ...")``)."""
    df, _, _ = results.load(list(paths))
    return str(df["device"].iloc[0]), str(df["device_name"].iloc[0])


def base_profile_name(device: str, device_name: str) -> str:
    """The spec profile a calibration starts from: ``cpu-local`` for CPUs, else by name."""
    if device.startswith("cpu"):
        return "cpu-local"
    upper = device_name.upper()
    for word, name in DEVICE_PROFILES:
        if word in upper:
            return name
    known = ", ".join(name for _, name in DEVICE_PROFILES)
    raise UserError(f"no spec profile known for device {device_name!r}; pass --base (e.g. {known})")
