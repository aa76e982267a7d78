"""How many times one call traces the network: tracing is the slow step of scale(), and each trace is one more chance
for a forward with side effects to run on proxies. Counted by wrapping the tracer every trace goes through."""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Iterator

import pytest
from torch import nn
from torchvision.models import mobilenet_v2, resnet18, resnet50

import compscale
from compscale.trace.tracer import CompscaleTracer


@pytest.fixture
def traces(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    """Traces by the class of the module traced: the network's own, or a block's (a repeat being synthesized)."""
    counted: collections.Counter[str] = collections.Counter()
    trace = CompscaleTracer.trace

    def counting(self: CompscaleTracer, root: nn.Module, concrete_args: dict[str, object] | None = None) -> object:
        counted[type(root).__name__] += 1
        return trace(self, root, concrete_args)

    monkeypatch.setattr(CompscaleTracer, "trace", counting)
    yield counted


CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, object], str, int]] = {
    # model, arguments, the network's class, its traces: the base, then the deepened network once (for its widths,
    # its new input size and the check of the result, which reuse that graph)
    "resnet18 phi=1": (resnet18, {"phi": 1}, "ResNet", 2),
    "mobilenet_v2 phi=1": (mobilenet_v2, {"phi": 1}, "MobileNetV2", 2),
    "mobilenet_v2 width=1.4": (mobilenet_v2, {"width": 1.4}, "MobileNetV2", 1),
    "resnet18 resolution=1.15": (resnet18, {"resolution": 1.15}, "ResNet", 1),
    "resnet50 depth=2": (resnet50, {"depth": 2}, "ResNet", 2),
    # the planner's analysis (its costs count each stage's repeat block once more per block added: no probe network
    # is traced), then the deepened network (the build rebinds the planner's graph of the base instead of tracing it)
    "resnet50 target_macs": (resnet50, {"target_macs": 8.2e9}, "ResNet", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scale_traces_the_network_at_most_this_often(case: str, traces: collections.Counter[str]) -> None:
    make, kwargs, name, most = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compscale.scale(make(), **kwargs)  # type: ignore[arg-type]
    assert traces[name] <= most, dict(traces)


def test_a_synthesized_repeat_reads_its_peers_from_their_layers_not_from_traces(
        traces: collections.Counter[str]) -> None:
    """mobilenet_v2's one-block stages get repeats whose inner widths follow the other blocks of their class: read
    from those blocks' layers (it traced each of up to 12 peers per stage before: 35 traces in all at phi=1)."""
    compscale.scale(mobilenet_v2(), phi=1)
    assert traces["InvertedResidual"] <= 2 * 2, dict(traces)  # two one-block stages: a copy and a check of each
