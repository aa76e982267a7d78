"""init="preserve": the grown network computes what the trained one did (Net2Net widening, identity new blocks).

Every model here has its BatchNorm statistics and affine parameters randomised, as a trained network's are, so
that a zero-initialised or default-valued layer cannot hide a wrong copy.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import compscale
from compscale.checkpoint import load, save
from recipes.models import tiny_resnet
from tests.test_custom_zoo import ZOO


def trained_like(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` with random norm statistics and affine parameters (a trained network's are not 0/1), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def relative_error(base: nn.Module, grown: nn.Module, size: int, channels: int = 3) -> float:
    """max |grown(x) - base(x)| / max |base(x)| in eval mode, on a batch of 2 images of ``size``."""
    x = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = base.eval()(x), grown.eval()(x)
    assert a.shape == b.shape
    return ((a - b).abs().max() / a.abs().max()).item()


def grow(model: nn.Module, **kwargs: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact growth warns about nothing
        return compscale.scale(model, init="preserve", **kwargs)


TORCHVISION = [
    pytest.param("resnet18", {"width": 1.5}, id="resnet18-width1.5"),
    pytest.param("mobilenet_v2", {"phi": 2}, id="mobilenet_v2-phi2", marks=pytest.mark.slow),
    pytest.param("resnet50", {"phi": 1}, id="resnet50-phi1", marks=pytest.mark.slow),
    pytest.param("resnet50", {"depth": 2}, id="resnet50-depth2", marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_large", {"phi": 1}, id="mobilenet_v3_large-phi1", marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", {"phi": 1}, id="efficientnet_b0-phi1", marks=pytest.mark.slow),
    pytest.param("resnext50_32x4d", {"width": 1.3}, id="resnext50_32x4d-width1.3", marks=pytest.mark.slow),
    pytest.param("densenet121", {"depth": 1.5}, id="densenet121-depth1.5", marks=pytest.mark.slow),
    pytest.param("regnet_y_400mf", {"phi": 1}, id="regnet_y_400mf-phi1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, multipliers", TORCHVISION)
def test_torchvision_model_grows_to_the_same_function(name: str, multipliers: dict[str, float]) -> None:
    torch.manual_seed(0)
    base = trained_like(getattr(tvm, name)())
    grown = grow(base, **multipliers)
    assert relative_error(base, grown, 224) < 1e-4
    assert grown.scaling.init == "preserve" and grown.scaling.inexact == {}
    assert grown.scaling.init_error < 1e-4
    fresh = compscale.scale(base, **multipliers)  # the same architecture as init="fresh" builds
    assert {k: v.shape for k, v in grown.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}


def test_width_copies_divide_the_readers_weights() -> None:
    """resnet18 at width 1.5: the stem's 64 -> 96 channels; each new channel of conv1 repeats an old one exactly, and
    a layer reading them divides each source's weights by its number of copies."""
    base = trained_like(tvm.resnet18())
    grown = grow(base, width=1.5)
    old, new = base.conv1.weight, grown.conv1.weight
    assert new.shape[0] == 96 and torch.equal(new[:64], old)
    sources = [int((old == row).flatten(1).all(1).nonzero()[0]) for row in new[64:]]
    assert len(set(sources)) == 32  # 32 different channels copied once each
    copies = torch.tensor([1 + sources.count(c) for c in range(64)])
    reader = grown.layer1[0].conv1.weight  # reads the stem's 96 channels
    assert torch.allclose(reader[:64, :64] * copies.view(1, -1, 1, 1), base.layer1[0].conv1.weight, atol=1e-6)
    for j, c in enumerate(sources):  # a copy's weights are its source's, divided alike
        assert torch.equal(reader[:64, 64 + j], reader[:64, c])


def test_depth_new_blocks_are_identity_and_keep_the_trained_blocks() -> None:
    base = trained_like(tvm.resnet18())
    grown = grow(base, depth=2)
    assert [len(s) for s in (grown.layer1, grown.layer2, grown.layer3, grown.layer4)] == [4, 4, 4, 4]
    assert torch.equal(grown.layer1[1].conv1.weight, base.layer1[1].conv1.weight)
    new = grown.layer1[2]
    assert torch.count_nonzero(new.bn2.weight) == 0 and torch.count_nonzero(new.bn2.bias) == 0
    x = torch.rand(1, 64, 56, 56)
    with torch.no_grad():
        assert torch.equal(new.eval()(x), x)
    assert relative_error(base, grown, 224) == 0.0


