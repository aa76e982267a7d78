"""A fixed pool written for the base size follows the resolution when its window is the whole map.

Old research code ends in ``nn.AvgPool2d(7)``: ResNet's 7x7 map at 224. At 256 the map is 8x8, and the network an
expert builds for 256 pools it with ``nn.AvgPool2d(8)`` and keeps the classifier; a pool that covers only part of
the map stays as it is, and compscale says what that does to the head.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compscale
from compscale.planning.rounding import make_divisible

# dims -> (conv, norm, the base input size, two strided convs' (kernel = stride) that bring it to the final map)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
BASE = {1: (1024,), 2: (224, 224), 3: (32, 32, 32)}
STRIDES = {1: (16, 4), 2: (8, 4), 3: (4, 2)}  # final maps: 16, 7x7, 4x4x4


class Block(nn.Module):
    def __init__(self, c: int, dims: int) -> None:
        super().__init__()
        self.conv, self.bn = CONV[dims](c, c, 3, padding=1, bias=False), NORM[dims](c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


def _body(dims: int, cin: int = 3) -> list[nn.Module]:
    a, b = STRIDES[dims]
    return [CONV[dims](cin, 16, a, stride=a), nn.ReLU(), Block(16, dims), CONV[dims](16, 32, b, stride=b), nn.ReLU(),
            Block(32, dims)]


def _map(dims: int) -> int:
    a, b = STRIDES[dims]
    return BASE[dims][0] // a // b


def linear_head(dims: int, pool: nn.Module) -> nn.Sequential:
    return nn.Sequential(*_body(dims), pool, nn.Flatten(), nn.Linear(32, 10))


def conv_head(dims: int, pool: nn.Module) -> nn.Sequential:
    """pytorchcv's MobileNets and GhostNet: the pool, then a 1x1 conv classifier, then a flatten."""
    return nn.Sequential(*_body(dims), pool, CONV[dims](32, 10, 1), nn.Flatten())


POOLS: dict[str, Callable[[int, int], nn.Module]] = {
    "avg": lambda dims, k: {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](k),
    "avg-stride-1": lambda dims, k: {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](k, stride=1),
    "max": lambda dims, k: {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](k),
}
# dims -> resolution multipliers swept, and the final map each gives (from the convs' floor arithmetic)
SWEEP = {1: [(1.25, 20), (0.75, 12)], 2: [(256 / 224, 8), (192 / 224, 6), (1.3, 9)], 3: [(1.5, 6), (2.0, 8)]}


def _run(model: nn.Module, size: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    cin = next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)).in_channels
    with torch.no_grad():
        return model.eval()(torch.randn(batch, cin, *size))


