"""YAML loading with one-line errors, and ``--set a.b.c=value`` overrides."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from moesim.config.base import FieldError
from moesim.config.hardware import HardwareProfile
from moesim.config.keys import canonical_key, model_inside
from moesim.config.scenario import Scenario
from moesim.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

REPO_ROOT = Path(__file__).resolve().parents[2]


def profile_dirs() -> list[Path]:
    """Where hardware profile names are looked up, first match wins."""
    dirs = [Path.cwd() / "hardware_profiles", REPO_ROOT / "hardware_profiles"]
    extra = os.environ.get("MOESIM_PROFILES")
    if extra:
        dirs = [Path(p) for p in extra.split(os.pathsep)] + dirs
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


#: libyaml's safe loader where built (measured profiles are ~350 kB of numbers)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping safely; any problem is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("file not found (expected a YAML file)", file=str(path))
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_SAFE_LOADER)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"invalid YAML: {where}{problem}", file=str(path)) from None
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"cannot read file: {err}", file=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"top level must be a mapping of keys, got {type(data).__name__}", file=str(path)
        )
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``'router.capacity_factor=1.25'`` -> ``('router.capacity_factor', 1.25)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            "expected dotted.key=value, e.g. router.capacity_factor=1.25",
            field="--set",
            value=text,
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each ``dotted.key=value`` set."""
    out = _deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(out, key, value)
    return out


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set {key}: {where} is not a mapping", field=key, value=value)
        node = nxt
    node[parts[-1]] = value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def validate(model: type[M], data: Mapping[str, Any], *, file: str | None = None) -> M:
    """Build ``model`` from ``data``; a failure is one ConfigError naming field and value."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _to_config_error(model, data, err, file) from None


def _to_config_error(
    model: type[BaseModel], data: Any, err: ValidationError, file: str | None
) -> ConfigError:
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    ctx_err = (first.get("ctx") or {}).get("error")
    if isinstance(ctx_err, FieldError):
        field = ".".join([*loc, ctx_err.field] if ctx_err.field else loc)
        return ConfigError(ctx_err.reason, file=file, field=field, value=ctx_err.value)
    field = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return ConfigError(
            f"unknown key; allowed keys: {', '.join(allowed)}",
            file=file,
            field=field,
            has_value=False,
        )
    if first["type"] == "missing":
        return ConfigError("required field is missing", file=file, field=field, has_value=False)
    return ConfigError(first["msg"], file=file, field=field, value=first.get("input"))


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) model at ``loc``; list indices are skipped."""
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            return []
        current = model_inside(info.annotation, into_lists=True)
    return list(getattr(current, "model_fields", {}))


#: suffix of a measured profile (fitted to imported GPU tables) in ``calibrated/``
MEASURED_SUFFIX = "-measured"
#: suffix that names a spec profile explicitly where a measured one is shipped
SPEC_SUFFIX = "-spec"


def resolve_profile_path(name_or_path: str, *, relative_to: Path | None = None) -> Path:
    """A hardware profile given by name (``h100-sxm``) or path.

    Naming scheme: ``NAME`` is the measured profile
    ``calibrated/NAME-measured.yaml`` where one is shipped, else the spec
    profile ``NAME.yaml``; ``NAME-spec`` is always the spec profile and
    ``NAME-measured`` always the measured one.
    """
    candidates = [Path(name_or_path)]
    if relative_to is not None:
        candidates.append(relative_to / name_or_path)
    if not name_or_path.endswith((".yaml", ".yml")):
        spec = name_or_path.endswith(SPEC_SUFFIX)
        stem = name_or_path[: -len(SPEC_SUFFIX)] if spec else name_or_path
        for d in profile_dirs():
            if spec:
                candidates.append(d / f"{stem}.yaml")
                continue
            candidates.append(d / "calibrated" / f"{stem}{MEASURED_SUFFIX}.yaml")
        for d in profile_dirs():
            candidates += [d / f"{name_or_path}.yaml", d / "calibrated" / f"{name_or_path}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"no such hardware profile; known names: {', '.join(known_profiles()) or '(none)'}",
        field="hardware",
        value=name_or_path,
    )


def known_profiles() -> list[str]:
    """Every profile name; ``NAME-spec`` too where ``NAME`` resolves to a measured profile."""
    names: set[str] = set()
    for d in profile_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
        names.update(p.stem for p in (d / "calibrated").glob("*.yaml"))
    measured = {n[: -len(MEASURED_SUFFIX)] for n in names if n.endswith(MEASURED_SUFFIX)}
    names.update(f"{n}{SPEC_SUFFIX}" for n in measured if n in names)
    return sorted(names)


