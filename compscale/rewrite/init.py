"""Fresh initialisation "the way the model's own constructor does it", inferred from the model.

Constructors initialise each layer type by one law: torchvision's ResNet and MobileNet draw conv
weights from ``kaiming_normal_(mode="fan_out")`` (std = sqrt(2 / fan_out)), PyTorch's default is
uniform with bound 1/sqrt(fan_in), MobileNetV2's classifier uses a constant std of 0.01, norms start at
weight 1 (or 0 for a zero-init residual) and bias 0. :class:`InitRules` finds, per layer type, which of
``std ~ fan_out^-1/2``, ``std ~ fan_in^-1/2`` or ``std = const`` fits all of that type's weights in the
model best, and whether they look uniform or normal; :func:`reinit` draws a new layer from it.
A layer of which the model holds one copy only (a classifier) keeps PyTorch's default law when its
weights fit it, else a constant std.

Every draw comes from generators compscale owns (:mod:`compscale.randomness`): ``drawing_from`` hands them to each
random fill made in its scope on this thread (``nn.init``'s functions, ``reset_parameters``, ``Tensor.normal_``...),
so that a ``scale()`` call neither reseeds nor consumes torch's global generator, and threads do not meet.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from compscale.layers import NORMS

__all__ = ["InitRules", "redrawn", "reinit"]

_LAWS = ("fan_out", "fan_in", "const")


@dataclasses.dataclass(frozen=True)
class _Law:
    law: str
    coef: float
    uniform: bool


def _fans(w: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def _scale(law: str, fan_in: int, fan_out: int) -> float:
    return {"fan_out": fan_out ** -0.5, "fan_in": fan_in ** -0.5, "const": 1.0}[law]


_KURTOSIS_SAMPLE = 8192
"""Weights a kurtosis is measured on (the first of the tensor): its standard error is then 0.05 for a normal's 3.0,
a twelfth of the way to the 2.4 that separates it from a uniform's 1.8."""


def _looks_uniform(w: torch.Tensor) -> bool:
    x = w.detach().flatten()[:_KURTOSIS_SAMPLE].float()
    if x.numel() < 16:
        return False
    x = x - x.mean()
    squares = x.pow(2)
    var = squares.mean()
    if not var > 0:
        return False  # a constant: kurtosis taken as a normal's
    # x**4 as (x**2)**2: torch's pow(x, 4) is ten times slower than a multiply, and the two differ by rounding only,
    # which decides nothing unless the kurtosis is next to the threshold: there, the exact power settles it
    kurtosis = (squares.square_().mean() / var.pow(2)).item()
    if abs(kurtosis - 2.4) < 1e-3:
        kurtosis = (x.pow(4).mean() / var.pow(2)).item()
    return kurtosis < 2.4  # uniform: 1.8, normal: 3.0


def _most_look_uniform(weights: list[torch.Tensor]) -> bool:
    """Whether more than half of ``weights`` look uniform; the smallest are looked at first, and the vote stops
    once it is decided (a ResNet's largest convs hold most of its weights, and kurtosis takes a pass over each)."""
    needed = len(weights) // 2 + 1
    yes = no = 0
    for w in sorted(weights, key=lambda w: w.numel()):
        if _looks_uniform(w):
            yes += 1
        else:
            no += 1
        if yes >= needed or no > len(weights) - needed:
            break
    return yes >= needed


