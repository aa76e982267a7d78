"""compscale.verify.latency: a measured time per call, the model left as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from compscale.verify.latency import Latency, latency

FAST = {"min_run_time": 0.05, "warmup": 1, "threads": 1}  # the machine is shared: one thread times steadily


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(8, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


class Recorder(nn.Module):
    """Records the batch shape, train flag and grad mode of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(5, 4, 3)
        self.calls: list[tuple[tuple[int, ...], bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(x.shape), self.training, torch.is_grad_enabled()))
        return self.conv(x)


def test_measures_a_positive_time_with_its_spread() -> None:
    lat = latency(tiny_net(), 32, **FAST)
    assert lat.median > 0 and lat.iqr >= 0 and len(lat.times) >= 1
    assert all(t > 0 for t in lat.times)
    assert lat.input_size == (32, 32) and lat.device == "cpu" and lat.threads == 1 and not lat.compiled
    assert "±" in str(lat) and "IQR" in str(lat) and "on cpu, 1 thread" in str(lat)


def test_batch_size_and_channels_reach_the_forward() -> None:
    model = Recorder()  # its first conv takes 5 channels: read off the model
    lat = latency(model, (12, 20), batch_size=3, **FAST)
    assert lat.batch_size == 3 and lat.per_sample == pytest.approx(lat.median / 3)
    assert {shape for shape, _, _ in model.calls} == {(3, 5, 12, 20)}


def test_runs_in_eval_mode_without_grad_and_restores_training() -> None:
    model = Recorder().train()
    model.conv.eval()  # a submodule's own flag is restored too
    latency(model, 8, **FAST)
    assert {(training, grad) for _, training, grad in model.calls} == {(False, False)}
    assert model.training and not model.conv.training


def test_leaves_weights_and_buffers_unchanged() -> None:
    model = tiny_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latency(model, 16, **FAST)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())


def test_example_inputs_give_the_shape_with_the_batch_replaced() -> None:
    model = Recorder()
    lat = latency(model, batch_size=2, example_inputs=[torch.zeros(7, 5, 9, 11)], **FAST)
    assert lat.input_size == (9, 11)
    assert {shape for shape, _, _ in model.calls} == {(2, 5, 9, 11)}


def test_runs_in_the_models_dtype() -> None:
    model = tiny_net().double()
    lat = latency(model, 16, **FAST)
    assert lat.median > 0


def test_str_picks_a_readable_unit() -> None:
    lat = Latency(0.0123, 0.0004, (0.012, 0.0123, 0.0125), 1, (224, 224), "cpu", False, 2)
    assert str(lat) == "12.3 ms ± 0.4 ms (IQR, 3 runs), batch 1 at 224x224 on cpu, 2 threads"
    assert lat.spread == pytest.approx(0.0004 / 0.0123)
    fast = Latency(4.5e-5, 1e-6, (4.5e-5,), 8, (32, 32), "cuda:0", True, 1)
    assert str(fast) == "45 µs ± 1 µs (IQR, 1 runs), batch 8 at 32x32 on cuda:0, 1 thread, compiled"
    assert fast.per_sample == pytest.approx(4.5e-5 / 8)


