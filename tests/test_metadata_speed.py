"""The metadata pass measures cheaply: only the modules whose numbers it updates are hooked, and norms and activations
do not run torch's slow meta kernels (meta batch_norm was most of ``scale()``'s time for mobilenet_v2)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.ops.misc import Conv2dNormActivation

import compscale
import compscale.pipeline
from compscale.rewrite import metadata


def test_mobilenet_v2_blocks_keep_their_channels_and_no_meta_batch_norm_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    norms = []
    batch_norm, update = torch.nn.functional.batch_norm, metadata.update_metadata

    def counting(*args: Any, **kwargs: Any) -> Any:
        norms.append(args[0].device.type)
        return batch_norm(*args, **kwargs)

    def update_counting(*args: Any) -> None:
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "batch_norm", counting)
            update(*args)

    monkeypatch.setattr(compscale.pipeline, "update_metadata", update_counting)
    scaled = compscale.scale(mobilenet_v2(), width=1.4)
    assert "meta" not in norms
    blocks = [m for m in scaled.modules() if isinstance(m, (InvertedResidual, Conv2dNormActivation))]
    convs = [[c for c in b.modules() if isinstance(c, nn.Conv2d)][-1] for b in blocks]
    assert [b.out_channels for b in blocks] == [c.out_channels for c in convs]
    assert blocks[-1].out_channels == 1792 != 1280  # the last block's 1280 channels, 1.4x


class _TwoInputNorm(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * scale


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.out_chs = cout
        self.conv, self.norm, self.act = nn.Conv2d(cin, cout, 3, padding=1), _TwoInputNorm(cout), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x), x.new_ones(1)))


def test_measures_only_what_it_updates_and_runs_a_norm_that_takes_two_inputs() -> None:
    net = nn.Sequential(_Block(3, 8), _Block(8, 16), nn.Conv2d(16, 4, 1))
    net.feature_info = [{"module": "1.act", "num_chs": 16, "reduction": 1}]  # type: ignore[assignment]
    shapes = metadata._measure(net, (1, 3, 8, 8), ())
    # the blocks and norms keep channel attributes (out_chs, num_features), 1.act is a feature module; the torch
    # layers (the convs, the other activation) are not measured: the width pass resizes them with their attributes
    assert shapes == {"0": ((1, 3, 8, 8), (1, 8, 8, 8)), "0.norm": ((1, 8, 8, 8), (1, 8, 8, 8)),
                      "1": ((1, 8, 8, 8), (1, 16, 8, 8)), "1.norm": ((1, 16, 8, 8), (1, 16, 8, 8)),
                      "1.act": ((1, 16, 8, 8), (1, 16, 8, 8))}