class InitRules:
    """Per layer type, the law the model's constructor drew weights from.

    Each type's law is fitted when first asked for (a deepened ResNet never asks for its classifier's), from the
    weights ``model`` holds then: compscale asks within the call that made the rules, while the model is unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        self._samples: dict[type, list[torch.Tensor]] = {}
        for m in model.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(w, torch.Tensor) and w.numel() > 1:
                self._samples.setdefault(_kind(m), []).append(w.detach())
        self._laws: dict[type, _Law | None] = {}

    def law_for(self, module: nn.Module) -> _Law | None:
        return self._law(_kind(module))

    def _law(self, kind: type) -> _Law | None:
        if kind not in self._laws:
            self._laws[kind] = _fit(self._samples[kind]) if kind in self._samples else None
        return self._laws[kind]


def _kind(m: nn.Module) -> type:
    return nn.Linear if isinstance(m, nn.Linear) else nn.modules.conv._ConvNd


def _fit(weights: list[torch.Tensor]) -> _Law | None:
    if weights[0].device.type == "meta":
        return None
    stats = []
    for w in weights:
        std = w.float().std().item()
        if std > 0:
            stats.append((std, *_fans(w)))
    if not stats:
        return None
    uniform = _most_look_uniform(weights)
    if len(stats) == 1:
        std, fan_in, _ = stats[0]
        default_std = fan_in ** -0.5 / math.sqrt(3)  # PyTorch's kaiming_uniform_(a=sqrt(5))
        if abs(std / default_std - 1) < 0.15:
            return None  # PyTorch's default: reset_parameters() reproduces it exactly
        return _Law("const", std, uniform)
    best = None
    for law in _LAWS:
        coefs = [std / _scale(law, fi, fo) for std, fi, fo in stats]
        mean = sum(coefs) / len(coefs)
        spread = math.sqrt(sum((c - mean) ** 2 for c in coefs) / len(coefs)) / mean
        if best is None or spread < best[0] - 1e-9:
            best = (spread, _Law(law, mean, uniform))
    assert best is not None
    return best[1]


@torch.no_grad()
def reinit(module: nn.Module, rules: InitRules | None, template: nn.Module | None = None) -> None:
    """Give ``module`` fresh parameters as the model's constructor would, in place.

    Norm layers copy their template's constant weight/bias (1/0, or 0 for a zero-init residual) and reset
    their running statistics. Conv/linear weights follow ``rules``; a bias copies the template's zeros or
    is drawn by PyTorch's default.
    """
    template = module if template is None else template
    if isinstance(module, NORMS):
        _reinit_norm(module, template)
        return
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):  # PReLU, custom layers with their own init
            reset()
        return  # otherwise the copied values stay (a layer scale's constant init)
    law = rules.law_for(module) if rules is not None else None
    own = _own_std(template, law) if template is not module else None
    if own is not None:  # drawn by a rule of its own (torchvision's RPN and detection heads: normal, std 0.01)
        nn.init.normal_(module.weight, 0.0, own)
    elif law is None:
        module.reset_parameters()
    else:
        fan_in, fan_out = _fans(module.weight)
        std = law.coef * _scale(law.law, fan_in, fan_out)
        if law.uniform:
            bound = std * math.sqrt(3)
            nn.init.uniform_(module.weight, -bound, bound)
        else:
            nn.init.normal_(module.weight, 0.0, std)
    bias = getattr(module, "bias", None)
    if bias is None:
        return
    t_bias = getattr(template, "bias", None)
    if isinstance(t_bias, torch.Tensor) and t_bias.device.type != "meta" and t_bias.numel() and (
            not bool(t_bias.any()) or (t_bias.numel() > 1 and bool((t_bias == t_bias.flatten()[0]).all()))):
        bias.fill_(t_bias.flatten()[0].item())  # the constructor set every bias alike: zeros, or a prior (RetinaNet's)
    elif law is not None:  # reset_parameters() did not run: PyTorch's default bias law
        bound = _fans(module.weight)[0] ** -0.5
        nn.init.uniform_(bias, -bound, bound)


def _own_std(template: nn.Module, law: _Law | None) -> float | None:
    """The std of ``template``'s weight when the model's law for its kind would have drawn it over twice as wide or
    narrow (its constructor drew this layer by a rule of its own, a constant std); else ``None``."""
    w = getattr(template, "weight", None)
    if law is None or not isinstance(w, torch.Tensor) or w.device.type == "meta" or w.numel() < 2:
        return None
    expected = law.coef * _scale(law.law, *_fans(w))
    sample = w.detach().flatten()[:_KURTOSIS_SAMPLE]  # decides as the whole would: a twofold gap is 30 standard errors
    if expected > 0 and sample.numel() > 1 and 0.5 < sample.float().std().item() / expected < 2.0:
        return None
    std = w.float().std().item()
    return std if std > 0 and expected > 0 and not 0.5 < std / expected < 2.0 else None


def redrawn(module: nn.Module, rules: InitRules | None) -> list[str]:
    """The parameters of ``module`` that :func:`reinit` overwrites whatever they hold (a copy to reinitialise
    need not copy their values): a norm's weight and bias, a conv's or linear's when a law or torch's own
    ``reset_parameters`` draws them."""
    names: tuple[str, ...] = ()
    if isinstance(module, NORMS):
        names = ("weight", "bias")
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and (
            type(module).reset_parameters in _TORCH_RESETS or (rules is not None and rules.law_for(module))):
        names = ("weight", "bias")
    return [n for n in names if module._parameters.get(n) is not None]


_TORCH_RESETS = (nn.modules.conv._ConvNd.reset_parameters, nn.Linear.reset_parameters)


def _reinit_norm(module: nn.Module, template: nn.Module) -> None:
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        t = getattr(template, name, None)
        if p is None:
            continue
        if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel() and bool((t == t.flatten()[0]).all()):
            p.fill_(t.flatten()[0].item())
        else:
            p.fill_(1.0 if name == "weight" else 0.0)
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
        module.reset_running_stats()
