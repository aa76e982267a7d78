"""Randomness compscale owns: generators of its own, handed to the random draws made in a scope.

A ``scale()`` call draws new weights, and an analysis probes an unknown op on random inputs (running the op itself,
which may draw); neither reseeds nor consumes torch's global generator, which the user's training and other threads
share. :class:`Draws` holds one ``torch.Generator`` per device, seeded once; :func:`drawing_from` gives it, on this
thread, to every random fill (``Tensor.normal_``, ``nn.init``'s functions) and every function that draws and takes
``generator=`` (``torch.randn_like``, ``torch.bernoulli``...) called without one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

__all__ = ["Draws", "drawing_from"]


class Draws:
    """The random draws of one ``scale()`` call: one ``torch.Generator`` per device, all seeded from ``seed``.

    Without a seed, the seed is one draw of torch's global generator (so ``torch.manual_seed`` still makes the call
    reproducible), which is neither reseeded nor drawn from again.

    Example:
        >>> a, b = Draws(3), Draws(3)
        >>> torch.equal(torch.randn(4, generator=a.on("cpu")), torch.randn(4, generator=b.on("cpu")))
        True
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int(torch.randint(2**62, (1,)).item()) if seed is None else int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device | str) -> torch.Generator:
        """The generator for tensors on ``device`` (made, seeded, on first use)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]


_B = torch._C.TensorBase
_FILLS = frozenset({_B.uniform_, _B.normal_, _B.random_, _B.exponential_, _B.geometric_, _B.log_normal_, _B.cauchy_,
                    _B.bernoulli_})
# functions that draw and take ``generator=`` (an op that draws inside without one, F.dropout, cannot be redirected)
_DRAWS = frozenset({torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
                    torch.randint_like, torch.bernoulli, torch.normal, torch.multinomial, torch.poisson})


class _Drawing(TorchFunctionMode):
    """Gives every random draw without a generator (a fill method, a drawing function, or any function taking
    ``generator=``, as ``nn.init``'s do) the generator of its tensor's device. Torch function modes are per thread."""

    def __init__(self, draws: Draws) -> None:
        super().__init__()
        self.draws = draws

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kw = dict(kwargs or {})
        if not (func in _FILLS or func in _DRAWS or "generator" in kw) or kw.get("generator") is not None:
            return func(*args, **kw)  # most calls: nothing drawn, or drawn from a generator given
        if not any(isinstance(a, fx.Proxy) for a in (*args, *kw.values())):  # a traced draw stays as written
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else kw.get("tensor", kw.get("input"))
            device = tensor.device if isinstance(tensor, torch.Tensor) else torch.device(kw.get("device") or "cpu")
            if device.type != "meta":
                kw["generator"] = self.draws.on(device)
        return func(*args, **kw)


@contextlib.contextmanager
def drawing_from(draws: Draws) -> Iterator[Draws]:
    """Within this block, on this thread, random fills draw from ``draws`` instead of torch's global generator."""
    with _Drawing(draws):
        yield draws
