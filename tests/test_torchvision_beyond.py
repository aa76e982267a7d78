"""torchvision models beyond ResNets and MobileNets: phi=1 either scales to a network that runs, or explains itself.

The models of ``MUST_SCALE`` must scale.

An explanation is a ``CompscaleError`` (never a bare RuntimeError, KeyError, AssertionError... from inside
compscale) whose message names the module or graph node at fault and ends with a ``Hint:`` line.
See docs/torchvision.md (``python docs/model_table.py``) for what each model does today.
"""

from __future__ import annotations

import re

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import compscale

MODELS = [
    "regnet_y_400mf", "mnasnet1_0", "shufflenet_v2_x1_0", "convnext_tiny", "squeezenet1_0",
    # slower, or covered by their own files (test_densenet.py) and by squeezenet's plain-network path
    pytest.param("densenet121", marks=pytest.mark.slow), pytest.param("vgg11_bn", marks=pytest.mark.slow),
    pytest.param("efficientnet_v2_s", marks=pytest.mark.slow),  # about 10 s on 2 cores; the others under 6 s
]
# All but the two plain (residual-free) networks, squeezenet1_0 and vgg11_bn, which have no stage to deepen
MUST_SCALE = {"regnet_y_400mf", "mnasnet1_0", "shufflenet_v2_x1_0", "densenet121", "convnext_tiny", "efficientnet_v2_s"}

# What "names a module path or graph node" accepts: a quoted path such as 'features.0.1', the words
# node / module (``node %view``, ``in module 'stage2.0'``), or the model's class name for an error about
# the whole model (the root module, whose path is empty).
_QUOTED_PATH = re.compile(r"'[A-Za-z_][\w.]*'")
_NODE_OR_MODULE = re.compile(r"\b(node|module)\b")


def names_location(message: str, model: nn.Module) -> bool:
    return bool(_QUOTED_PATH.search(message) or _NODE_OR_MODULE.search(message)
                or re.search(rf"\b{re.escape(type(model).__name__)}\b", message))


def assert_explains(error: compscale.CompscaleError, model: nn.Module) -> None:
    text = str(error)
    assert "Hint:" in text and error.hint, f"{type(error).__name__} without a hint: {text!r}"
    assert text.endswith(f"Hint: {error.hint}"), f"the hint is not the last line: {text!r}"
    message = text.split("\nHint:")[0]
    assert names_location(message, model), f"{type(error).__name__} names no module or node: {message!r}"


@pytest.mark.parametrize("name", MODELS)
def test_phi_1_runs_or_raises_compscale_error(name: str) -> None:
    base = tvm.get_model(name, weights=None)
    try:
        scaled = compscale.scale(base, phi=1)
    except compscale.CompscaleError as e:  # anything else propagates and fails the test: a compscale bug
        if name in MUST_SCALE:
            raise
        assert_explains(e, base)
        return
    x = torch.randn(1, 3, *scaled.scaling.input_size)
    with torch.no_grad():
        assert scaled.eval()(x).shape == (1, 1000)
