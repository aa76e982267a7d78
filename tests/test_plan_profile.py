"""profile() is FlopCounterMode's count; plan() predicts scale()'s cost exactly without building weights."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import efficientnet_b0, mobilenet_v2, mobilenet_v3_large, resnet50, resnet152

import compscale
from compscale.checkpoint import load, save


def test_profile_agrees_with_flop_counter_on_a_real_forward() -> None:
    model = mobilenet_v2().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 160, 160))
    p = compscale.profile(model, 160)
    assert p.macs * 2 == counter.get_total_flops()
    assert p.params == sum(t.numel() for t in model.parameters()) == 3_504_872


def test_profile_of_resnet50_is_the_papers_4_1_gmacs() -> None:
    assert compscale.profile(resnet50(), 224).macs == 4_089_184_256


def test_profile_runs_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = resnet50()
    assert compscale.profile(model, 224).macs == 4_089_184_256


@pytest.mark.parametrize(("factory", "kwargs"), [
    (resnet50, {"phi": 1}),
    (resnet50, {"phi": 2}),
    (mobilenet_v2, {"phi": 2}),
    (efficientnet_b0, {"width": 1.4, "depth": 1.8, "resolution": 380 / 224}),
    (mobilenet_v3_large, {"phi": 1}),
])
def test_plan_predicts_the_scaled_models_cost_exactly(factory, kwargs) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    plan = compscale.plan(model, **kwargs)
    scaled = compscale.scale(model, **kwargs)
    prof = compscale.profile(scaled, scaled.scaling.input_size)
    assert plan.input_size == scaled.scaling.input_size
    assert (plan.macs, plan.params, plan.acts) == (prof.macs, prof.params, prof.acts)
    assert [(s.blocks_before, s.blocks_after) for s in plan.stages] == [
        (s.blocks_before, s.blocks_after) for s in scaled.scaling.stages]


def test_planner_allocates_no_weights() -> None:
    planner = compscale.Planner(resnet152())
    assert {t.device.type for t in planner.traced.root.parameters()} == {"meta"}
    assert {t.device.type for t in planner.traced.root.buffers()} == {"meta"}
    rows = [planner.plan(phi) for phi in range(9)]
    assert [r.input_size[0] for r in rows] == [224, 256, 296, 344, 392, 448, 520, 592, 688]
    ratios = [r.macs / planner.base_macs for r in rows]
    assert ratios == sorted(ratios) and 0.8 < ratios[8] / 1.92027**8 < 1.5


@pytest.mark.slow
def test_plan_of_resnet152_phi_8_matches_a_meta_build() -> None:
    with torch.device("meta"):
        base = resnet152()
    plan = compscale.plan(base, phi=8)
    scaled = compscale.scale(base, phi=8)
    assert {t.device.type for t in scaled.parameters()} == {"meta"}
    prof = compscale.profile(scaled, plan.input_size)
    assert (plan.macs, plan.params, plan.acts) == (prof.macs, prof.params, prof.acts)


def test_checkpoint_rebuilds_and_reloads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    scaled = compscale.scale(mobilenet_v2(), phi=1)
    save(scaled, tmp_path / "m.pt", model="mobilenet_v2")
    again = load(tmp_path / "m.pt")
    assert again.scaling.input_size == (256, 256)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), scaled.eval()(x))


def test_half_precision_models_scale_and_profile() -> None:
    model = mobilenet_v2().half()
    scaled = compscale.scale(model, phi=1)
    assert {p.dtype for p in scaled.parameters()} == {torch.float16}
    assert compscale.profile(scaled, 256).macs == compscale.plan(mobilenet_v2(), phi=1).macs


def test_checkpoint_keeps_fixed_and_stages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    scaled = compscale.scale(resnet50(), depth=1.5, width=2, fixed=["fc"], stages=["layer1"])
    save(scaled, tmp_path / "r.pt", model="resnet50")
    again = load(tmp_path / "r.pt")
    assert len(again.layer1) == 5 and len(again.layer2) == 4


def test_checkpoint_refuses_what_it_cannot_record(tmp_path) -> None:  # type: ignore[no-untyped-def]
    scaled = compscale.scale(resnet50(), depth=2, stages=lambda p: p.startswith("layer1."))
    with pytest.raises(compscale.CompscaleError, match=r"stages=(.|\n)*Hint: save scaled.state_dict"):
        save(scaled, tmp_path / "r.pt", model="resnet50")
