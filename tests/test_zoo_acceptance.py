"""Networks compscale's other tests never met, as their users hold them: scaled at phi=1 with no hints.

- Every classification CNN torchvision lists scales at phi=1 and costs what compound scaling says (within
  0.8-1.75x of the ideal MACs, base x (alpha * beta**2 * gamma**2)); its transformers refuse with one short typed
  error.
- pytorchcv's ResNets, MobileNets, EfficientNets, RegNets, ShuffleNets, GhostNet, MixNet, DenseNet... scale at phi=1
  and run at their new input size, the classifier kept (no "rebuilt with fresh weights" warning: a fixed final pool
  follows the new map).

The whole lists are slow (about 4 min on 2 cores); a few cheap models of each list run by default.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision.models as tvm

import compscale

IDEAL_PHI_1 = 1.2 * 1.1**2 * 1.15**2  # alpha * beta^2 * gamma^2 = 1.92

TRANSFORMERS = {"maxvit_t", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t",
                "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"}
TORCHVISION_CNNS = sorted(set(tvm.list_models(module=tvm)) - TRANSFORMERS)
TV_FAST = {"alexnet", "resnet18", "mobilenet_v3_small", "mnasnet0_5", "squeezenet1_1", "shufflenet_v2_x0_5"}


def _torchvision(name: str) -> torch.nn.Module:
    """The model on the meta device (the architecture is what is checked: no weights drawn, no memory), or built on
    the CPU and moved there when its constructor computes with tensors (RegNet's widths)."""
    try:
        with torch.device("meta"):
            return tvm.get_model(name, weights=None)
    except NotImplementedError:
        return tvm.get_model(name, weights=None).to("meta")


def _cases(names: list[str], fast: set[str]) -> list[object]:
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("name", _cases(TORCHVISION_CNNS, TV_FAST))
def test_torchvision_cnn_scales_at_phi_1_by_the_ideal_macs(name: str) -> None:
    base = _torchvision(name)
    size = 299 if name == "inception_v3" else 224
    scaled = compscale.scale(base, phi=1, input_size=size)
    assert type(scaled) is type(base)
    ratio = compscale.profile(scaled, scaled.scaling.input_size).macs / compscale.profile(base, size).macs
    assert 0.8 * IDEAL_PHI_1 <= ratio <= 1.75 * IDEAL_PHI_1, f"{name}: MACs x{ratio:.2f}"


@pytest.mark.parametrize("name", _cases(sorted(TRANSFORMERS), {"vit_b_32"}))
def test_torchvision_transformers_get_one_short_typed_error(name: str) -> None:
    base = _torchvision(name)
    with pytest.raises(compscale.NotACNNError) as info:
        compscale.scale(base, phi=1)
    message = str(info.value).split("\nHint:")[0]
    assert len(message) <= 300, message
    assert info.value.hint


PYTORCHCV = [
    "resnet10", "resnet18", "resnet50", "resnet50b", "resnetd50b", "resneta18", "preresnet18", "preresnet50",
    "resnext50_32x4d", "seresnet18", "seresnet50", "sepreresnet18", "seresnext50_32x4d", "cbam_resnet18",
    "bam_resnet18", "ibn_resnet50", "mobilenet_w1", "mobilenetb_w1", "fdmobilenet_w1", "mobilenetv2_w1",
    "mobilenetv2b_w1", "mobilenetv3_small_w1", "mobilenetv3_large_w1", "mnasnet_b1", "mnasnet_a1", "efficientnet_b0",
    "efficientnet_b0b", "efficientnet_edge_small_b", "regnetx002", "regnety004", "ghostnet", "mixnet_s",
    "shufflenet_g1_w1", "shufflenetv2_w1", "densenet121", "squeezeresnet_v1_0", "octresnet10_ad2",
]
PCV_FAST = {"resnet10", "mobilenet_w1", "regnetx002"}
# Octave units read and return two maps (high and low frequency): they widen (tests/test_octave.py) but are no
# single-entry blocks, so phi=1 widens and resizes the net and warns that it left the depth.
NOT_DEEPENED = {"octresnet10_ad2"}


def _pcv_cases() -> list[object]:
    return [pytest.param(n, marks=[] if n in PCV_FAST else [pytest.mark.slow]) for n in PYTORCHCV]


@pytest.mark.parametrize("name", _pcv_cases())
def test_pytorchcv_scales_at_phi_1_and_keeps_its_classifier(name: str) -> None:
    model_provider = pytest.importorskip("pytorchcv.model_provider", reason="the test extra installs pytorchcv")
    base = model_provider.get_model(name, pretrained=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaled = compscale.scale(base, phi=1)
    rebuilt = [str(w.message) for w in caught if "fresh weights" in str(w.message)]
    assert not rebuilt, rebuilt
    not_deepened = [str(w.message) for w in caught if "not deepened" in str(w.message)]
    assert len(not_deepened) == (name in NOT_DEEPENED), not_deepened
    assert type(scaled) is type(base)
    x = torch.randn(1, 3, *scaled.scaling.input_size)
    with torch.no_grad():
        assert scaled.eval()(x).shape == (1, 1000)
    # no MACs bound here: ceil(n * 1.2) doubles resnet10's one-unit stages (x4.5 MACs), as the rule says
