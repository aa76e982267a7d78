"""A scaled model its own library can carry on with: timm's and Hugging Face's metadata describe the scaled network,
``save_pretrained`` round-trips (or refuses before writing), and a user's own net is saved and loaded from the
command line."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import compscale
from compscale.rewrite.metadata import MetadataError

timm = pytest.importorskip("timm", reason="timm is in the test extra: pip install -e '.[test]'")

_IN = ("in_channels", "in_chs", "in_features")
_OUT = ("out_channels", "out_chs", "out_features")


def _io_shapes(model: nn.Module, size: tuple[int, ...]) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Each module's first tensor input and output shape in one forward at ``size``."""
    seen: dict[str, tuple[torch.Size, torch.Size]] = {}

    def hook(path: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if path not in seen and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                seen[path] = (args[0].shape, out.shape)
        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in model.named_modules() if p]
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, *size))
    for h in handles:
        h.remove()
    return seen


def _agreeing(model: nn.Module, size: tuple[int, ...]) -> dict[tuple[type, str], bool]:
    """For each (module class, channel attribute): whether every called module of that class holds the channels
    it takes (``in_*``) or gives (``out_*``)."""
    shapes = _io_shapes(model, size)
    agree: dict[tuple[type, str], bool] = {}
    for path, m in model.named_modules():
        if path not in shapes:
            continue
        for names, side in ((_IN, 0), (_OUT, 1)):
            for name in names:
                value = vars(m).get(name)
                if type(value) is int:
                    s = shapes[path][side]
                    ok = value in (s[1], s[-1])
                    agree[(type(m), name)] = agree.get((type(m), name), True) and ok
    return agree


TIMM = ["resnet18", "lcnet_050", "mixnet_s", "mobilenetv3_large_100", "regnety_008", "efficientnet_b0",
        "resnet50", "convnext_tiny", "efficientnet_b3"]
FAST = {"resnet18", "lcnet_050"}


