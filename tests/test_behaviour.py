"""The result keeps the model's behaviour, and scale() is safe to call anywhere: residual forms, frozen and
channels-last models, threads, sizes refused before allocating, lazy imports."""

from __future__ import annotations

import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import TinyResidual, leaf_layers
from torch import nn
from torchvision.models import mnasnet0_5, mobilenet_v3_small, resnet18, resnet50, shufflenet_v2_x0_5
from torchvision.models.quantization import resnet18 as quantizable_resnet18

import compscale


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).relu()


class TorchAdd(_Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.body(x), x)


class InPlaceAdd(_Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out += x
        return out


class MethodAdd(_Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).add_(x)


class OperatorAdd(_Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


@pytest.mark.parametrize("block", [TorchAdd, InPlaceAdd, MethodAdd, OperatorAdd])
def test_every_spelling_of_a_residual_add_is_a_residual(block: type[_Block]) -> None:
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), block(16), block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    deeper = compscale.scale(net, depth=2)
    assert [(s.blocks_before, s.blocks_after) for s in deeper.scaling.stages] == [(2, 4)]
    assert all(type(deeper[i]) is block for i in range(1, 5))
    assert deeper.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_quantizable_resnet_deepens_through_its_float_functional_add() -> None:
    model = quantizable_resnet18()
    deeper = compscale.scale(model, depth=2)
    assert type(deeper) is type(model)
    assert [len(getattr(deeper, f"layer{i}")) for i in range(1, 5)] == [4, 4, 4, 4]
    assert deeper.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("call", [
    lambda: compscale.scale("resnet50", phi=1),
    lambda: compscale.plan("resnet50", phi=1),
    lambda: compscale.profile("resnet50", 224),
])
def test_a_model_name_instead_of_a_module_is_a_type_error(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match=r"takes an nn.Module, got str 'resnet50'; build it first"):
        call()


@pytest.mark.parametrize("phi", [1e9, -1e9, 1e300])
def test_phi_that_overflows_or_underflows_a_multiplier_is_a_value_error(phi: float) -> None:
    with pytest.raises(ValueError, match="which no network can have"):
        compscale.scale(resnet18(), phi=phi)


def test_phi_20_is_refused_before_allocating_with_its_size() -> None:
    # 37.5 G parameters (150 GB): more than this machine, or any default budget below 150 GB, holds
    with pytest.raises(compscale.TooLargeError, match=r"would have 37\.50 G parameters \(150\.0 GB\)") as e:
        compscale.scale(resnet50(), phi=20, max_params=20_000_000_000)
    assert "compscale.plan()" in str(e.value) and "Hint:" in str(e.value)


def test_max_params_is_checked_against_the_exact_plan() -> None:
    planned = compscale.plan(resnet18(), phi=1).params
    assert planned is not None
    with pytest.raises(compscale.TooLargeError, match="more than max_params=11,000,000"):
        compscale.scale(resnet18(), phi=1, max_params=11_000_000)
    scaled = compscale.scale(resnet18(), phi=1, max_params=planned)
    assert sum(p.numel() for p in scaled.parameters()) == planned


def test_a_frozen_model_keeps_its_frozen_layers_and_never_leaves_a_new_one_frozen() -> None:
    model = resnet18().requires_grad_(False)
    with pytest.warns(UserWarning, match=r"were frozen \(requires_grad=False\) and are re-initialised"):
        deeper = compscale.scale(model, depth=2)
    kept = {name for name, _ in model.named_parameters()}
    for name, p in deeper.named_parameters():
        assert p.requires_grad == (name not in kept), name  # old blocks frozen, new blocks trainable
    with pytest.warns(UserWarning, match="layers of ResNet were frozen"):
        wider = compscale.scale(model, phi=1)
    assert all(p.requires_grad for p in wider.parameters())  # every layer of resnet18 changes width at phi=1


def test_nothing_is_said_when_nothing_frozen_is_redrawn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compscale.scale(resnet18(), depth=2)
        compscale.scale(resnet18().requires_grad_(False), resolution=1.3)  # no layer changes


def test_channels_last_weights_stay_channels_last() -> None:
    model = resnet18().to(memory_format=torch.channels_last)
    scaled = compscale.scale(model, phi=1)
    weights = [p for p in scaled.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)  # the 3x3 ones really are stored channels-last


def _architecture(factory_and_kwargs: tuple) -> dict:  # type: ignore[type-arg]
    factory, kwargs = factory_and_kwargs
    return leaf_layers(compscale.scale(factory(), **kwargs))


@pytest.mark.slow  # 20 scale() calls: 10-20 s on 2 cores
def test_threads_give_what_serial_calls_give_and_leave_torch_unpatched() -> None:
    jobs = [(resnet18, {"depth": 2}), (mobilenet_v3_small, {"width": 1.4}), (shufflenet_v2_x0_5, {"phi": 1}),
            (mnasnet0_5, {"depth": 1.5})]
    serial = [_architecture(job) for job in jobs]
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(_architecture, jobs * 4))
    assert threaded == serial * 4
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
    assert resnet18().eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_import_compscale_imports_neither_torch_nor_timm() -> None:
    code = "import sys, compscale; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # imports torch in a fresh interpreter: 5-8 s
