"""A zoo of hand-written networks, shaped as users write them: each scales by phi, runs and costs what it should."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
from torch import nn

import compscale
from compscale.analyse.rules import elementwise

CLASSES = 10
IDEAL = 1.2 * 1.1**2 * 1.15**2  # 1.92027: alpha * beta**2 * gamma**2


def _bn(c: int) -> nn.Module:
    return nn.BatchNorm2d(c)


def _gn(c: int) -> nn.Module:
    return nn.GroupNorm(4, c)


class _Basic(nn.Module):
    """ResNet basic block; option-B (1x1 conv + norm) shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm: Callable[[int], nn.Module] = _bn) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _stage(cin: int, cout: int, blocks: int, stride: int, norm: Callable[[int], nn.Module] = _bn) -> nn.Sequential:
    return nn.Sequential(_Basic(cin, cout, stride, norm), *(_Basic(cout, cout, 1, norm) for _ in range(blocks - 1)))


class _PoolHead(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


# 1. blocks as attributes, called one by one
class ExplicitResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.block1 = _Basic(16, 16)
        self.block2 = _Basic(16, 16)
        self.block3 = _Basic(16, 32, stride=2)
        self.block4 = _Basic(32, 32)
        self.head = _PoolHead(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = self.block4(x)
        return self.head(x)


# 2. pre-activation ResNet
class _PreAct(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        identity = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + identity


class PreActResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.layer1 = nn.Sequential(_PreAct(16, 16), _PreAct(16, 16))
        self.layer2 = nn.Sequential(_PreAct(16, 32, 2), _PreAct(32, 32))
        self.bn = nn.BatchNorm2d(32)
        self.head = _PoolHead(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.conv1(x)))
        return self.head(torch.relu(self.bn(x)))


# 3. GroupNorm instead of BatchNorm
class GroupNormResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(inplace=True))
        self.layer1 = _stage(16, 16, 2, 1, _gn)
        self.layer2 = _stage(16, 32, 2, 2, _gn)
        self.head = _PoolHead(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


# 4. CIFAR-style three stages, 16/32/64
class CifarResNet(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _stage(16, 16, blocks, 1)
        self.layer2 = _stage(16, 32, blocks, 2)
        self.layer3 = _stage(32, 64, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# 5. MobileNetV2-like, with its own squeeze-excitation and hardswish
class _SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            _SqueezeExcite(hidden, max(8, cin // 4)),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileV2SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.features = nn.Sequential(
            _InvertedResidual(16, 24, 2), _InvertedResidual(24, 24, 1), _InvertedResidual(24, 24, 1),
            _InvertedResidual(24, 32, 2), _InvertedResidual(32, 32, 1),
        )
        self.last = nn.Sequential(nn.Conv2d(32, 128, 1, bias=False), nn.BatchNorm2d(128), nn.Hardswish())
        self.head = _PoolHead(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.features(self.stem(x))))


# 6. MobileNetV3-like block: hard-sigmoid SE squeezing to expanded // 4
class _HardSE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // 4, 1)
        self.fc2 = nn.Conv2d(c // 4, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class _V3Block(nn.Module):
    def __init__(self, cin: int, expanded: int, cout: int, stride: int) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish())
        self.dw = nn.Sequential(
            nn.Conv2d(expanded, expanded, 5, stride, 2, groups=expanded, bias=False), nn.BatchNorm2d(expanded),
            nn.Hardswish(),
        )
        self.se = _HardSE(expanded)
        self.project = nn.Sequential(nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.use_res else out


class MobileV3Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            _V3Block(16, 64, 24, 2), _V3Block(24, 96, 24, 1), _V3Block(24, 96, 24, 1),
            _V3Block(24, 96, 40, 2), _V3Block(40, 160, 40, 1),
        )
        self.head = nn.Sequential(
            nn.Conv2d(40, 160, 1, bias=False), nn.BatchNorm2d(160), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(160, 256), nn.Hardswish(), nn.Linear(256, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# 7. DenseNet-like: every layer concatenates its output to its input
class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


def _dense_block(cin: int, growth: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*(_DenseLayer(cin + i * growth, growth) for i in range(layers)))


class DenseNetLike(nn.Module):
    # Growth 32 and a 2 x growth stem, as DenseNet-121. A growth of 8 would not follow the width multiplier:
    # the reference rounding (multiples of 8, never 10% down) takes 8 * 1.21 to 16 and doubles it.
    def __init__(self, growth: int = 32) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 2 * growth, 3, 1, 1, bias=False)
        self.block1 = _dense_block(2 * growth, growth, 3)
        c = 5 * growth
        self.trans = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = _dense_block(c // 2, growth, 3)
        self.norm = nn.BatchNorm2d(c // 2 + 3 * growth)
        self.head = _PoolHead(c // 2 + 3 * growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.trans(self.block1(self.conv0(x))))
        return self.head(torch.relu(self.norm(x)))


# 8. inception-like: parallel conv branches concatenated (Inception-ResNet style, projected and added back)
def _cbr(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _InceptionBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2  # branches as wide as Inception's (tens of channels), so 8-rounding stays a small step
        self.b1 = _cbr(c, h, 1)
        self.b3 = nn.Sequential(_cbr(c, h, 1), _cbr(h, c, 3))
        self.b5 = nn.Sequential(_cbr(c, h, 1), _cbr(h, h, 3), _cbr(h, c, 3))
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), _cbr(c, h, 1))
        self.project = nn.Conv2d(h + c + c + h, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x)], dim=1)
        return torch.relu(x + self.project(out))


class InceptionLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 32, 3, 2)
        self.blocks = nn.Sequential(_InceptionBlock(32), _InceptionBlock(32))
        self.reduce = _cbr(32, 64, 3, 2)
        self.blocks2 = nn.Sequential(_InceptionBlock(64), _InceptionBlock(64))
        self.head = _PoolHead(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks2(self.reduce(self.blocks(self.stem(x)))))


# 9. ShuffleNetV2-like: channel split, branch, concat, channel shuffle
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class _ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            )
        else:
            self.branch1 = nn.Identity()
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(bin_, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 24, 3, 2)
        self.stage2 = nn.Sequential(_ShuffleUnit(24, 48, 2), _ShuffleUnit(48, 48, 1), _ShuffleUnit(48, 48, 1))
        self.stage3 = nn.Sequential(_ShuffleUnit(48, 96, 2), _ShuffleUnit(96, 96, 1))
        self.conv5 = _cbr(96, 256, 1)
        self.fc = nn.Linear(256, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage3(self.stage2(self.stem(x))))
        return self.fc(x.mean([2, 3]))


# 10. fixed-size flatten -> Linear head, no global pooling
class FlattenHeadResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.layer1 = _stage(16, 16, 2, 2)
        self.layer2 = _stage(16, 32, 2, 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer2(self.layer1(self.stem(x))))


# 11. one untraceable submodule (data-dependent if), kept as a leaf
class NanGuard(nn.Module):
    """Replaces non-finite activations, but only pays for it when there are any."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isfinite(x).all():
            return x
        return torch.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)


class GuardedResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16, 3)
        self.guard = NanGuard()
        self.layer1 = _stage(16, 16, 2, 1)
        self.layer2 = _stage(16, 32, 2, 2)
        self.head = _PoolHead(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.guard(self.stem(x)))))


# 12. deep stem (nn.Sequential of convs), then residual stages
class DeepStemResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        )
        self.layer1 = _stage(32, 32, 2, 1)
        self.layer2 = _stage(32, 64, 2, 2)
        self.head = _PoolHead(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(self.stem(x))))


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    size: int
    residual: bool
    leaf_modules: tuple[type[nn.Module], ...] = ()


ZOO: dict[str, Case] = {
    "explicit_forward_resnet": Case(ExplicitResNet, 32, True),
    "preact_resnet": Case(PreActResNet, 32, True),
    "groupnorm_resnet": Case(GroupNormResNet, 32, True),
    "cifar_resnet": Case(CifarResNet, 32, True),
    "mobilenet_v2_se_hardswish": Case(MobileV2SE, 64, True),
    "mobilenet_v3_hard_se": Case(MobileV3Like, 64, True),
    "densenet_like": Case(DenseNetLike, 32, True),
    "inception_like": Case(InceptionLike, 32, True),
    "shufflenet_v2_like": Case(ShuffleLike, 64, True),
    "flatten_linear_head": Case(FlattenHeadResNet, 32, True),
    "untraceable_leaf": Case(GuardedResNet, 32, True, (NanGuard,)),
    "deep_stem_resnet": Case(DeepStemResNet, 64, True),
}


CASES = [pytest.param(name, phi, id=f"{name}-{phi}") for name in ZOO for phi in (1, 2)]


@pytest.mark.parametrize(("name", "phi"), CASES)
def test_scales_runs_and_costs_the_compound_ratio(name: str, phi: int) -> None:
    case = ZOO[name]
    torch.manual_seed(0)
    net = case.build().eval()
    if case.leaf_modules:
        for leaf in case.leaf_modules:
            compscale.register_channel_rule(leaf, elementwise)
    scaled = compscale.scale(net, phi=phi, input_size=case.size, leaf_modules=case.leaf_modules)
    size = scaled.scaling.input_size
    with torch.no_grad():
        assert scaled.eval()(torch.randn(2, 3, *size)).shape == (2, CLASSES)
    ratio = compscale.profile(scaled, size).macs / compscale.profile(net, case.size).macs
    assert 0.8 * IDEAL**phi <= ratio <= 1.5 * IDEAL**phi, f"MACs ratio {ratio:.3f}, ideal {IDEAL**phi:.3f}"
    if case.residual:
        assert any(s.blocks_after > s.blocks_before for s in scaled.scaling.stages), scaled.scaling.stages


def test_untraceable_submodule_is_named_without_leaf_modules() -> None:
    with pytest.raises(compscale.TraceError, match=r"NanGuard|guard"):
        compscale.scale(GuardedResNet(), phi=1, input_size=32)
