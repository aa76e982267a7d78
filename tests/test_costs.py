"""Costs beyond MACs: activations (pycls's conv output elements), strategies that reach a target on any counted
metric, the options shared by scale and plan, and measured latency as a target."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models import efficientnet_b0, mobilenet_v2, resnet18, resnet50

import compscale
from compscale.planning.strategy import Compound, Shares, fast, get_strategy


def hooked_conv_outputs(model: nn.Module, size: int) -> int:
    """Conv output elements of one image, counted by forward hooks on a real forward."""
    total = 0

    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("factory", [resnet50, mobilenet_v2, efficientnet_b0])
def test_profile_acts_are_the_conv_outputs_a_forward_hook_counts(factory) -> None:  # type: ignore[no-untyped-def]
    model = factory()
    assert compscale.profile(model, 224).acts == hooked_conv_outputs(model, 224)


def test_resnet50_has_pycls_11_1_m_activations() -> None:
    assert compscale.profile(resnet50(), 224).acts == 11_113_984


def test_plan_acts_equal_the_scaled_models() -> None:
    plan = compscale.plan(resnet50(), phi=2)
    scaled = compscale.scale(resnet50(), phi=2)
    assert plan.input_size == scaled.scaling.input_size == (296, 296)
    assert plan.acts == compscale.profile(scaled, 296).acts == 34_697_152
    assert "activations 11.11 M -> 34.70 M (x3.12)" in str(plan)


def test_fast_strategy_at_4x_macs_grows_activations_less_than_compound() -> None:
    base = compscale.profile(resnet50(), 224)
    fast_net = compscale.scale(resnet50(), target_macs=4 * base.macs, strategy="fast")
    got = compscale.profile(fast_net, fast_net.scaling.input_size)
    assert got.macs == pytest.approx(4 * base.macs, rel=0.03)
    assert got.acts / base.acts <= 2.5
    assert fast_net.scaling.multipliers.strategy == "fast"
    assert fast_net.scaling.width > 1.6 > 1.2 > fast_net.scaling.depth  # width-dominant
    compound = compscale.plan(resnet50(), target_macs=4 * base.macs)
    assert compound.macs == pytest.approx(4 * base.macs, rel=0.03)
    assert compound.acts / base.acts >= 2.8


def test_target_acts_lands_within_3_percent() -> None:
    planner = compscale.Planner(mobilenet_v2())
    for strategy in ("compound", "fast", "width"):
        p = planner.solve(2 * planner.base_acts, "acts", strategy=strategy)
        assert p.acts == pytest.approx(2 * planner.base_acts, rel=0.03), strategy
    scaled = compscale.scale(mobilenet_v2(), target_acts=2 * planner.base_acts, strategy="fast")
    assert compscale.profile(scaled, scaled.scaling.input_size).acts == pytest.approx(2 * planner.base_acts, rel=0.03)


def test_solve_takes_any_metric_of_the_plan() -> None:
    planner = compscale.Planner(resnet18())
    p = planner.solve(2 * planner.base_params, "params", strategy="width")
    assert p.params == pytest.approx(2 * planner.base_params, rel=0.03)
    table = lambda plan: plan.macs / 1e9 * 3.0  # noqa: E731 - a user's latency table: ms per GMAC
    q = planner.solve(10.0, table)
    assert table(q) == pytest.approx(10.0, rel=0.03)


@pytest.mark.parametrize("strategy", ["compound", "fast", "depth", "width", "resolution", "dwr", "d1_w8_r1"])
def test_every_strategy_means_about_2_to_the_phi_macs(strategy: str) -> None:
    d, w, r = get_strategy(strategy).multipliers(3)
    factor = (1.2 * 1.1**2 * 1.15**2) ** 3 if strategy == "compound" else 8.0  # compound: 1.92 ** 3 = 7.08
    assert d * w**2 * r**2 == pytest.approx(factor)


def test_strategies_by_name_and_configured() -> None:
    assert get_strategy("fast") == fast(0.8) == Shares(1, 8, 1) == get_strategy("d1_w8_r1")
    assert [round(x, 4) for x in fast().multipliers(2)] == [round(4**0.1, 4), round(4**0.4, 4), round(4**0.05, 4)]
    assert fast(0.5).multipliers(2)[1] == pytest.approx(2**0.5)
    assert get_strategy("width").multipliers(2) == (1.0, 2.0, 1.0)
    assert get_strategy(Compound(1.3, 1.1, 1.1)).multipliers(1) == (1.3, 1.1, 1.1)
    with pytest.raises(ValueError, match="unknown strategy 'slow'"):
        get_strategy("slow")
    with pytest.raises(TypeError, match="strategy must be a name"):
        get_strategy(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 0 and 1"):
        fast(1.5)
    with pytest.raises(ValueError, match="not all 0"):
        Shares(0, 0, 0)


def test_explicit_multipliers_override_the_strategy_and_negative_phi_scales_down() -> None:
    p = compscale.plan(resnet18(), phi=2, strategy="fast", depth=1.0)
    assert p.depth == 1.0 and p.width == pytest.approx(4**0.4)
    down = compscale.plan(resnet18(), phi=-1, strategy="fast")
    assert down.macs < down.base_macs and down.width < 1
    assert "phi=2 (fast)" in str(p)


def test_fixed_works_with_a_target_and_plan_agrees_with_scale() -> None:
    kwargs = {"width": 1.5, "fixed": ["layer4.1.conv2"]}
    plan = compscale.plan(resnet18(), **kwargs)
    scaled = compscale.scale(resnet18(), **kwargs)
    prof = compscale.profile(scaled, 224)
    # the stage keeps its width, its first block's conv1 included (a basic-block stage has one width); the
    # stage before it is scaled
    assert scaled.layer4[1].conv2.out_channels == 512 and scaled.layer4[0].conv1.out_channels == 512
    assert scaled.layer3[0].conv1.out_channels == 384
    assert (plan.macs, plan.params, plan.acts) == (prof.macs, prof.params, prof.acts)
    targeted = compscale.scale(resnet18(), target_macs=2 * plan.base_macs, strategy="width",
                               fixed=["layer4.1.conv2"])
    assert targeted.layer4[1].conv2.out_channels == 512
    assert compscale.profile(targeted, 224).macs == pytest.approx(2 * plan.base_macs, rel=0.03)


def test_options_are_one_object_shared_by_plan_scale_and_checkpoint() -> None:
    opts = compscale.ScaleOptions.make(input_size=160, stages=["layer3"])
    planner = compscale.Planner(resnet18(), opts)
    assert planner.options is opts and planner.plan(1).options is opts
    scaled = compscale.scale(resnet18(), depth=2, input_size=160, stages=["layer3"])
    assert scaled.scaling.options == opts
    with pytest.raises(TypeError, match="not both"):
        compscale.Planner(resnet18(), opts, input_size=224)
    with pytest.raises(ValueError, match="give one target"):
        compscale.scale(resnet18(), target_macs=1e9, target_acts=1e6)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2)))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_target_latency_measures_candidates_and_records_the_figure() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = compscale.latency(Tiny(), 32, min_run_time=0.05, threads=1)
        scaled = compscale.scale(Tiny(), input_size=32, target_latency=3 * base.median, strategy="width")
    finally:
        torch.set_num_threads(threads)
    lat = scaled.scaling.latency
    assert lat is not None and lat > 0
    assert scaled.scaling.width > 1.0  # a slower network than the base, along width alone
    assert math.isfinite(lat)
    with pytest.raises(ValueError, match="positive number of seconds"):
        compscale.plan(Tiny(), input_size=32, target_latency=-1.0)


class ReadsWidth(nn.Module):
    """A forward that reads a layer's width as a Python number (fx bakes it into the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.adaptive_avg_pool2d(self.c1(x), 2)
        return self.fc(y.reshape(y.shape[0], self.c1.out_channels * 4))


