"""Cost-targeted scaling: land on a MACs budget, compound or one dimension at a time."""

from __future__ import annotations

import pytest
from torchvision.models import mobilenet_v2, resnet50

import compscale

# Two cases by default (compound on a ResNet, width-only on a MobileNet); all eight with `pytest -m slow`.
CASES = [
    pytest.param(factory, factor, vary, marks=() if (factory, factor, vary) in
                 {(resnet50, 4, "phi"), (mobilenet_v2, 2, "width")} else pytest.mark.slow,
                 id=f"{vary}-{factor}-{factory.__name__}")
    for vary in ("phi", "width") for factor in (2, 4) for factory in (resnet50, mobilenet_v2)
]


@pytest.mark.parametrize(("factory", "factor", "vary"), CASES)
def test_scale_lands_within_3_percent_of_the_target(factory, factor: int, vary: str) -> None:  # type: ignore[no-untyped-def]
    base = factory()
    target = factor * compscale.profile(base, 224).macs
    scaled = compscale.scale(base, target_macs=target, vary=vary)
    got = compscale.profile(scaled, scaled.scaling.input_size).macs
    assert got == pytest.approx(target, rel=0.03)
    if vary == "width":
        assert scaled.scaling.depth == 1.0 and scaled.scaling.resolution == 1.0


def test_width_only_at_the_compound_models_cost_is_one_call() -> None:
    compound = compscale.plan(resnet50(), phi=1)
    width_only = compscale.plan(resnet50(), target_macs=compound.macs, vary="width")
    assert width_only.depth == 1.0 and width_only.input_size == (224, 224)
    assert width_only.macs == pytest.approx(compound.macs, rel=0.03)


def test_target_macs_and_phi_are_exclusive() -> None:
    with pytest.raises(ValueError, match="give no phi"):
        compscale.scale(resnet50(), phi=1, target_macs=8e9)
    with pytest.raises(ValueError, match="vary must be one of"):
        compscale.plan(resnet50(), target_macs=8e9, vary="height")