@pytest.mark.parametrize("kwargs", [{"phi": 1}, {"width": 1.5}], ids=["phi1", "width1.5"])
@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in TIMM])
def test_timm_metadata_describes_the_scaled_model(name: str, kwargs: dict[str, float]) -> None:
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(name, pretrained=False)
    base_agree = _agreeing(model, (224, 224))
    r = compscale.scale(model, **kwargs).eval()
    size = r.scaling.input_size
    x = torch.randn(2, 3, *size)
    at: dict[str, torch.Size] = {}
    handles = [r.get_submodule(f["module"]).register_forward_hook(
        lambda m, i, o, k=f["module"]: at.__setitem__(k, o.shape)) for f in r.feature_info]
    with torch.no_grad():
        features = r.forward_features(x)
        pre_logits = r.forward_head(features, pre_logits=True)
    for h in handles:
        h.remove()
    assert r.num_features == features.shape[1] != model.num_features
    assert r.head_hidden_size == pre_logits.shape[-1]
    assert [f["num_chs"] for f in r.feature_info] == [at[f["module"]][1] for f in r.feature_info]
    assert [f["reduction"] for f in r.feature_info] == [size[0] // at[f["module"]][2] for f in r.feature_info]
    assert resolve_data_config({}, model=r)["input_size"] == (3, *size)
    assert r.pretrained_cfg["pool_size"] == tuple(features.shape[2:])
    assert r.pretrained_cfg["crop_pct"] == model.pretrained_cfg["crop_pct"]
    transform = create_transform(**resolve_data_config({}, model=r))
    from PIL import Image

    assert transform(Image.new("RGB", (400, 300))).shape == (3, *size)
    stale = [key for key, ok in _agreeing(r, size).items() if base_agree.get(key) and not ok]
    assert not stale, f"channel attributes that disagree with the layers: {stale}"
    r.reset_classifier(10)
    with torch.no_grad():
        assert r(x).shape == (2, 10)


def test_timm_features_only_reads_the_scaled_channels() -> None:
    """What a detection framework does with a backbone: wrap it for its feature maps, read their channels."""
    from timm.models import FeatureListNet

    r = compscale.scale(timm.create_model("resnet18", pretrained=False), phi=1)
    features = FeatureListNet(r, out_indices=(1, 2, 3, 4))
    with torch.no_grad():
        maps = features(torch.randn(1, 3, *r.scaling.input_size))
    assert features.feature_info.channels() == [m.shape[1] for m in maps] == [72, 144, 280, 560]


def test_mixed_conv_keeps_its_channels() -> None:
    from timm.layers import MixedConv2d

    r = compscale.scale(timm.create_model("mixnet_s", pretrained=False), width=1.5)
    mixed = [m for m in r.modules() if isinstance(m, MixedConv2d)]
    assert mixed
    for m in mixed:
        convs = list(m.values())
        assert m.in_channels == sum(c.in_channels for c in convs)
        assert m.out_channels == sum(c.out_channels for c in convs)


class _Block(nn.Module):
    """A block of one's own that keeps its channels beside its layers (read by nothing in forward)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _own_net() -> nn.Module:
    return nn.Sequential(_Block(3, 16, 2), _Block(16, 16, 1), _Block(16, 32, 2), _Block(32, 32, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.mark.parametrize("width", [0.5, 1.5, 2.0])
def test_your_blocks_channel_attributes_follow_their_layers(width: float) -> None:
    r = compscale.scale(_own_net(), width=width)
    blocks = [m for m in r.modules() if isinstance(m, _Block)]
    assert [(b.in_chs, b.out_chs) for b in blocks] == [(b.conv.in_channels, b.conv.out_channels) for b in blocks]
    assert blocks[0].in_chs == 3 and blocks[-1].out_chs != 32
    assert [b.stride for b in blocks] == [2, 1, 2, 1]  # not a channel count: kept


# -- Hugging Face ------------------------------------------------------------------------------------------------


def _hf() -> Any:
    transformers = pytest.importorskip("transformers", reason="the test extra installs transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _hf_model(kind: str) -> nn.Module:
    t = _hf()
    configs = {
        "resnet": lambda: t.ResNetConfig(depths=[1, 1, 1, 1], num_labels=10),
        "resnet_default": lambda: t.ResNetConfig(num_labels=10),
        "convnext": lambda: t.ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 128, 256], num_labels=10),
        "convnext_default": lambda: t.ConvNextConfig(num_labels=10),
        "efficientnet_b0": lambda: t.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=224,
                                                        hidden_dim=1280, num_labels=10),
        "mobilenet_v2": lambda: t.MobileNetV2Config(num_labels=10),
        "regnet": lambda: t.RegNetConfig(depths=[1, 1, 2, 1], num_labels=10),
        "bit": lambda: t.BitConfig(depths=[1, 1, 1, 1], num_labels=10),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = configs[kind]()
        return t.AutoModelForImageClassification.from_config(config).eval()


def _round_trip(r: nn.Module, path: Path) -> float:
    """``save_pretrained`` -> ``AutoModelForImageClassification.from_pretrained``: the largest logit difference."""
    r.save_pretrained(path)
    back = _hf().AutoModelForImageClassification.from_pretrained(path).eval()
    assert type(back) is type(r)
    x = torch.randn(2, 3, *r.scaling.input_size)
    with torch.no_grad():
        return float((r.eval()(x).logits - back(x).logits).abs().max())


@pytest.mark.parametrize("kwargs", [pytest.param({"phi": 1}, marks=pytest.mark.slow), {"width": 1.5}],
                         ids=["phi1", "width1.5"])
@pytest.mark.parametrize("kind", ["resnet", pytest.param("convnext", marks=pytest.mark.slow),
                                  pytest.param("efficientnet_b0", marks=pytest.mark.slow)])
def test_hf_save_pretrained_round_trips(kind: str, kwargs: dict[str, float], tmp_path: Path) -> None:
    r = compscale.scale(_hf_model(kind), **kwargs)
    assert _round_trip(r, tmp_path) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet_default", "convnext_default"])
def test_hf_default_configs_round_trip_at_phi_1(kind: str, tmp_path: Path) -> None:
    r = compscale.scale(_hf_model(kind), phi=1)
    assert _round_trip(r, tmp_path) <= 1e-5


def test_hf_config_describes_the_scaled_resnet(tmp_path: Path) -> None:
    r = compscale.scale(_hf_model("resnet"), phi=1)
    assert (r.config.depths, r.config.hidden_sizes, r.config.embedding_size) == ([2, 2, 2, 2], [288, 576, 1120, 2240],
                                                                                 72)
    rebuilt = type(r)(r.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in r.state_dict().items()}
    assert _round_trip(r, tmp_path) <= 1e-5


@pytest.mark.slow
def test_hf_efficientnet_config_follows_width_and_size() -> None:
    r = compscale.scale(_hf_model("efficientnet_b0"), phi=1)
    assert (r.config.width_coefficient, r.config.hidden_dim, r.config.image_size) == (1.1, 1408, 256)


@pytest.mark.parametrize("kwargs", [{"phi": 1}, {"width": 1.5}], ids=["phi1", "width1.5"])
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) for k in ("mobilenet_v2", "regnet", "bit")])
def test_hf_save_pretrained_round_trips_or_refuses_before_writing(kind: str, kwargs: dict[str, float],
                                                                  tmp_path: Path) -> None:
    r = compscale.scale(_hf_model(kind), **kwargs)
    try:
        assert _round_trip(r, tmp_path) <= 1e-5
    except MetadataError as e:
        assert "compscale.checkpoint.save" in str(e)
        assert not any(tmp_path.iterdir())
        assert isinstance(e, compscale.CompscaleError)
        with pytest.raises(MetadataError, match="nothing was written"):
            r.push_to_hub("some/repo")
        assert type(r).__name__ == f"{type(_hf_model(kind)).__name__}"


def test_hf_refuses_a_config_that_cannot_describe_the_net(tmp_path: Path) -> None:
    """MobileNetV2's config has a width multiplier but no depth: deepened, it cannot be saved as a config."""
    r = compscale.scale(_hf_model("mobilenet_v2"), depth=2)
    with pytest.raises(MetadataError, match=r"(?s)no mobilenet_v2 config.*Hint: save it with compscale.checkpoint"):
        r.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["resnet", pytest.param("efficientnet_b0", marks=pytest.mark.slow),
                                  pytest.param("bit", marks=pytest.mark.slow)])
