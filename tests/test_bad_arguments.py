"""Bad arguments to the public functions give a typed error that names the argument, never a raw one.

A raw error is anything but ``TypeError``/``ValueError`` raised by compscale's own checks (whose message names the
argument) or a ``CompscaleError``: an ``IndexError`` from inside, a ``RuntimeError`` from torch, a
``TypeError`` from ``torch.empty``.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import compscale


class Tiny(nn.Module):
    """A small residual CNN: one stem, two residual blocks, a pooled classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*(Block(8) for _ in range(2)))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return Tiny()


def _typed(call: Any, argument: str) -> BaseException:
    """Run ``call``; it must raise TypeError/ValueError naming ``argument``, or a CompscaleError."""
    with pytest.raises((TypeError, ValueError, compscale.CompscaleError)) as info:
        call()
    if not isinstance(info.value, compscale.CompscaleError):
        assert re.search(rf"\b{re.escape(argument)}\b", str(info.value)), \
            f"{type(info.value).__name__} does not name {argument}: {info.value}"
    return info.value


# (argument, bad value) pairs for scale(); each must be refused with the argument named
BAD_SCALE = [
    ("phi", math.nan), ("phi", math.inf), ("phi", "1"), ("phi", -100), ("phi", 1000),
    ("depth", 0), ("depth", -1.0), ("depth", math.nan), ("depth", True), ("depth", "2"),
    ("width", 0.0), ("width", 1e-9), ("width", math.inf), ("width", [1.5]),
    ("resolution", -1), ("resolution", 1e300),
    ("input_size", -5), ("input_size", "224"), ("input_size", 224.5), ("input_size", (0, 224)), ("input_size", ()),
    ("example_inputs", ()), ("example_inputs", (np.zeros((1, 3, 32, 32), dtype=np.float32),)),
    ("example_inputs", (torch.zeros(1, 3, 32, 32, dtype=torch.int64),)),
    ("example_inputs", (torch.zeros(1, 3, 32, 32, dtype=torch.bool),)),
    ("example_inputs", (torch.zeros(1, 3, 32, 32, dtype=torch.complex64),)),
    ("example_inputs", (torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))),
    ("resolution_divisor", 0), ("resolution_divisor", 1000), ("resolution_divisor", 8.0),
    ("target_macs", True), ("target_macs", -1e9), ("target_macs", "1G"),
    ("target_acts", 0), ("target_latency", math.nan),
    ("seed", 2**70), ("seed", -1), ("seed", 1.5), ("seed", "0"),
    ("max_params", "x"), ("max_params", -1), ("max_params", 0), ("max_params", 1.5),
    ("init", "warm"), ("init", None), ("noise", -0.1),
    ("strategy", "no-such-strategy"), ("strategy", 3),
    ("stages", 3), ("fixed", 3),
]


@pytest.mark.parametrize(("argument", "value"), BAD_SCALE, ids=[f"{a}={v!r}"[:40] for a, v in BAD_SCALE])
def test_scale_refuses_a_bad_argument_by_name(tiny: nn.Module, argument: str, value: Any) -> None:
    kwargs: dict[str, Any] = {"phi": 1} if argument not in ("phi", "target_macs", "target_acts", "target_latency") \
        else {}
    kwargs[argument] = value
    if argument == "example_inputs" or argument == "input_size":
        kwargs.setdefault("max_params", None)
    _typed(lambda: compscale.scale(tiny, **kwargs), argument)


@pytest.mark.parametrize(("argument", "value"), BAD_SCALE[:21], ids=[f"{a}={v!r}"[:40] for a, v in BAD_SCALE[:21]])
def test_plan_refuses_what_scale_refuses(tiny: nn.Module, argument: str, value: Any) -> None:
    kwargs: dict[str, Any] = {} if argument == "phi" else {"phi": 1}
    kwargs[argument] = value
    _typed(lambda: compscale.plan(tiny, **kwargs), argument)


@pytest.mark.parametrize("size", [-3, 0, "224", 224.5, (224, -1), ()])
def test_profile_and_latency_refuse_a_bad_input_size(tiny: nn.Module, size: Any) -> None:
    _typed(lambda: compscale.profile(tiny, size), "input_size")
    _typed(lambda: compscale.latency(tiny, size, min_run_time=0.01), "input_size")