INEXACT = ("groupnorm_resnet", "flatten_linear_head", "shufflenet_v2_like")  # tested below, one by one


@pytest.mark.parametrize("name", [n for n in ZOO if n not in INEXACT])
def test_custom_zoo_grows_exactly(name: str) -> None:
    case = ZOO[name]
    torch.manual_seed(0)
    base = trained_like(case.build())
    grown = grow(base, phi=1, input_size=case.size, leaf_modules=case.leaf_modules)
    assert relative_error(base, grown, case.size) < 1e-4
    assert grown.scaling.inexact == {}


def test_group_norm_over_uneven_copies_is_named_and_exact_at_width_two() -> None:
    """A GroupNorm's statistics change when its channels are copied unevenly (width x1.1); at width x2 every channel
    is copied once inside its group and the statistics stay."""
    case = ZOO["groupnorm_resnet"]
    base = trained_like(case.build())
    with pytest.warns(UserWarning, match=r"init='preserve' grew .* exactly except .*GroupNorm over channels copied"):
        uneven = compscale.scale(base, width=1.3, input_size=case.size, init="preserve")
    assert uneven.scaling.inexact and all("GroupNorm" in why for why in uneven.scaling.inexact.values())
    assert uneven.scaling.init_error > 1e-4
    even = grow(base, width=2, input_size=case.size)
    assert relative_error(base, even, case.size) < 1e-4


def test_shufflenet_names_what_cannot_be_grown_exactly() -> None:
    """A channel shuffle whose output is split in halves again asks for copies that follow both cuts: named, not
    silent. A new unit cannot be the identity either, as the shuffle permutes the channels it passes on."""
    case = ZOO["shufflenet_v2_like"]
    base = trained_like(case.build())
    with pytest.warns(UserWarning, match="two ways of cutting one tensor"):
        wider = compscale.scale(base, width=1.5, input_size=case.size, init="preserve")
    assert wider.scaling.inexact
    with pytest.warns(UserWarning, match="a channel shuffle"):
        deeper = compscale.scale(base, depth=2, input_size=case.size, init="preserve")
    assert deeper.scaling.inexact and all("new block" in p for p in deeper.scaling.inexact)


def test_flatten_head_at_a_new_size_is_named_in_one_warning() -> None:
    case = ZOO["flatten_linear_head"]
    base = trained_like(case.build())
    with pytest.warns(UserWarning, match="init='preserve'") as record:
        grown = compscale.scale(base, phi=1, input_size=case.size, init="preserve")
    assert len([w for w in record if "init='preserve'" in str(w.message)]) == 1
    (path, why), = grown.scaling.inexact.items()
    assert isinstance(grown.get_submodule(path), nn.Linear) and "fresh weights" in why
    assert grown.scaling.init_error < 1e-4  # measured at the base size, before the head was rebuilt


class _PlainNet(nn.Module):
    """A VGG-like plain network (conv-bn-act units, no residual)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        def unit(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), act()]
        self.features = nn.Sequential(*unit(3, 16), *unit(16, 16), nn.MaxPool2d(2), *unit(16, 32), *unit(32, 32),
                                      nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_plain_units_start_as_identity_convs() -> None:
    base = trained_like(_PlainNet())
    grown = grow(base, depth=2, width=1.5, input_size=32)
    assert sum(isinstance(m, nn.Conv2d) for m in grown.modules()) == 8
    assert relative_error(base, grown, 32) < 1e-4


def test_plain_unit_with_an_activation_that_is_not_identity_is_named() -> None:
    base = trained_like(_PlainNet(nn.Hardswish))
    with pytest.warns(UserWarning, match="activation is not the identity"):
        grown = compscale.scale(base, depth=2, input_size=32, init="preserve")
    assert len(grown.scaling.inexact) == 4 and all("new block" in p for p in grown.scaling.inexact)  # 2 per stage


@pytest.mark.slow
def test_timm_model_grows_to_the_same_function() -> None:
    timm = pytest.importorskip("timm")
    base = trained_like(timm.create_model("mixnet_s"))  # MixConv: channel groups split by the model's own sizes
    grown = grow(base, phi=1)
    assert relative_error(base, grown, 224) < 1e-4


def test_noise_breaks_the_symmetry_of_copies_and_the_grown_model_trains() -> None:
    """Without noise a copy and its source get the same gradient forever (Net2Net's symmetry); noise= breaks it."""
    torch.manual_seed(0)
    base = trained_like(tiny_resnet())
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))

    def train(model: nn.Module) -> nn.Module:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
        return model

    def copies_equal(model: nn.Module) -> bool:
        w = model[0].weight.detach()  # the stem conv, 16 -> 24 channels: rows 16.. copy rows of 0..15
        return all(bool(torch.isclose(w[:16], row, atol=1e-6).flatten(1).all(1).any()) for row in w[16:])

    exact = grow(base, width=1.5, input_size=32)
    assert copies_equal(exact) and copies_equal(train(exact))
    noisy = compscale.scale(base, width=1.5, input_size=32, init="preserve", noise=0.1)
    assert 0 < noisy.scaling.init_error < 0.5
    assert not copies_equal(noisy) and not copies_equal(train(noisy))