def _scale_quietly(model: nn.Module, **kwargs: object) -> nn.Module:
    """``compscale.scale``, any warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return compscale.scale(model, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("head", [linear_head, conv_head], ids=["linear", "conv1x1"])
@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_whole_map_pool_follows_the_new_map_and_the_classifier_is_kept(dims: int, pool: str,
                                                                          head: Callable[..., nn.Sequential]) -> None:
    base = head(dims, POOLS[pool](dims, _map(dims)))
    for r, new_map in SWEEP[dims]:
        scaled = _scale_quietly(base, resolution=r, input_size=BASE[dims])
        size = scaled.scaling.input_size
        expected = head(dims, POOLS[pool](dims, new_map))  # the network built by hand for that size
        assert repr(scaled) == repr(expected), (r, size)
        kept = base.state_dict()
        assert scaled.state_dict().keys() == kept.keys()
        assert all(torch.equal(v, kept[k]) for k, v in scaled.state_dict().items())  # the classifier's weights too
        assert _run(scaled, size).shape == (2, 10)
    assert base[6] is not scaled[6] and base[6].kernel_size == POOLS[pool](dims, _map(dims)).kernel_size  # untouched


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_phi_1_keeps_the_classifier_and_the_plan_costs_what_is_built(dims: int) -> None:
    base = linear_head(dims, POOLS["avg"](dims, _map(dims)))
    scaled = _scale_quietly(base, phi=1, input_size=BASE[dims])
    size = scaled.scaling.input_size
    assert size != BASE[dims]
    assert scaled[-1].in_features == make_divisible(32 * 1.1)  # the classifier's shape x width, not x the map
    assert _run(scaled, size).shape == (2, 10)
    planned = compscale.plan(base, phi=1, input_size=BASE[dims])
    assert planned.macs == compscale.profile(scaled, size).macs


def test_a_non_square_map_gets_a_non_square_window_from_the_convs_own_arithmetic() -> None:
    base = linear_head(2, nn.AvgPool2d((7, 5)))
    scaled = _scale_quietly(base, resolution=256 / 224, input_size=(224, 160))
    assert scaled.scaling.input_size == (256, 184)  # 184 / 8 = 23 -> 23 // 4 = 5: the map is 8x5, not 8x5.75
    assert scaled[6].kernel_size == (8, 5) and scaled[6].stride == (8, 5)
    assert _run(scaled, (256, 184)).shape == (2, 10)


class FunctionalHead(nn.Module):
    def __init__(self, stride: int | None) -> None:
        super().__init__()
        self.body = nn.Sequential(*_body(2))
        self.fc = nn.Linear(32, 10)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.avg_pool2d(self.body(x), 7, stride=self.stride), 1))


@pytest.mark.parametrize("stride", [None, 1])
def test_a_functional_whole_map_pool_is_named_as_it_cannot_be_rewritten(stride: int | None) -> None:
    written = r"avg_pool2d in the forward of FunctionalHead pools its whole map with a window written for the base size"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        scaled = compscale.scale(FunctionalHead(stride), resolution=256 / 224)
    assert [w for w in record if re.match(f"compscale: {written}(.|\n)*only part of the map", str(w.message))]
    rebuilt = [str(w.message) for w in record if "fresh weights" in str(w.message)]
    if stride == 1:  # a 2x2 map: the classifier takes 4x the features
        assert rebuilt == ["compscale: fc takes 128 features at input (256, 256) instead of 32; it was rebuilt with "
                           "fresh weights (after avg_pool2d in the forward of FunctionalHead, a fixed 7x7 window that "
                           "gives a 2x2 map here: a pool covering part of the map stays as it is)"]
    else:  # stride 7: one window over the top-left 7x7 of the 8x8 map
        assert rebuilt == []
    assert _run(scaled, (256, 256)).shape == (2, 10)


def test_a_pool_inside_the_network_stays_as_it_is() -> None:
    base = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.AvgPool2d(2), nn.ReLU(), Block(16, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    scaled = _scale_quietly(base, resolution=256 / 224)
    assert repr(scaled) == repr(base) and scaled[1].kernel_size == 2
    assert _run(scaled, (256, 256)).shape == (2, 10)


def test_a_final_pool_covering_part_of_the_map_stays_and_the_linear_after_it_is_rebuilt_with_a_warning() -> None:
    base = linear_head(2, nn.AvgPool2d(6, stride=1))  # 7x7 -> 2x2 at 224
    base[-1] = nn.Linear(32 * 4, 10)
    with pytest.warns(UserWarning, match=r"8 takes 288 features at input \(256, 256\) instead of 128; it was rebuilt "
                                         r"with fresh weights \(after 6, a fixed 6x6 window that gives a 3x3 map here"):
        scaled = compscale.scale(base, resolution=256 / 224)
    assert scaled[6].kernel_size == 6 and _run(scaled, (256, 256)).shape == (2, 10)


def test_a_final_pool_covering_part_of_the_map_before_a_conv_classifier_raises_naming_it() -> None:
    base = conv_head(2, nn.AvgPool2d(6, stride=1))  # the output is (N, 40) at 224: 10 classes x 2x2
    with pytest.raises(compscale.ResolutionError, match=r"returns \[\(1, 90\)\] at input \(256, 256\) where it "
                                                        r"returned \[\(1, 40\)\] \(after 6, a fixed 6x6 window that "
                                                        r"gives a 3x3 map here(.|\n)*Hint"):
        compscale.scale(base, resolution=256 / 224)


PYTORCHCV_FAST = ["resnet18", "mobilenetv2_w1"]
PYTORCHCV_SLOW = ["mobilenetv3_large_w1", "ghostnet", "squeezeresnet_v1_0", "mobilenet_w1"]


@pytest.mark.parametrize("name", [*PYTORCHCV_FAST, *(pytest.param(n, marks=pytest.mark.slow) for n in PYTORCHCV_SLOW)])
def test_pytorchcv_fixed_final_pools_follow_phi_1(name: str) -> None:
    model_provider = pytest.importorskip("pytorchcv.model_provider", reason="the test extra installs pytorchcv")
    base = model_provider.get_model(name, pretrained=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaled = compscale.scale(base, phi=1)
    assert not [str(w.message) for w in caught if "fresh weights" in str(w.message)]
    assert scaled.scaling.input_size == (256, 256)
    final = [path for path, m in base.named_modules() if isinstance(m, nn.AvgPool2d)][-1]
    pooled: list[torch.Size] = []
    scaled.get_submodule(final).register_forward_hook(lambda m, i, o: pooled.append(o.shape))
    assert _run(scaled, (256, 256), batch=1).shape == (1, 1000)
    assert pooled[0][2:] == (1, 1)  # the whole 8x8 map at 256 (15x15 in SqueezeResNet)
    assert scaled.get_submodule(final).kernel_size > base.get_submodule(final).kernel_size