def spec_name(name: str) -> str:
    """``h200-sxm`` -> ``h200-sxm-spec`` where a measured profile shadows the plain name."""
    return f"{name}{SPEC_SUFFIX}" if measured_alias(name) else name


def measured_alias(name: str) -> bool:
    """Whether the plain name ``name`` resolves to a shipped measured profile."""
    if name.endswith((".yaml", ".yml", SPEC_SUFFIX, MEASURED_SUFFIX)):
        return False
    return any(
        (d / "calibrated" / f"{name}{MEASURED_SUFFIX}.yaml").is_file() for d in profile_dirs()
    )


def load_hardware(
    name_or_path: str, overrides: Iterable[str] = (), *, relative_to: Path | None = None
) -> HardwareProfile:
    path = resolve_profile_path(name_or_path, relative_to=relative_to)
    overrides = tuple(overrides)
    if not overrides:  # profiles are immutable: parse each file once per process
        stat = path.stat()
        return _load_profile_file(str(path), str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    data = apply_overrides(read_yaml(path), overrides)
    return validate(HardwareProfile, data, file=str(path))


@functools.lru_cache(maxsize=64)
def _load_profile_file(path: str, resolved: str, mtime_ns: int, size: int) -> HardwareProfile:
    """One parse per (file, version); ``path`` names the file in error messages."""
    return validate(HardwareProfile, read_yaml(resolved), file=path)


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Load and validate a scenario file, with ``--set`` overrides applied first.

    Override keys are dotted paths or their short aliases (``top_k=2`` is
    ``model.top_k=2``), resolved by :func:`moesim.config.keys.canonical_key`.
    """
    data = apply_overrides(read_yaml(path), scenario_overrides(overrides))
    data = resolve_hf_config(data, Path(path).parent, file=str(path))
    return validate(Scenario, data, file=str(path))


def scenario_overrides(overrides: Iterable[str]) -> list[str]:
    """``['top_k=2']`` -> ``['model.top_k=2']``: short keys resolved, unknown keys refused."""
    out = []
    for text in overrides:
        key, _ = parse_override(text)
        out.append(f"{canonical_key(key, flag='--set')}={text.partition('=')[2]}")
    return out


def resolve_hf_config(data: dict[str, Any], base: Path, *, file: str) -> dict[str, Any]:
    """Replace ``model.hf_config`` by the shapes of that Hugging Face config.json.

    The path is relative to the scenario file. Keys written next to it (and
    ``router`` keys) override what the config gives.
    """
    model = data.get("model")
    if not isinstance(model, dict) or "hf_config" not in model:
        return data
    from moesim.model.hf import read_hf_config

    rel = Path(str(model["hf_config"]))
    hf_path = rel if rel.is_absolute() else base / rel
    try:
        hf_model, hf_router = read_hf_config(hf_path)
    except ConfigError as err:
        raise (err if err.file else err.with_file(file)) from None
    own = {k: v for k, v in model.items() if k != "hf_config"}
    out = dict(data)
    out["model"] = _merge(hf_model, own)
    out["router"] = _merge(hf_router, data.get("router") or {})
    return out


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def load_pair(
    scenario_path: str | Path,
    overrides: Iterable[str] = (),
    hardware: str | None = None,
) -> tuple[Scenario, HardwareProfile]:
    """A scenario and its hardware profile, checked against each other."""
    scn = load_scenario(scenario_path, overrides)
    hw_name = hardware or scn.hardware
    try:
        hw = load_hardware(hw_name, relative_to=Path(scenario_path).parent)
    except ConfigError as err:
        raise err.with_file(str(scenario_path)) if err.file is None else err from None
    if hardware:
        scn = scn.model_copy(update={"hardware": hardware})
    check_pair(scn, hw, file=str(scenario_path))
    return scn, hw


def check_pair(scn: Scenario, hw: HardwareProfile, *, file: str | None = None) -> None:
    gpn = hw.node.gpus_per_node
    if scn.cluster.gpus_per_node > gpn:
        raise ConfigError(
            f"more GPUs per node than hardware profile {hw.name!r} has ({gpn})",
            file=file,
            field="cluster.gpus_per_node",
            value=scn.cluster.gpus_per_node,
        )