def test_a_width_the_forward_reads_is_verified_by_tracing_again() -> None:
    scaled = compscale.scale(ReadsWidth(), width=2, input_size=16)
    assert scaled.c1.out_channels == 32 and scaled.fc.in_features == 128
    with torch.no_grad():
        assert scaled(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_vary_searches_its_multiplier_and_a_search_needs_a_free_dimension() -> None:
    planner = compscale.Planner(resnet18())
    p = planner.solve(2 * planner.base_macs, vary="width", width=1.5)  # as before: vary's multiplier is searched
    assert p.macs == pytest.approx(2 * planner.base_macs, rel=0.03) and p.depth == 1.0
    with pytest.raises(ValueError, match="nothing to search"):
        planner.solve(2 * planner.base_macs, strategy="width", width=1.3)
    with pytest.warns(DeprecationWarning, match="the second argument is now the metric"):
        q = planner.solve(2 * planner.base_macs, "width")
    assert q.depth == 1.0 and q.resolution == 1.0


def test_an_unreachable_target_warns_and_gives_the_closest_plan() -> None:
    planner = compscale.Planner(resnet18())
    with pytest.warns(UserWarning, match="closest to 1 macs along strategy 'depth' gives .* out of reach"):
        p = planner.solve(1.0, strategy="depth")
    assert p.macs is not None and p.macs < planner.base_macs


def test_latency_search_steps_stay_near_what_was_measured() -> None:
    from compscale.latency_search import _next_phi

    assert -0.5 <= _next_phi({0.0: 1e-4, 2.5: 1.02e-4}, 3e-4) <= 4.5  # flat latency: no jump to phi = 139
    assert 0.0 < _next_phi({0.0: 1e-3, 2.0: 4e-3}, 2e-3) < 2.0  # bracketed: stays inside


def test_plans_keep_the_other_inputs_as_shapes_and_compare() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8 + 4, 2)

        def forward(self, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cat([self.conv(x).mean((2, 3)), extra], 1))

    inputs = (torch.randn(1, 3, 16, 16), torch.randn(1, 4))
    a = compscale.scale(TwoInputs(), width=2, example_inputs=inputs)
    b = compscale.scale(TwoInputs(), width=2, example_inputs=inputs)
    assert a.scaling == b.scaling
    assert [t.device.type for t in a.scaling.options.extra_inputs] == ["meta"]


def test_bad_strategy_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="must be a number"):
        fast(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha must be > 0"):
        compscale.plan(resnet18(), phi=1, strategy="fast", alpha=-1)