def test_seed_makes_the_whole_growth_reproducible() -> None:
    """The copies' sources and the new blocks' weights (drawn, then zeroed where needed) follow seed=, and the
    global generator is left as it was."""
    base = trained_like(tiny_resnet())
    state = torch.random.get_rng_state()
    a, b = (grow(base, phi=1, input_size=32, seed=s) for s in (5, 5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    c = grow(base, phi=1, input_size=32, seed=1)
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    fresh = [compscale.scale(base, phi=1, input_size=32, seed=3) for _ in range(2)]  # fresh weights, seeded
    assert all(torch.equal(p, q) for p, q in zip(fresh[0].state_dict().values(), fresh[1].state_dict().values()))


def test_grown_frozen_layers_stay_frozen_and_new_blocks_train() -> None:
    base = trained_like(tiny_resnet())
    for p in base[3].parameters():
        p.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        grown = compscale.scale(base, depth=2, width=1.5, input_size=32, init="preserve")
    assert not any(p.requires_grad for p in grown[3][0].parameters())  # grown from frozen weights: still frozen
    assert all(p.requires_grad for p in grown[3][2].parameters())  # a new block: trainable


def test_fewer_blocks_are_named_as_not_preserved() -> None:
    base = trained_like(tiny_resnet())
    with pytest.warns(UserWarning, match=r"blocks removed \(depth < 1\)"):
        shallow = compscale.scale(base, depth=0.5, input_size=32, init="preserve")
    assert len(shallow.scaling.inexact) == 3


def test_checkpoint_of_a_grown_model_rebuilds(tmp_path: Any) -> None:
    base = trained_like(tiny_resnet())
    grown = grow(base, phi=1, input_size=32)
    path = tmp_path / "grown.pt"
    save(grown, path, model="recipes.models:tiny_resnet")
    loaded = load(path)
    assert loaded.scaling.init == "preserve"
    x = torch.randn(2, 3, *grown.scaling.input_size)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), grown.eval()(x))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"init": "warm"}, ValueError, "init must be 'fresh' or 'preserve'"),
    ({"init": None}, TypeError, "init must be"),
    ({"init": "preserve", "noise": -0.1}, ValueError, "noise must be a finite number >= 0"),
    ({"init": "preserve", "noise": float("nan")}, ValueError, "noise must be"),
    ({"init": "preserve", "noise": "0.1"}, TypeError, "noise must be a number"),
    ({"init": "preserve", "seed": 1.5}, TypeError, "seed must be an int"),
    ({"noise": 0.1}, ValueError, "goes with init='preserve'"),
])
def test_bad_init_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        compscale.scale(tiny_resnet(), width=1.5, input_size=32, **kwargs)


def test_preserve_needs_weights() -> None:
    with torch.device("meta"):
        model = tiny_resnet()
    with pytest.raises(ValueError, match="meta device"):
        compscale.scale(model, width=1.5, input_size=32, init="preserve")


def test_a_failing_seeded_call_leaves_the_global_generator_as_it_was() -> None:
    model = tiny_resnet()
    state = torch.random.get_rng_state()
    with pytest.raises(compscale.CompscaleError, match="names no conv"):
        compscale.scale(model, width=1.5, input_size=32, seed=3, fixed=["no.such.layer"])
    assert torch.equal(torch.random.get_rng_state(), state)
