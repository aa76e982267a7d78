"""Errors a user meets: bad multipliers, untraceable models, nothing to deepen."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import compscale


@pytest.mark.parametrize("bad", [0, -1.5, math.nan, math.inf, -math.inf])
def test_bad_depth_values_raise_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match="depth must be"):
        compscale.scale(resnet18(), depth=bad)


@pytest.mark.parametrize("bad", ["2", None.__class__, [2], True])
def test_depth_of_the_wrong_type_raises_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="depth must be a real number"):
        compscale.scale(resnet18(), depth=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["width", "resolution", "alpha", "beta", "gamma"])
def test_other_multipliers_are_checked_too(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        compscale.scale(resnet18(), phi=1, **{name: -1.0})
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        compscale.scale(resnet18(), phi=1, **{name: math.nan})


def test_phi_must_be_a_finite_number() -> None:
    with pytest.raises(ValueError, match="phi must be finite"):
        compscale.scale(resnet18(), phi=math.nan)
    with pytest.raises(TypeError, match="phi must be a real number"):
        compscale.scale(resnet18(), phi="1")  # type: ignore[arg-type]


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            x = x * 2
        return self.conv(x)


def test_untraceable_model_names_class_forward_and_gives_hint() -> None:
    with pytest.raises(compscale.TraceError, match=r"_Untraceable\.forward(.|\n)*Hint: .*leaf_modules") as info:
        compscale.scale(_Untraceable(), depth=2)
    assert isinstance(info.value, compscale.CompscaleError)
    assert info.value.__cause__ is not None  # the fx error is chained


class _Inner(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.odd = _Inner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.odd(self.stem(x))


def test_untraceable_submodule_is_named() -> None:
    with pytest.raises(compscale.TraceError, match=r"inside submodule 'odd' \(_Inner\.forward\)"):
        compscale.scale(_Outer(), depth=2)


def _plain_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


class _ByName(nn.Module):
    """Layers called by name, outside any container: no unit to repeat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3, stride=2), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.conv1(x).relu()).mean((2, 3)))


def test_no_stage_to_deepen_is_an_error_with_a_hint() -> None:
    with pytest.raises(compscale.NoStageError, match=r"_ByName has no stage to deepen(.|\n)*Hint: .*depth=1"):
        compscale.scale(_ByName(), depth=2)


def test_a_flat_sequential_deepens_its_conv_runs() -> None:
    scaled = compscale.scale(_plain_net(), depth=2)  # two one-run stages (16 channels, then 32 at stride 2)
    convs = [(m.in_channels, m.out_channels, m.stride) for m in scaled if isinstance(m, nn.Conv2d)]
    assert convs == [(3, 16, (1, 1)), (16, 16, (1, 1)), (16, 32, (2, 2)), (32, 32, (1, 1))]


def test_a_model_without_stages_still_widens() -> None:
    scaled = compscale.scale(_plain_net(), width=2)
    assert scaled[0].out_channels == 32 and scaled[-1].out_features == 10


def test_every_error_the_package_raises_carries_a_hint() -> None:
    """Each ``raise SomeCompscaleError(...)`` in the package passes a hint (the second argument): the errors end
    with what to do, as README's table promises. Read from the source, so that rare paths are covered too."""
    import ast
    import inspect
    from pathlib import Path

    errors = {name for name, cls in inspect.getmembers(compscale.errors, inspect.isclass)
              if issubclass(cls, compscale.CompscaleError)} | {"MetadataError"}
    package = Path(compscale.__file__).parent
    bare = [f"{path.relative_to(package)}:{node.lineno} {node.func.id}"
            for path in sorted(package.rglob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in errors
            and len(node.args) < 2 and not any(k.arg == "hint" for k in node.keywords)]
    assert not bare, bare