def test_using_compscale_does_not_import_timm() -> None:
    code = "import sys, compscale; compscale.scale; assert 'timm' not in sys.modules, 'timm imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr



class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class ByName(nn.Module):
    """Calls its blocks by name, freezes its stem under no_grad, drops out in training, has a method of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = _Res(16)
        self.block2 = _Res(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.stem(x)
        x = self.block2(self.block1(x))
        x = torch.nn.functional.dropout(x.mean((2, 3)), 0.5, training=self.training)
        return self.fc(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.stem(x))).mean((2, 3))


def test_a_by_name_net_keeps_its_class_methods_dropout_and_no_grad_region() -> None:
    scaled = compscale.scale(ByName(), depth=2, input_size=32)
    assert type(scaled) is ByName and [s.blocks_after for s in scaled.scaling.stages] == [4]
    x = torch.randn(4, 3, 32, 32)
    assert scaled.embed(x).shape == (4, 16)  # its own method, through the new blocks too
    scaled.train()
    assert not torch.equal(scaled(x), scaled(x))  # dropout runs in training
    scaled.eval()
    torch.testing.assert_close(scaled(x), scaled(x))
    scaled.train()
    scaled(x).sum().backward()
    assert all(p.grad is None for p in scaled.stem.parameters())  # the no_grad stem stays frozen
    newest = scaled.get_submodule(scaled.scaling.stages[0].new_blocks[-1])  # block4: named as the model names them
    assert all(p.grad is not None for p in newest.parameters())  # new blocks train


class _IteratesChildren(nn.Module):
    """A stage whose blocks are named children that forward iterates (timm's RegStage): not a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = _Res(16)
        self.b2 = _Res(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            x = block(x)
        return x


def test_a_stage_that_iterates_its_children_runs_each_new_block_once() -> None:
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _IteratesChildren(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer fed the wrong width (a block run twice would be)
        scaled = compscale.scale(net, depth=2, width=1.5, input_size=32)
    stage = scaled[1]
    assert [name for name, _ in stage.named_children()] == ["b1", "b2", "b3", "b4"]
    assert not stage.b2._forward_hooks  # forward calls the new children itself: no hook
    assert all(b.bn.num_features == b.conv.out_channels == 24 for b in stage.children())
    calls = []
    for b in stage.children():
        b.register_forward_hook(lambda m, i, o: calls.append(m))
    scaled(torch.randn(1, 3, 32, 32))
    assert len(calls) == 4


class _Masked(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) * mask


class _MaskedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block1 = _Masked(8)
        self.block2 = _Masked(8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.block2(self.block1(x, mask), mask).mean((2, 3))


def test_new_blocks_called_by_hook_get_the_blocks_other_arguments() -> None:
    inputs = (torch.randn(1, 3, 16, 16), torch.ones(1, 1, 16, 16))
    scaled = compscale.scale(_MaskedNet(), depth=2, example_inputs=inputs)
    seen = []
    for name in scaled.scaling.stages[0].new_blocks:
        scaled.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    scaled(*inputs)
    assert seen == [2, 2]  # each new block got (x, mask)


class _KeepsOnSelf(nn.Module):
    """A forward that keeps a value on ``self`` (RAFT's correlation block keeps its pyramid) and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(TinyResidual(8) for _ in range(2)))
        self.head = nn.Linear(8, 10)
        self.kept: list[torch.Tensor] = []
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        self.kept = [y.mean((2, 3))]
        self.calls += 1
        return self.head(self.kept[0])


def test_tracing_leaves_nothing_of_itself_on_the_scaled_model() -> None:
    """What the forward stored on ``self`` while compscale traced it is put back: no proxies or fake tensors in the
    result, which copies, pickles and runs as the model did."""
    import copy
    import pickle

    import torch.fx as fx

    base = _KeepsOnSelf()
    scaled = compscale.scale(base, phi=1, input_size=32)
    assert scaled.kept == [] and scaled.calls == 0 and base.kept == [] and base.calls == 0
    leftovers = [(path, k) for path, m in scaled.named_modules() for k, v in vars(m).items()
                 if isinstance(v, fx.Proxy) or (isinstance(v, list) and any(isinstance(i, fx.Proxy) for i in v))]
    assert not leftovers, leftovers
    with torch.no_grad():
        out = copy.deepcopy(scaled).eval()(torch.randn(1, 3, 40, 40))
    assert out.shape == (1, 10)
    assert pickle.loads(pickle.dumps(scaled)).calls == 0
