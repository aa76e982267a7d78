"""Inner widths an expert would choose in the repeat synthesized for a one-block stage: they follow what the
network's other blocks of the class show (a RegNet's SE squeeze is a quarter of the block's input).

Each scaled network is compared, parameter for parameter, with the library's own class built by hand at the widths
and depths it stands for.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import compscale

WIDTHS = [1.5, 2.0, *(1.1**phi for phi in range(1, 5))]


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- repeats of one-block stages: inner widths follow what the network's other blocks of the class show ---------


@pytest.mark.parametrize("depth", [2, 3])
def test_hf_regnet_one_block_stages_repeat_as_the_config_builds_them(depth: int) -> None:
    """RegNetYLayer's middle is out / reduction and its SE squeeze round(in / 4): a 32 -> 128 block repeats as
    128 -> 128 -> 128 with a 32-wide squeeze, not with 4 x 128 (MBConv's t x in) or 8 (the squeeze's ratio to its
    own input)."""
    transformers = pytest.importorskip("transformers")
    config = functools.partial(transformers.RegNetConfig, hidden_sizes=[32, 48, 96, 160], embedding_size=16,
                               groups_width=16)
    torch.manual_seed(0)
    model = transformers.RegNetForImageClassification(config(depths=[1, 1, 2, 1]))
    scaled = compscale.scale(model, depth=depth, input_size=64)
    reference = transformers.RegNetForImageClassification(config(depths=[depth, depth, 2 * depth, depth]))
    assert shapes(scaled) == shapes(reference)


@pytest.mark.parametrize(("name", "depth"), [
    ("regnet_y_400mf", 1.2),
    pytest.param("regnet_y_400mf", 2.0, marks=pytest.mark.slow),
    pytest.param("regnet_x_400mf", 1.2, marks=pytest.mark.slow),
])
def test_torchvision_regnet_one_block_stage_repeats_as_regnet_builds_it(name: str, depth: float) -> None:
    """torchvision's ResBottleneckBlock: SE squeeze round(0.25 x width_in); block1 (one block, 32 -> 48) repeats
    48 -> 48 with a 12-wide squeeze."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models import regnet

    params = {"regnet_y_400mf": dict(depth=16, w_0=48, w_a=27.89, w_m=2.09, group_width=8, se_ratio=0.25),
              "regnet_x_400mf": dict(depth=22, w_0=24, w_a=24.48, w_m=2.54, group_width=16)}[name]
    p = regnet.BlockParams.from_init_params(**params)
    deeper = regnet.BlockParams([math.ceil(n * depth) for n in p.depths], p.widths, p.group_widths,
                                p.bottleneck_multipliers, p.strides, p.se_ratio)
    scaled = compscale.scale(getattr(torchvision.models, name)(), depth=depth, input_size=64)
    reference = regnet.RegNet(deeper, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1))
    assert shapes(scaled) == shapes(reference)
