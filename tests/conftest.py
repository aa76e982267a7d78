"""Shared helpers: compare a scaled model with one built by hand, layer for layer."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torchvision.models.resnet import ResNet

import compscale

_ADDS = (operator.add, operator.iadd, torch.add)


def leaf_layers(model: nn.Module) -> dict[str, tuple]:
    """Every parameterised leaf layer: name -> (type, weight shape, stride, padding, groups, has bias, its repr:
    the sizes it states, which must agree with its weights)."""
    out = {}
    for name, m in model.named_modules():
        if next(m.children(), None) is not None or not any(True for _ in m.parameters(recurse=False)):
            continue
        weight = getattr(m, "weight", None)
        out[name] = (
            type(m).__name__,
            tuple(weight.shape) if weight is not None else None,
            getattr(m, "stride", None),
            getattr(m, "padding", None),
            getattr(m, "groups", None),
            getattr(m, "bias", None) is not None,
            m.extra_repr(),
        )
    return out


def residual_adds(model: nn.Module) -> int:
    gm = fx.symbolic_trace(model.eval())
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in _ADDS)


def assert_same_architecture(scaled: nn.Module, reference: nn.Module, input_size: int = 224) -> None:
    """Same layers (names, types, shapes, strides, groups), same residual adds, equal params and MACs."""
    got, want = leaf_layers(scaled), leaf_layers(reference)
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    diffs = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not diffs, f"{len(diffs)} layers differ, first: {diffs[0]}"
    assert residual_adds(scaled) == residual_adds(reference)
    a, b = compscale.profile(scaled, input_size), compscale.profile(reference, input_size)
    assert (a.params, a.macs) == (b.params, b.macs)
    shapes = {k: v.shape for k, v in scaled.state_dict().items()}
    assert shapes == {k: v.shape for k, v in reference.state_dict().items()}


def resnet_by_hand(block: type[nn.Module], layers: list[int], stem: int, planes: list[int]) -> ResNet:
    """torchvision's ResNet, with the stem width and each stage's planes chosen by hand."""
    model = ResNet(block, layers)  # type: ignore[arg-type]
    model.inplanes = stem
    model.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(stem)
    for i, (p, n) in enumerate(zip(planes, layers)):
        setattr(model, f"layer{i + 1}", model._make_layer(block, p, n, stride=1 if i == 0 else 2))  # type: ignore[arg-type]
    model.fc = nn.Linear(planes[-1] * block.expansion, 1000)  # type: ignore[attr-defined]
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyResidual(nn.Module):
    """``x + relu(conv3x3(x))``: the smallest residual block, for constructed nets."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x).relu()

