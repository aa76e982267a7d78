"""Stage analysis on the torchvision models of the depth issue, and tracing details."""

from __future__ import annotations

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import compscale
from compscale.analyse.stages import find_stages
from compscale.trace import module_path, trace

EXPECTED = {
    "resnet18": [2, 2, 2, 2],
    "resnet34": [3, 4, 6, 3],
    "resnet50": [3, 4, 6, 3],
    "resnet101": [3, 4, 23, 3],
    "resnet152": [3, 8, 36, 3],
    "resnext50_32x4d": [3, 4, 6, 3],
    "wide_resnet50_2": [3, 4, 6, 3],
    "mobilenet_v2": [1, 2, 3, 4, 3, 3, 1],
    "mobilenet_v3_small": [1, 2, 3, 2, 3],
    "mobilenet_v3_large": [1, 2, 3, 4, 2, 3],
    "efficientnet_b0": [1, 2, 2, 3, 3, 4, 1],
    "mnasnet1_0": [3, 3, 3, 2, 4, 1],
    "regnet_y_400mf": [1, 3, 6, 6],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stage_blocks(name: str) -> None:
    table = find_stages(trace(tvm.get_model(name)))
    assert [len(s.blocks) for s in table] == EXPECTED[name]
    for stage in table:
        assert all(b.is_repeat for b in stage.blocks[1:])
        assert len({b.module_type for b in stage.blocks}) == 1


def test_stage_table_prints() -> None:
    text = str(find_stages(trace(tvm.resnet50())))
    lines = text.splitlines()
    assert lines[0].split() == ["stage", "blocks", "block", "type", "in", "->", "out", "ch", "stride", "first", "..",
                                "last"]
    assert lines[2].split()[:8] == ["layer2", "4", "Bottleneck", "256", "->", "512", "2", "layer2.0"]


def test_stage_channels_and_strides_of_mobilenet_v2() -> None:
    table = find_stages(trace(tvm.mobilenet_v2()))
    assert [(s.in_channels, s.out_channels, s.stride) for s in table] == [
        (32, 16, 1), (16, 24, 2), (24, 32, 2), (32, 64, 2), (64, 96, 1), (96, 160, 2), (160, 320, 1)]
    assert table[0].repeat is None and table[1].repeat is not None and table[1].repeat.path == "features.3"


def test_nodes_know_their_module_path() -> None:
    traced = trace(tvm.resnet18())
    paths = {n.name: module_path(n) for n in traced.graph.nodes}
    assert paths["layer1_0_conv1"] == "layer1.0.conv1"
    assert paths["add"] == "layer1.0"  # a function call is attributed to the module whose forward made it


def test_shapes_come_from_fake_tensors_at_the_requested_size() -> None:
    traced = trace(tvm.resnet18(), (2, 3, 128, 96))
    assert tuple(traced.shape(traced.output_node)) == (2, 1000)
    node = next(n for n in traced.graph.nodes if n.name == "layer4_1_bn2")
    assert tuple(traced.shape(node)) == (2, 512, 4, 3)


def test_trace_restores_mixed_train_eval_modes() -> None:
    model = tvm.resnet18().train()
    model.layer2.eval()
    trace(model)
    assert model.training and model.layer1.training and not model.layer2.training and not model.layer2[0].bn1.training


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


class _GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _Gate()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.conv(x)))


def test_leaf_modules_make_an_untraceable_submodule_traceable() -> None:
    with pytest.raises(compscale.TraceError):
        trace(_GatedNet())
    traced = trace(_GatedNet(), leaf_modules=[_Gate])
    assert any(n.op == "call_module" and n.target == "gate" for n in traced.graph.nodes)
