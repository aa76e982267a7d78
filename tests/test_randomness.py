"""Every draw of a ``scale()`` call comes from generators compscale owns: seeded calls on several threads equal the
serial one, and a thread drawing from torch's global generator meanwhile sees the numbers it would see alone."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import compscale
from recipes.models import tiny_resnet


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    return tiny_resnet()


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def in_threads(fn: Callable[[], nn.Module], threads: int, calls: int) -> list[nn.Module]:
    results: list[nn.Module] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(calls):
                results.append(fn())
        except BaseException as e:  # reported by the test
            errors.append(e)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]
    return results


def global_draws_during(fn: Callable[[], object]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What a thread drawing ``torch.randn`` from the global generator (seeded 123) got while ``fn`` ran, and what
    it draws alone."""
    stop = threading.Event()
    got: list[torch.Tensor] = []

    def draw() -> None:
        while not stop.is_set() or len(got) < 10:
            got.append(torch.randn(32))
            time.sleep(1e-4)  # leave the cores to the calls under test

    torch.manual_seed(123)
    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        fn()
    finally:
        stop.set()
        drawer.join()
    alone = torch.Generator().manual_seed(123)
    return got, [torch.randn(32, generator=alone) for _ in got]


@pytest.mark.parametrize("init", ["fresh", "preserve"])
def test_seeded_calls_on_threads_equal_the_serial_one(init: str) -> None:
    base = small_resnet()
    serial = compscale.scale(copy.deepcopy(base), phi=1, seed=0, input_size=32, init=init)
    threaded = in_threads(lambda: compscale.scale(copy.deepcopy(base), phi=1, seed=0, input_size=32, init=init), 2, 2)
    assert len(threaded) == 4 and all(states_equal(t, serial) for t in threaded)


def test_another_threads_global_draws_are_untouched_by_seeded_calls() -> None:
    base = small_resnet()
    got, alone = global_draws_during(
        lambda: in_threads(lambda: compscale.scale(copy.deepcopy(base), phi=1, seed=0, input_size=32), 2, 1))
    assert all(torch.equal(a, b) for a, b in zip(got, alone))


def test_a_seeded_call_neither_reseeds_nor_draws_from_the_global_generator() -> None:
    base = small_resnet()
    state = torch.random.get_rng_state()
    a = compscale.scale(base, phi=1, seed=4, input_size=32)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = compscale.scale(base, phi=1, seed=4, input_size=32)
    c = compscale.scale(base, phi=1, seed=5, input_size=32)
    assert states_equal(a, b) and not states_equal(a, c)


def test_an_unseeded_call_takes_one_draw_of_the_global_generator_as_its_seed() -> None:
    """``torch.manual_seed`` still makes an unseeded call reproducible, and the draws after it go on."""
    base = small_resnet()
    torch.manual_seed(7)
    a = compscale.scale(base, phi=1, input_size=32)
    after_a = torch.randn(8)
    torch.manual_seed(7)
    b = compscale.scale(base, phi=1, input_size=32)
    assert states_equal(a, b) and torch.equal(torch.randn(8), after_a)
    torch.manual_seed(7)
    torch.randint(2**62, (1,))  # the one draw
    assert torch.equal(torch.randn(8), after_a)


@pytest.mark.slow
def test_four_threads_of_five_seeded_resnet18_calls_equal_the_serial_one() -> None:
    """The acceptance check of issue 22: 4 threads x 5 calls of ``scale(copy.deepcopy(resnet18()), phi=1,
    seed=0)``, while another thread draws from the global generator."""
    torch.manual_seed(0)
    base = resnet18()
    serial = compscale.scale(copy.deepcopy(base), phi=1, seed=0)
    results: list[nn.Module] = []
    got, alone = global_draws_during(
        lambda: results.extend(in_threads(lambda: compscale.scale(copy.deepcopy(base), phi=1, seed=0), 4, 5)))
    assert len(results) == 20 and all(states_equal(r, serial) for r in results)
    assert all(torch.equal(a, b) for a, b in zip(got, alone))


def _jitter(x: torch.Tensor) -> torch.Tensor:
    """A per-channel op with no channel rule, which draws: compscale probes it by running it."""
    return x + 0.01 * torch.randn_like(x)


class _Jittery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_jitter(self.conv(x)))


def test_probing_an_op_that_draws_leaves_the_global_generator_to_other_threads() -> None:
    """The probe runs the user's op several times with the same draws: from a generator of compscale's own, not by
    seeding torch's global one, which would repeat another thread's numbers."""
    nets = [_Jittery() for _ in range(3)]  # built first: a constructor draws from the global generator
    scaled: list[nn.Module] = []
    got, alone = global_draws_during(lambda: scaled.extend(
        compscale.scale(net, width=2.0, input_size=16, autowrap_functions=[_jitter], seed=0) for net in nets))
    assert all(torch.equal(a, b) for a, b in zip(got, alone))
    assert all(s.conv.out_channels == 16 and s.head.in_channels == 16 for s in scaled)  # probed: one channel to one