def test_seed_takes_numpy_integers(tiny: nn.Module) -> None:
    a = compscale.scale(tiny, phi=1, seed=np.int64(3))
    b = compscale.scale(tiny, phi=1, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_round_width_returning_a_fraction_is_named(tiny: nn.Module) -> None:
    _typed(lambda: compscale.scale(tiny, width=1.5, round_width=lambda v, d: v + 0.5), "round_width")


def test_a_channel_rule_that_is_not_callable_is_refused() -> None:
    _typed(lambda: compscale.register_channel_rule(nn.ReLU, 1), "rule")  # type: ignore[arg-type]
    compscale.scale(Tiny(), phi=1)  # and nothing was registered: later calls still work


def test_a_stages_filter_matching_nothing_says_so(tiny: nn.Module) -> None:
    with pytest.raises(compscale.CompscaleError, match="stages="):
        compscale.scale(tiny, depth=2, stages=["no.such.module"])


@pytest.mark.parametrize("wrap", ["compile", "script", "data_parallel"])
def test_wrapped_models_are_unwrapped_or_refused_with_a_hint(tiny: nn.Module, wrap: str) -> None:
    wrapped: nn.Module
    if wrap == "compile":
        wrapped = torch.compile(tiny)  # type: ignore[assignment]
    elif wrap == "script":
        wrapped = torch.jit.script(tiny)
    else:
        wrapped = nn.DataParallel(tiny)
    try:
        scaled = compscale.scale(wrapped, phi=1)
    except compscale.CompscaleError as e:
        assert re.search(r"_orig_mod|\.module\b|unscripted|original", str(e.hint or "")), str(e)
        return
    x = torch.randn(2, 3, *scaled.scaling.input_size)
    assert scaled(x).shape == (2, 10)


def test_forward_hooks_on_the_base_do_not_run_on_proxies(tiny: nn.Module) -> None:
    seen: list[type] = []
    handle = tiny.blocks[0].register_forward_hook(lambda m, i, o: seen.append(type(o)))
    try:
        compscale.scale(tiny, phi=1)
    finally:
        handle.remove()
    assert all(issubclass(t, torch.Tensor) for t in seen), seen


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_preserve_in_half_precision_does_not_cry_wolf(dtype: torch.dtype) -> None:
    import warnings

    model = Tiny().to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compscale.scale(model, width=2, init="preserve")
    assert not [w for w in caught if "please report" in str(w.message)]


def test_the_scaled_model_keeps_the_hooks_and_the_model_keeps_its_own(tiny: nn.Module) -> None:
    seen: list[str] = []
    post = tiny.blocks[0].register_forward_hook(lambda m, i, o: seen.append(f"post {type(o).__name__}"))
    pre = tiny.stem[0].register_forward_pre_hook(lambda m, i: seen.append(f"pre {type(i[0]).__name__}"))
    try:
        scaled = compscale.scale(tiny, phi=1, width=1.5)  # stem[0] is rebuilt wider, blocks deepened
        assert seen == []  # no hook ran while compscale traced
        scaled.eval()(torch.randn(1, 3, *scaled.scaling.input_size))
        assert seen == ["pre Tensor", "post Tensor"]  # the result behaves as the model did: its hooks run
        assert len(scaled.blocks) == 3 and not scaled.blocks[2]._forward_hooks  # a new block copies no hook
        assert len(tiny.blocks[0]._forward_hooks) == 1 and len(tiny.stem[0]._forward_pre_hooks) == 1
    finally:
        post.remove()
        pre.remove()


def test_profile_and_latency_take_what_scale_takes(tiny: nn.Module) -> None:
    two = (torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    for call in (lambda: compscale.scale(tiny, phi=1, example_inputs=two),
                 lambda: compscale.plan(tiny, example_inputs=two),
                 lambda: compscale.profile(tiny, example_inputs=two),
                 lambda: compscale.latency(tiny, example_inputs=two, min_run_time=0.01)):
        with pytest.raises(TypeError, match=r"example_inputs has 2 tensors, but Tiny\.forward takes 1 \(x\)"):
            call()
    array = (np.zeros((1, 3, 32, 32), dtype=np.float32),)
    for call in (lambda: compscale.scale(tiny, phi=1, example_inputs=array),
                 lambda: compscale.profile(tiny, example_inputs=array)):
        with pytest.raises(TypeError, match=r"numpy\.ndarray.*torch\.from_numpy"):
            call()
    one = (torch.zeros(1, 3, 32, 32),)
    assert compscale.profile(tiny, example_inputs=one) == compscale.profile(tiny, 32)


def test_a_bad_value_names_its_argument_wherever_it_goes(tiny: nn.Module) -> None:
    for call, argument in [
        (lambda: compscale.scale(tiny, phi=1, seed=-1), "seed"),
        (lambda: compscale.scale(tiny, target_macs=True), "target_macs"),
        (lambda: compscale.plan(tiny, target_acts="1G"), "target_acts"),
        (lambda: compscale.Planner(tiny, input_size="224"), "input_size"),
        (lambda: compscale.Planner(tiny).solve(-1.0, "macs"), "target_macs"),
        (lambda: compscale.scale(tiny, phi=1, stages=[3]), "stages"),
        (lambda: compscale.scale(tiny, phi=1, fixed=lambda path: True), "fixed"),
        (lambda: compscale.scale(tiny, phi=1, rules=[nn.ReLU]), "rules"),
        (lambda: compscale.scale(tiny, phi=1, leaf_modules=[nn.ReLU()]), "leaf_modules"),
        (lambda: compscale.profile(tiny, 32, in_channels=2.5), "in_channels"),
        (lambda: compscale.scale(tiny, depth=1e12), "depth"),
        (lambda: compscale.scale(tiny, phi=1, alpha=1e300), "depth"),  # alpha**phi: the depth it gives is named
    ]:
        _typed(call, argument)


def test_preserve_tolerates_what_the_dtype_rounds_and_no_more() -> None:
    from compscale.pipeline import preserve_tolerance

    assert preserve_tolerance(torch.float32) == pytest.approx(1e-4)
    assert preserve_tolerance(torch.float16) == pytest.approx(8 * torch.finfo(torch.float16).eps)  # 7.8e-3
    assert preserve_tolerance(torch.bfloat16) == pytest.approx(8 * torch.finfo(torch.bfloat16).eps)  # 6.3e-2


# --- a property test: generated bad values at every public keyword argument ------------------------------------------

GENERATED = [None, math.nan, math.inf, -1, 0, 1e308, "x", [], object(), True]

# (function, argument) -> the generated values that are valid there (skipped: they would build or time a network)
VALID: dict[tuple[str, str], tuple[Any, ...]] = {
    **{(f, "phi"): (None, -1, 0) for f in ("scale", "plan")},
    **{(f, a): (None,) for f in ("scale", "plan") for a in ("depth", "width", "resolution", "input_size",
                                                            "example_inputs", "stages", "strategy", "max_params",
                                                            "rules")},
    **{(f, a): ([],) for f in ("scale", "plan") for a in ("fixed", "leaf_modules", "autowrap_functions")},
    **{(f, a): (None, 1e308) for f in ("scale", "plan") for a in ("target_macs", "target_acts", "target_latency")},
    **{(f, "strict"): (True,) for f in ("scale", "plan")},
    ("scale", "noise"): (0,), ("scale", "seed"): (None, 0),
    **{(f, "neck_width"): (None,) for f in ("scale", "plan")},
    **{(f, "head_depth"): (None, -1, 0) for f in ("scale", "plan")},
    **{(f, a): (None,) for f in ("profile", "latency") for a in ("in_channels", "example_inputs")},
    ("latency", "compile"): (True,), ("latency", "min_run_time"): (1e308,), ("latency", "warmup"): (0,),
    ("latency", "threads"): (None,),
}


def _public_arguments() -> list[tuple[str, str]]:
    from compscale.planning.options import ScaleOptions

    def named(f: Any) -> list[str]:
        return [n for n, p in inspect.signature(f).parameters.items()
                if n != "model" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]

    functions = {"scale": compscale.scale, "plan": compscale.plan, "profile": compscale.profile,
                 "latency": compscale.latency}
    pairs = [(f, a) for f, function in functions.items() for a in named(function)]
    return pairs + [("plan", a) for a in named(ScaleOptions.make) if ("plan", a) not in pairs]  # plan's **options


@pytest.mark.parametrize(("function", "argument"), _public_arguments(), ids=lambda x: x)
def test_generated_bad_values_raise_a_typed_error_naming_the_argument(tiny: nn.Module, function: str,
                                                                     argument: str) -> None:
    call = getattr(compscale, function)
    for value in GENERATED:
        if any(value is v or (type(value) is type(v) and value == v) for v in VALID.get((function, argument), ())):
            continue
        kwargs: dict[str, Any] = {}
        if function in ("scale", "plan") and argument not in ("phi", "target_macs", "target_acts", "target_latency"):
            kwargs["phi"] = 1
        if function in ("profile", "latency"):
            kwargs["input_size"] = 32
        if function == "latency":
            kwargs.update(min_run_time=0.01, warmup=0)
        kwargs[argument] = value
        _typed(functools.partial(call, tiny, **kwargs), argument)


class ByName(nn.Module):
    """Blocks that forward calls by name: compscale appends new ones through a forward hook of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.b1, self.b2 = Block(8), Block(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b2(self.b1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_compscales_own_hooks_stay_and_a_users_hook_sees_its_blocks_own_output() -> None:
    base = ByName()
    outputs: list[torch.Tensor] = []
    handle = base.b2.register_forward_hook(lambda m, i, o: outputs.append(o))
    deeper = compscale.scale(base, depth=2, input_size=32)
    handle.remove()
    assert [name for name, _ in deeper.named_children()] == ["stem", "b1", "b2", "b3", "b4", "head"]
    wider = compscale.scale(deeper, width=1.5, input_size=32)  # the appending hook is the network: traced, kept
    assert outputs == []  # the user's hook, which the results keep, never ran on proxies
    assert [s.blocks_before for s in wider.scaling.stages] == [4] and wider.b4.conv.out_channels == 16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert wider.eval()(x).shape == (1, 10)
        b2_alone = wider.b2.forward(wider.b1(wider.stem(x)))  # b2 without its hooks
    assert len(outputs) == 1  # the user's hook ran once, before the appended blocks: on b2's own output
    torch.testing.assert_close(outputs[0], b2_alone)
