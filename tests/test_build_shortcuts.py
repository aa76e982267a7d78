"""The shortcuts a build takes for speed give what the long way gave: the metadata step's module shapes read off the
graphs equal those a hooked forward records, and the garbage collector paused during a build is back as it was."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models import densenet121, efficientnet_b0, mobilenet_v3_small, regnet_y_400mf, resnet18

import compscale
from compscale.rewrite.metadata import _measure, _measured_paths, graph_shapes
from compscale.trace import trace


class _Project(nn.Module):
    """A block keeping its channels as attributes (what the metadata step updates)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.in_chs, self.out_chs = c_in, c_out
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _Twice(nn.Module):
    """A strided block called twice in a row: its two calls give maps of two sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _Project(3, 16)
        self.shared = _Project(16, 16, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(self.stem(x)))
        return self.head(x.mean((2, 3)))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mobilenet_v3_small": mobilenet_v3_small, "efficientnet_b0": efficientnet_b0, "regnet_y_400mf": regnet_y_400mf,
    "densenet121": densenet121, "resnet18": resnet18,
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("size", [(64, 64), (224, 224)])
def test_module_shapes_read_off_the_graph_equal_a_hooked_forward(name: str, size: tuple[int, int]) -> None:
    model = MODELS[name]()
    traced = trace(model, None, input_size=size)
    paths = _measured_paths(model)
    from_graph = graph_shapes(traced, paths)
    hooked = _measure(model, traced.input_shape, ())
    assert hooked is not None
    if not paths:  # resnet18 keeps no channel attribute of its own: nothing to read
        assert from_graph == {}
        return
    assert from_graph is not None
    assert from_graph == {p: hooked[p] for p in paths}


def test_a_module_called_twice_is_read_at_its_first_call_as_a_hook_records_it() -> None:
    model = _Twice()
    traced = trace(model, None, input_size=(32, 32))
    hooked = _measure(model, traced.input_shape, ())
    assert hooked is not None and hooked["shared"] == ((1, 16, 32, 32), (1, 16, 16, 16))
    assert graph_shapes(traced, _measured_paths(model)) == {p: hooked[p] for p in ("stem", "shared")}
    scaled = compscale.scale(model, width=2, input_size=32)
    assert (scaled.shared.in_chs, scaled.shared.out_chs) == (32, 32)
    assert (scaled.stem.in_chs, scaled.stem.out_chs) == (3, 32)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_is_as_it_was_after_a_build_and_after_a_failed_one(enabled: bool) -> None:
    was = gc.isenabled()
    try:
        if not enabled:
            gc.disable()
        compscale.scale(resnet18(num_classes=10), phi=1, input_size=64)
        assert gc.isenabled() is enabled
        fixed_size = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
        with pytest.raises(compscale.CompscaleError, match="shape propagation"):  # raised inside the build
            compscale.scale(fixed_size, width=2, input_size=64)
        assert gc.isenabled() is enabled
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()


class _Fuse(nn.Module):
    """Two inputs, the second read first: the graph cannot say which is the first argument a hook records."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels = 16
        self.conv = nn.Conv2d(24, 16, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, x], 1))


class _Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.fuse = _Fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.a(x), self.b(x))


def test_a_module_of_several_inputs_is_measured_by_a_forward() -> None:
    model = _Fused()
    traced = trace(model, None, input_size=(16, 16))
    assert graph_shapes(traced, _measured_paths(model)) is None
    hooked = _measure(model, traced.input_shape, ())
    assert hooked is not None and hooked["fuse"][0] == (1, 16, 16, 16)  # its first argument, x
