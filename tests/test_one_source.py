"""One source for each fact: the modules that use a fact agree because they share it."""

from __future__ import annotations

import pytest

from moesim import phases
from moesim.calibrate.profile import DEVICE_PROFILES, base_profile_name
from moesim.errors import UserError


def test_run_and_calibrate_refuse_the_same_unknown_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` used to fall back to h100-sxm where `calibrate` refused: both refuse now."""
    torch = pytest.importorskip("torch")
    from moesim.commands import run

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Other GPU")
    with pytest.raises(UserError, match="pass --base"):
        run._base_profile(None, "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H800 SXM")
    assert run._base_profile(None, "cuda").name == base_profile_name("cuda", "NVIDIA H800")
    assert not hasattr(run, "GPU_PROFILES")
    assert ("H800", "h800-sxm") in DEVICE_PROFILES


def test_phase_lists_are_built_from_the_moe_layer_phases() -> None:
    """The hand-checkable order of one MoE layer, and every derived list in that order."""
    assert phases.MOE_LAYER_PHASES == (
        "gate",
        "permute",
        "dispatch",
        "experts",
        "combine",
        "unpermute",
    )
    assert phases.BACKWARD_PHASES[:6] == (
        "unpermute_bwd",
        "combine_bwd",
        "experts_bwd",
        "dispatch_bwd",
        "permute_bwd",
        "gate_bwd",
    )
    assert set(phases.COMPUTE_PHASES) == set(phases.MOE_LAYER_PHASES) - {"dispatch", "combine"}


def test_simulator_bench_and_reports_name_phases_from_one_list() -> None:
    pytest.importorskip("torch")
    from moesim.measure import ep_layer
    from moesim.report import validate_tables
    from moesim.simulate import result

    assert ep_layer.PHASES is phases.MOE_LAYER_PHASES
    assert validate_tables.PHASES is phases.MOE_LAYER_PHASES
    assert result.PHASES is phases.STEP_PHASES


def test_top1_kinds_live_in_the_router_config() -> None:
    pytest.importorskip("torch")
    from moesim.config.router import TOP1_KINDS
    from moesim.kernels import gating
    from moesim.measure.suites import gating as gating_suite

    assert gating._SINGLE is TOP1_KINDS and gating_suite._TOP1 is TOP1_KINDS


def test_set_and_vary_share_one_key_table() -> None:
    from moesim.config import keys
    from moesim.explore import variants

    assert variants.aliases is keys.aliases and variants.canonical_key is keys.canonical_key


def test_the_ep_layer_holds_its_experts_as_kernel_expert_weights() -> None:
    """One expert-weights holder: the EP layer's ranks take ExpertWeights.block()."""
    torch = pytest.importorskip("torch")
    from moesim.kernels.experts import ExpertWeights
    from moesim.measure.ep_layer import EPCase, make_weights

    g = torch.Generator().manual_seed(0)
    full = ExpertWeights(
        torch.randn(8, 4, 6, generator=g),
        torch.randn(8, 4, 6, generator=g),
        torch.randn(8, 6, 4, generator=g),
        b_down_ED=torch.randn(8, 4, generator=g),
    )
    blocks = [full.block(r, 4) for r in range(4)]
    assert [b.num_experts for b in blocks] == [2, 2, 2, 2]
    torch.testing.assert_close(torch.cat([b.w_down_EFD for b in blocks]), full.w_down_EFD)
    assert blocks[3].b_down_ED is not None
    torch.testing.assert_close(blocks[3].b_down_ED, full.b_down_ED[6:8])
    assert blocks[0].b_up_EF is None
    w = make_weights(EPCase(num_experts=8, top_k=2, tokens=4, hidden=4, ffn=6))
    assert isinstance(w.experts, ExpertWeights) and w.experts.num_experts == 8