def test_a_meta_model_cannot_be_timed() -> None:
    with torch.device("meta"):
        model = tiny_net()
    with pytest.raises(ValueError, match=r"meta device.*cannot be timed"):
        latency(model, 16, **FAST)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"batch_size": 0}, ValueError, "batch_size must be at least 1"),
    ({"batch_size": 2.0}, TypeError, "batch_size must be an int"),
    ({"min_run_time": 0}, ValueError, "min_run_time must be .* above 0"),
    ({"warmup": -1}, ValueError, "warmup must be 0 or more"),
    ({"threads": 0}, ValueError, "threads must be at least 1"),
])
def test_bad_arguments_raise(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        latency(tiny_net(), 16, **kwargs)  # type: ignore[arg-type]


def test_not_a_module_raises() -> None:
    with pytest.raises(TypeError, match=r"takes an nn\.Module"):
        latency("resnet18")  # type: ignore[arg-type]


@pytest.mark.slow
def test_compiled_model_is_timed_and_the_model_left_alone() -> None:
    model = tiny_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lat = latency(model, 16, compile=True, **FAST)
    assert lat.compiled and lat.median > 0 and str(lat).endswith(", compiled")
    assert model.training and type(model) is nn.Sequential
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- the procedure: runs, warm-up, threads, outliers, interleaved comparison, the latency search ---------------------

def test_a_spread_is_never_quoted_from_fewer_than_five_runs() -> None:
    from compscale.verify.latency import MIN_RUNS

    lat = latency(tiny_net(), 16, min_run_time=1e-6, warmup=0, threads=1)  # one block would do for the timer
    assert MIN_RUNS == 5 and len(lat.times) >= MIN_RUNS
    assert f"IQR, {len(lat.times)} runs)" in str(lat)


def test_warms_up_at_least_as_asked_and_until_settled() -> None:
    lat = latency(tiny_net(), 16, min_run_time=0.01, warmup=4, threads=1)
    assert 4 <= lat.warmup_runs <= 50


def test_threads_are_pinned_shown_and_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lat = latency(tiny_net(), 16, min_run_time=0.01, threads=1)
        assert lat.threads == 1 and "1 thread" in str(lat) and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            latency(tiny_net(), 16, min_run_time=0.01, threads=1, batch_size=0)
        assert torch.get_num_threads() == 2
        assert latency(tiny_net(), 16, min_run_time=0.01).threads == 2  # by default: torch's own count, shown
    finally:
        torch.set_num_threads(before)


def fake(median: float, runs: int = 5) -> Latency:
    return Latency(median, 0.02 * median, (median,) * runs, 1, (32, 32), "cpu", False, 1)


def test_compare_interleaves_the_points_and_times_a_disturbed_round_again() -> None:
    from compscale.verify.latency import compare

    calls: list[str] = []
    disturbed = iter([False, True, False, False])  # b's second round is disturbed, 10x slower

    def measure(name: str, seconds: float) -> Latency:
        calls.append(name)
        hit = name == "b" and next(disturbed)
        return fake(seconds * (10 if hit else 1))

    a, b = compare([lambda: measure("a", 1e-3), lambda: measure("b", 2e-3)], rounds=3)
    assert calls[:6] == ["a", "b", "a", "b", "a", "b"]  # interleaved: round after round
    assert calls[6:] == ["b"]  # the disturbed round of b, timed again
    assert a.median == pytest.approx(1e-3) and b.median == pytest.approx(2e-3)
    assert b.rounds == 3 and b.remeasured == 1 and len(b.times) == 15


def plan_latency(planner: object, disturb: int | None = None) -> object:
    """A deterministic latency model of a plan (1 ms x its activations ratio), with one call 5x slower."""
    count = iter(range(1000))

    def measure(p: object) -> Latency:
        seconds = 1e-3 * p.acts / p.base_acts  # type: ignore[attr-defined]
        return fake(seconds * (5 if next(count) == disturb else 1))

    return measure


@pytest.fixture(scope="module")
def planner() -> object:
    from torchvision.models import resnet18

    from compscale import Planner

    return Planner(resnet18(num_classes=10), input_size=64)


def test_the_latency_search_gives_one_phi_and_one_disturbed_measurement_does_not_change_it(planner: object) -> None:
    from compscale.latency_search import PHI_STEP

    target = 3e-3
    plain = [planner.solve(target, "latency", measure_plan=plan_latency(planner)) for _ in range(2)]  # type: ignore
    assert plain[0].multipliers.phi == plain[1].multipliers.phi
    assert (plain[0].multipliers.phi / PHI_STEP).is_integer() and plain[0].latency_iqr is not None
    for disturb in range(5):
        got = planner.solve(target, "latency", measure_plan=plan_latency(planner, disturb))  # type: ignore
        assert got.multipliers.phi == plain[0].multipliers.phi


def test_a_latency_target_out_of_reach_warns_like_the_counted_targets(planner: object) -> None:
    with pytest.warns(UserWarning, match=r"within 1e-09 s per call .* measured .* out of reach"):
        planner.solve(1e-9, "latency", measure_plan=plan_latency(planner))  # type: ignore[attr-defined]


def test_the_latency_search_builds_nothing_beyond_max_params(planner: object) -> None:
    timed: list[int] = []

    def measure(p: object) -> Latency:
        timed.append(p.params)  # type: ignore[attr-defined]
        return fake(1e-3 * p.acts / p.base_acts)  # type: ignore[attr-defined]

    got = planner.solve(2e-3, "latency", measure_plan=measure, max_params=30_000_000)  # type: ignore
    assert max(timed) <= 30_000_000 and got.params <= 30_000_000


def test_a_latency_search_on_timings_too_noisy_to_decide_warns(planner: object) -> None:
    def noisy(p: object) -> Latency:
        seconds = 1e-3 * p.acts / p.base_acts  # type: ignore[attr-defined]
        times = tuple(seconds * f for f in (0.2, 0.5, 1, 2, 3))  # a busy machine: IQR 1.5x the median
        return Latency(seconds, 1.5 * seconds, times, 1, (64, 64), "cpu", False, 1)

    with pytest.warns(UserWarning, match=r"too noisy to find 0\.003 s per call.*IQR 150% of the median"):
        planner.solve(3e-3, "latency", measure_plan=noisy)  # type: ignore[attr-defined]


@pytest.mark.parametrize("target_between", [0.3, 0.5, 0.7])
def test_a_latency_search_on_a_busy_machine_gives_one_phi_whatever_the_load_of_the_moment(
        planner: object, target_between: float) -> None:
    """A busy machine: each search's timings spread by +-15%, and the load of the moment makes a whole search up to 5%
    slower or faster (another job starting or ending). With the target anywhere between two grid points, every load
    gives the same phi: the network within the target (the closer of the two flipped with the load)."""
    from compscale.latency_search import PHI_STEP

    def at_load(load: float) -> object:
        def measure(p: object) -> Latency:
            seconds = load * 1e-3 * p.acts / p.base_acts  # type: ignore[attr-defined]
            times = tuple(seconds * f for f in (0.85, 0.92, 1.0, 1.08, 1.15))
            return Latency(seconds, 0.16 * seconds, times, 1, (64, 64), "cpu", False, 1)
        return measure

    lo, hi = (planner.plan(phi).acts / planner.plan(0).acts for phi in (PHI_STEP, 2 * PHI_STEP))  # type: ignore
    target = 1e-3 * lo * (hi / lo) ** target_between
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a target between grid points misses by up to half a step
        phis = {planner.solve(target, "latency", measure_plan=at_load(load)).multipliers.phi  # type: ignore
                for load in (0.95, 0.98, 1.0, 1.02, 1.05)}
    assert phis == {PHI_STEP}, phis  # the largest network within the target
