"""Other libraries' networks, as their users hold them: efficientnet-pytorch's B0 grows into its own B1..B7."""

from __future__ import annotations

import pytest
import torch
from conftest import leaf_layers

import compscale

efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch", reason="the test extra installs it")
EfficientNet = efficientnet_pytorch.EfficientNet

# (width, depth, resolution) of B1..B7, as efficientnet-pytorch's efficientnet_params() gives them
VARIANTS = {1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260), 3: (1.2, 1.4, 300), 4: (1.4, 1.8, 380), 5: (1.6, 2.2, 456),
            6: (1.8, 2.6, 528), 7: (2.0, 3.1, 600)}


def _static_paddings(model: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.static_padding.padding) for m in model.modules() if hasattr(m, "static_padding")
            and hasattr(m.static_padding, "padding")]


@pytest.mark.parametrize("k", [1, *(pytest.param(k, marks=pytest.mark.slow) for k in range(2, 8))])
def test_b0_scaled_with_bk_multipliers_is_the_librarys_bk(k: int) -> None:
    width, depth, size = VARIANTS[k]
    scaled = compscale.scale(EfficientNet.from_name("efficientnet-b0"), width=width, depth=depth,
                             resolution=size / 224, resolution_divisor=4)
    reference = EfficientNet.from_name(f"efficientnet-b{k}")
    assert scaled.scaling.input_size == (size, size)
    assert type(scaled) is EfficientNet
    assert leaf_layers(scaled) == leaf_layers(reference)
    # TF-"same" paddings computed for 224 at construction follow the new size: the feature maps are the library's
    assert _static_paddings(scaled) == _static_paddings(reference)
    a, b = compscale.profile(scaled, size), compscale.profile(reference, size)
    assert (a.macs, a.params, a.acts) == (b.macs, b.params, b.acts)


@pytest.mark.slow  # about 12 s on 2 cores
def test_the_grown_net_keeps_drop_connect_in_training() -> None:
    scaled = compscale.scale(EfficientNet.from_name("efficientnet-b0"), depth=1.1)
    assert all(type(b).__name__ == "MBConvBlock" for b in scaled._blocks)
    assert len(scaled._blocks) == len(EfficientNet.from_name("efficientnet-b1")._blocks)
    x = torch.randn(2, 3, 32, 32)
    scaled.train()
    torch.manual_seed(0)
    a = scaled(x)
    torch.manual_seed(1)
    b = scaled(x)
    assert not torch.allclose(a, b)  # drop connect (and dropout) draw anew in training
    scaled.eval()
    torch.testing.assert_close(scaled(x), scaled(x))
