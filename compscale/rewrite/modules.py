"""Module surgery shared by the rewrite passes: resize a layer, replace or insert a submodule."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from compscale.layers import channels, init_like, resize, set_submodule

__all__ = [
    "channels", "insert_after", "move_after", "next_name", "remove_children", "resize", "resize_param", "set_submodule",
]  # channels, resize and set_submodule live in compscale.layers (the tracer and the analyses use them too)


@torch.no_grad()
def resize_param(root: nn.Module, target: str, dim: int, size: int) -> bool:
    """Give tensor attribute ``target`` of ``root`` (a layer scale) ``size`` entries along ``dim``.

    The new tensor is initialised as the old one was when that is evident: a constant (ConvNeXt's layer
    scale, ``1e-6 * ones``) stays that constant; other values are drawn from a normal of the old values'
    mean and standard deviation. Returns whether it changed.
    """
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    old = getattr(owner, name)
    if old.shape[dim] == size:
        return False
    shape = list(old.shape)
    shape[dim] = size
    new = init_like(old, shape)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(owner, name, new)
    return True


def next_name(existing: Sequence[str], after: str) -> str:
    """The name of a new child following ``after``: the next free index (``3`` after ``2``, ``b1-3`` after ``b1-2``)."""
    m = re.fullmatch(r"(.*?)(\d+)", after)
    prefix, k = (m.group(1), int(m.group(2))) if m else (after + "_", 0)
    taken = set(existing)
    while f"{prefix}{k}" in taken:
        k += 1
    return f"{prefix}{k}"


def insert_after(parent: nn.Module, after: str, modules: Sequence[nn.Module]) -> None:
    """Insert ``modules`` after child ``after`` of ``parent`` (a Sequential or ModuleList, in order).

    When every child name is an index, the children are renumbered so that indices stay consecutive, as
    in a container built with the new blocks from the start; otherwise new names follow ``next_name``.
    """
    items = list(parent._modules.items())
    pos = [k for k, _ in items].index(after) + 1
    numbered = all(k.isdigit() for k, _ in items)
    names: list[str] = []
    for _ in modules:
        names.append(next_name([k for k, _ in items] + names, names[-1] if names else after))
    merged = items[:pos] + list(zip(names, modules)) + items[pos:]
    if numbered:
        merged = [(str(i), m) for i, (_, m) in enumerate(merged)]
    parent._modules = OrderedDict(merged)


def remove_children(parent: nn.Module, names: Sequence[str]) -> None:
    """Drop children ``names`` of ``parent``; index-named children are renumbered to stay consecutive."""
    items = [(k, m) for k, m in parent._modules.items() if k not in set(names)]
    if all(k.isdigit() for k in parent._modules):
        items = [(str(i), m) for i, (_, m) in enumerate(items)]
    parent._modules = OrderedDict(items)


def move_after(parent: nn.Module, name: str, after: str) -> None:
    """Reorder ``parent``'s children so that ``name`` directly follows ``after`` (module order = call order)."""
    items = [(k, m) for k, m in parent._modules.items() if k != name]
    pos = [k for k, _ in items].index(after) + 1
    parent._modules = OrderedDict([*items[:pos], (name, parent._modules[name]), *items[pos:]])
