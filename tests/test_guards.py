"""One set of limits (compscale.planning.budget) for every path: max_params before anything is built, by scale, every
search, the planner and the command line; |phi|, tiny widths and divisors refused where their message says."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
from torchvision.models import resnet18

import compscale
from compscale.cli import main
from compscale.planning.budget import PHI_LIMIT


@pytest.fixture(scope="module")
def r18() -> compscale.Planner:
    return compscale.Planner(resnet18(num_classes=10), input_size=64)


@pytest.mark.parametrize("phi", [-100, -20.5, 20.5, 1000])
def test_phi_beyond_the_stated_range_is_refused_as_the_message_says(phi: float) -> None:
    with pytest.raises(ValueError, match=r"phi=\S+ is out of range: give a phi between about -20 and 20"):
        compscale.scale(resnet18(), phi=phi)
    with pytest.raises(ValueError, match="between about -20 and 20"):
        compscale.plan(resnet18(), phi=phi)


@pytest.mark.parametrize("phi", [-PHI_LIMIT, PHI_LIMIT])
def test_phi_at_the_limit_is_planned(r18: compscale.Planner, phi: float) -> None:
    p = r18.plan(phi)
    assert p.multipliers.phi == phi and (p.params or 0) > 0


@pytest.mark.parametrize("width", [1e-9, 1e-4, 0.007])
def test_a_width_that_collapses_every_group_to_the_floor_is_refused(width: float) -> None:
    """resnet18's widest group has 512 channels: below 4/512 every group would be make_divisible's 8."""
    match = r"width=\S+ takes the widest channel group \(512 channels\).*at least 0\.0078"
    with pytest.raises(ValueError, match=match):
        compscale.scale(resnet18(), width=width, input_size=64)
    with pytest.raises(ValueError, match="width="):
        compscale.plan(resnet18(), width=width, input_size=64)


def test_a_small_width_above_the_floor_still_scales(r18: compscale.Planner) -> None:
    widths = {g.after for g in r18.plan(width=0.05).groups if g.before != g.after}
    assert min(widths) == 8 and max(widths) >= 24  # 512 * 0.05 = 25.6: the floor for some groups, not for all


@pytest.mark.parametrize("divisor, size", [(1000, 224), (65, 64), (300, (224, 256))])
def test_a_divisor_larger_than_the_input_is_refused(divisor: int, size: int | tuple[int, int]) -> None:
    with pytest.raises(ValueError, match=rf"resolution_divisor={divisor} is larger than the input size"):
        compscale.scale(resnet18(), phi=1, input_size=size, resolution_divisor=divisor)
    with pytest.raises(ValueError, match="resolution_divisor"):
        compscale.plan(resnet18(), phi=1, input_size=size, resolution_divisor=divisor)


def test_a_divisor_up_to_the_input_size_is_kept() -> None:
    assert compscale.plan(resnet18(), resolution=1.15, resolution_divisor=224).input_size == (224, 224)


@pytest.mark.parametrize("metric", ["macs", "acts"])
def test_counted_searches_respect_max_params(r18: compscale.Planner, metric: str) -> None:
    target = getattr(r18.plan(3), metric)
    with pytest.raises(compscale.TooLargeError, match="more than max_params=12,000,000"):
        r18.solve(target, metric, max_params=12_000_000)  # type: ignore[arg-type]
    with pytest.raises(compscale.TooLargeError, match="max_params"):
        compscale.scale(resnet18(num_classes=10), input_size=64, max_params=12_000_000, **{f"target_{metric}": target})
    assert r18.solve(target, metric, max_params=10**9).params == r18.plan(3).params  # type: ignore[arg-type]


def test_the_planner_refuses_a_plan_beyond_max_params() -> None:
    with pytest.raises(compscale.TooLargeError, match="more than max_params=1,000,000"):
        compscale.plan(resnet18(), phi=1, max_params=1_000_000)
    assert compscale.plan(resnet18(), phi=1).params  # no limit without max_params: a plan allocates nothing


@pytest.mark.parametrize("value, error", [(-1, ValueError), (0, ValueError), (1.5, TypeError), ("x", TypeError)])
def test_a_bad_max_params_is_named(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_params"):
        compscale.plan(resnet18(), phi=1, max_params=value)  # type: ignore[arg-type]


def test_searches_stay_within_the_phi_range(r18: compscale.Planner) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        low = r18.solve(1.0, "macs")  # below any network
        high = r18.solve(1e18, "macs")
    assert -PHI_LIMIT <= low.multipliers.phi and high.multipliers.phi <= PHI_LIMIT  # type: ignore[operator]
    assert len([w for w in caught if "out of reach" in str(w.message)]) == 2


def test_latency_search_refuses_a_target_beyond_max_params() -> None:
    with pytest.raises(compscale.TooLargeError, match=r"target_latency=1 s needs ResNet larger than max_params="
                                                      r"15,000,000 parameters allow.*would take about"):
        compscale.scale(resnet18(num_classes=10), target_latency=1.0, max_params=15_000_000, input_size=64)


@pytest.mark.slow
def test_latency_search_refuses_a_target_beyond_max_params_before_building_anything_larger() -> None:
    """Issue 22's check: resnet18 at 64 px cannot take 1 s per call within 15 M parameters; the search says so
    before building a candidate (the peak memory grows by less than the base model's own size)."""
    script = textwrap.dedent("""
        import gc, resource, torch, compscale
        from torchvision.models import resnet18
        torch.set_num_threads(1)
        base = resnet18(num_classes=10)
        compscale.profile(base, 64)
        gc.collect()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:
            compscale.scale(base, target_latency=1.0, max_params=15_000_000, input_size=64)
            print("no error")
        except compscale.TooLargeError as e:
            print("TooLargeError", str(e).splitlines()[0])
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        print("grown", grown, sum(p.numel() * p.element_size() for p in base.parameters()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert "TooLargeError target_latency=1 s needs ResNet larger than max_params=15,000,000" in out, out
    grown, base_bytes = (int(x) for x in out.split("grown ")[1].split())
    assert grown < base_bytes


def test_command_line_max_params_is_checked_before_building(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["scale", "resnet18", "--phi", "1", "--max-params", "1M", "--input-size", "64"])
    err = capsys.readouterr().err
    assert code == 2 and "max_params=1,000,000" in err and len(err.strip().splitlines()) == 1
