"""Config loading: shipped files load, every cross-field rule gives one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moesim.config import load_hardware, load_scenario
from moesim.config.loader import apply_overrides, load_pair, parse_override, read_yaml
from moesim.config.router import ROUTER_KINDS, RouterSpec
from moesim.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((REPO / "scenarios").glob("*.yaml"))
PROFILES = sorted((REPO / "hardware_profiles").glob("*.yaml")) + sorted(
    (REPO / "hardware_profiles" / "calibrated").glob("*.yaml")
)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_shipped_scenario_loads_with_its_hardware(path: Path) -> None:
    scn, hw = load_pair(path)
    assert scn.model.top_k <= scn.model.num_experts
    p, n = scn.parallel, scn.cluster.num_gpus
    assert p.tp * p.cp * p.attention_dp(n) * p.pp == n == p.etp * p.ep * p.expert_dp(n) * p.pp
    assert hw.node.gpus_per_node >= scn.cluster.gpus_per_node


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_shipped_profile_loads(path: Path) -> None:
    hw = load_hardware(str(path))
    assert hw.gpu.hbm_GBps > 0
    assert hw.source


def test_shipped_scenarios_cover_the_issue_list() -> None:
    names = {p.stem for p in SCENARIOS}
    for needed in (
        "mixtral-8x7b",
        "qwen3-30b-a3b",
        "deepseek-v3-256",
        "deepseek-v3-2048",
        "switch-base-128-cf1p0",
        "switch-base-128-cf1p25",
        "switch-base-128-cf2p0",
        "gpt-oss-120b",
        "tiny-cpu",
    ):
        assert any(n.startswith(needed) for n in names), needed


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    return read_yaml(REPO / "scenarios" / "tiny-cpu.yaml")


# (override, field named in the message, words the message must contain)
BAD_SCENARIOS = [
    ("model.top_k=17", "model.top_k = 17", "must be <= num_experts (16)"),
    ("parallel.ep=3", "parallel.ep = 3", "must divide model.num_experts (16)"),
    ("parallel.dp=2", "parallel", "must equal cluster GPUs"),
    ("router.n_group=3", "router.topk_group = None", "n_group and topk_group must be set together"),
    ("router={n_group: 3, topk_group: 1}", "router.n_group = 3", "must divide num_experts (16)"),
    ("router={n_group: 4, topk_group: 5}", "router.topk_group = 5", "must be <= n_group (4)"),
    ("router={n_group: 16, topk_group: 1}", "router.topk_group = 1", "must be >= top_k"),
    ("router.kind=switch_top1", "model.top_k = 2", "must be 1 for router kind 'switch_top1'"),
    ("router.capacity_factor=0", "router.capacity_factor = 0", "greater than 0"),
    ("router.capacity_factor=-1.5", "router.capacity_factor = -1.5", "greater than 0"),
    ("router.kind=magic", "router.kind = 'magic'", "softmax_topk"),
    ("router.drop_policy=random", "router.drop_policy", "'probs' or 'position'"),
    ("model.dtype=fp4", "model.dtype = 'fp4'", "allowed: fp32, tf32, bf16, fp16, fp8"),
    ("model.dispatch_dtype=int4", "model.dispatch_dtype", "unknown dtype"),
    ("model.expert_recipe=fp8_block", "model.expert_recipe = 'fp8_block'", "needs dtype fp8"),
    ("model.colour=red", "model.colour", "unknown key; allowed keys: hidden_size"),
    ("routerr.kind=x", "routerr", "unknown key; allowed keys: name, hardware"),
    ("workload.routing.distribution=pareto", "workload.routing.distribution", "'zipf'"),
    ("workload.routing.distribution=trace", "workload.routing.trace", "required"),
    ("workload.tokens_per_gpu=0", "workload.tokens_per_gpu = 0", "greater than or equal to 1"),
    ("dispatcher=carrier_pigeon", "dispatcher", "'hierarchical'"),
    ("workload.stragglers=[{gpu: 9}]", "workload.stragglers.0.gpu = 9", "< number of GPUs (4)"),
    ("router.capacity_per=sequence", "router.sequence_length", "required"),
]


@pytest.mark.parametrize(("override", "field", "words"), BAD_SCENARIOS)
def test_bad_scenario_gives_one_line_naming_file_field_value(
    tmp_path: Path, override: str, field: str, words: str
) -> None:
    path = _write(tmp_path, apply_overrides(_base(), [override]))
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    assert field in msg, msg
    assert words in msg, msg


BAD_PROFILES = [
    ("node.scaleup.link_GBps=-5", "node.scaleup.link_GBps = -5", "greater than 0"),
    ("scaleout.latency_us=-1", "scaleout.latency_us = -1", "greater than or equal to 0"),
    ("gpu.gemm_efficiency=1.5", "gpu.gemm_efficiency = 1.5", "less than or equal to 1"),
    ("gpu.peak_tflops={fp4: 10}", "gpu.peak_tflops.fp4", "unknown dtype"),
    ("scaleout.topology=torus", "scaleout.topology", "'rail_optimized' or 'fat_tree'"),
    ("scaleout.oversubscription=0.5", "scaleout.oversubscription", "greater than or equal to 1"),
    ("gpu.hbm_GiBs=3", "gpu.hbm_GiBs", "unknown key; allowed keys: name, peak_tflops"),
]


@pytest.mark.parametrize(("override", "field", "words"), BAD_PROFILES)
def test_bad_profile_gives_one_line(override: str, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_hardware("h100-sxm-spec", [override])  # the spec sheet file
    msg = str(info.value)
    assert "\n" not in msg and "h100-sxm.yaml" in msg
    assert field in msg, msg
    assert words in msg, msg


def test_missing_file_and_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_scenario(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="hardware = 'tpu-v9': no such hardware profile; known"):
        load_pair(_write(tmp_path, apply_overrides(_base(), ["hardware=tpu-v9"])))


def test_too_many_gpus_per_node_for_the_profile(tmp_path: Path) -> None:
    data = apply_overrides(
        _base(), ["hardware=h100-sxm", "cluster.gpus_per_node=16", "parallel.ep=16"]
    )
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_node = 16: more GPUs per node"):
        load_pair(_write(tmp_path, data))


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "b.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"b.yaml: invalid YAML: line \d+, column \d+"):
        load_scenario(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_scenario(bad)


def test_overrides_parse_yaml_scalars_and_validate(tmp_path: Path) -> None:
    assert parse_override("router.capacity_factor=null") == ("router.capacity_factor", None)
    assert parse_override("a.b=1.25") == ("a.b", 1.25)
    scn = load_scenario(
        REPO / "scenarios" / "tiny-cpu.yaml", ["router.capacity_factor=1.25", "model.top_k=4"]
    )
    assert scn.router.capacity_factor == 1.25 and scn.model.top_k == 4
    with pytest.raises(ConfigError, match=r"--set = 'oops': expected dotted\.key=value"):
        parse_override("oops")
    with pytest.raises(ConfigError, match="name is not a mapping"):
        apply_overrides(_base(), ["name.x=1"])


def test_router_spec_combines_model_top_k() -> None:
    scn = load_scenario(REPO / "scenarios" / "deepseek-v3-256xh800.yaml")
    spec = scn.router_spec()
    assert isinstance(spec, RouterSpec)
    assert (spec.top_k, spec.n_group, spec.topk_group) == (8, 8, 4)
    assert spec.kind in ROUTER_KINDS
    assert scn.dispatch_dtype == "fp8" and scn.combine_dtype == "bf16"


def test_configs_are_frozen() -> None:
    scn = load_scenario(REPO / "scenarios" / "tiny-cpu.yaml")
    with pytest.raises(Exception, match="frozen"):
        scn.model.top_k = 3  # type: ignore[misc]