def test_image_processor_for_the_new_size(kind: str) -> None:
    r = compscale.scale(_hf_model(kind), phi=1)
    processor = compscale.image_processor(r)
    from PIL import Image

    pixels = processor(Image.new("RGB", (500, 400)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 256, 256)
    with torch.no_grad():
        assert r.eval()(pixels).logits.shape == (1, 10)


# -- your own net, from the command line -------------------------------------------------------------------------

MYNET = """
from torch import nn


def block(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def make():
    return nn.Sequential(block(3, {w}, 2), block({w}, {w}, 1), block({w}, 32, 2), block(32, 32, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
"""

_LOAD = """
import torch, compscale.checkpoint
m = compscale.checkpoint.load("out.pt").eval()
saved = torch.load("out.pt", weights_only=True)["state_dict"]
assert all(torch.equal(v, saved[k]) for k, v in m.state_dict().items())
torch.manual_seed(0)
x = torch.randn(2, 3, *m.scaling.input_size)
with torch.no_grad():
    torch.save({"out": m(x), "x": x, "size": m.scaling.input_size}, "loaded.pt")
"""


def _script() -> str:
    path = Path(sys.executable).parent / "compscale"
    if not path.exists():
        pytest.skip("the compscale console script is not installed next to this python")
    return str(path)


@pytest.mark.slow  # two fresh interpreters importing torch
def test_cli_saves_your_own_net_and_load_rebuilds_it(tmp_path: Path) -> None:
    (tmp_path / "mynet.py").write_text(MYNET.format(w=16))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([_script(), "scale", "mynet:make", "--phi", "1", "--save", "out.pt"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    loaded = subprocess.run([sys.executable, "-c", _LOAD], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    got = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert tuple(got["size"]) == (256, 256) and got["out"].shape == (2, 10)
    # the saved weights in the scaled architecture compute the same outputs here
    sys.path.insert(0, str(tmp_path))
    try:
        import mynet  # type: ignore[import-not-found]

        ref = compscale.scale(mynet.make(), phi=1)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mynet", None)
    ref.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True)["state_dict"])
    with torch.no_grad():
        assert torch.allclose(ref.eval()(got["x"]), got["out"], atol=1e-6)


def test_load_names_what_changed_in_the_base_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compscale.checkpoint import load, save

    (tmp_path / "mynet.py").write_text(MYNET.format(w=16))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynet

    try:
        save(compscale.scale(mynet.make(), phi=1), tmp_path / "out.pt", model="mynet:make")
        (tmp_path / "mynet.py").write_text(MYNET.format(w=24))
        sys.modules.pop("mynet", None)
        with pytest.raises(compscale.CompscaleError, match=r"(?s)not the one saved: .*shapes that differ: 0\.0\.weight "
                                                           r".*Hint: the base model's code changed"):
            load(tmp_path / "out.pt")
    finally:
        sys.modules.pop("mynet", None)
