"""The feature-pyramid side of a network: the channel groups of its neck and heads, and the heads' conv towers.

A detector's trunk computes one map per place in the graph; its feature network (an FPN, a BiFPN) joins maps of
several sizes, and its heads run the same layers over every level. So a channel group whose layers write maps of
two or more spatial sizes belongs to the neck or a head, and so does every group a layer computes from one of them
(the RoI heads after pooled features). EfficientDet scales these by their own rule (:mod:`compscale.detection`).

A *tower* is a head's run of identical shape-keeping conv units (``Conv-Norm-ReLU`` x 4 in RetinaNet's and FCOS's
heads, the RPN's one conv, Mask R-CNN's mask convs): a container in the neck/head part whose children, or whose
children taken ``k`` at a time, repeat one unit holding one ``C -> C`` convolution of stride 1. A neck's repeated
cells (EfficientDet's BiFPN layers) are a container there of two or more identical modules of several convolutions
each.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compscale.analyse.channels import ChannelGraph
from compscale.trace import Traced

__all__ = ["Tower", "find_towers", "pyramid_groups"]


def pyramid_groups(traced: Traced, cg: ChannelGraph) -> set[int]:
    """The groups of the neck and heads (none for a network without a feature pyramid):

    - a group whose layers write maps of several sizes (squeeze-excitation layers, which write one value per map,
      aside), or that a layer called on maps of several sizes (a head shared by the levels) reads or writes;
    - a group a layer computes from one of those (the RoI heads after pooled features);
    - a group that several layers write and that only layers writing neck groups read (an FPN's lateral 1x1 convs,
      added level to level, whose sum its output convs read).
    """
    sizes: dict[str, set[tuple[int, ...]]] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and traced.has_shape(node):
            sizes.setdefault(str(node.target), set()).add(tuple(traced.shape(node)[2:]))
    free = {g.id for g in cg.groups if g.fixed is None}
    layers = [la for la in cg.layers.values() if not la.pooled]
    neck = {g.id for g in cg.groups if len({s for p in g.producers if p in cg.layers and not cg.layers[p].pooled
                                             for s in sizes.get(p, ())}) > 1}
    for la in layers:
        if len(sizes.get(la.path, ())) > 1:
            neck |= {la.output, *(g for g, _ in la.inputs)}
    neck &= free
    readers: dict[int, list[int]] = {}
    for la in cg.layers.values():
        for g, _ in la.inputs:
            readers.setdefault(g, []).append(la.output)
    while True:  # to a fixed point
        before = len(neck)
        neck |= {la.output for la in cg.layers.values() if la.output in free and any(g in neck for g, _ in la.inputs)}
        neck |= {g.id for g in cg.groups if g.id in free and len(g.producers) > 1 and readers.get(g.id)
                 and all(o in neck for o in readers[g.id])}
        if len(neck) == before:
            return neck


@dataclasses.dataclass(frozen=True)
class Tower:
    """A head's conv tower (``kind="head"``), or a neck's repeated cells (``"neck"``: BiFPN layers): the children of
    container ``path``, ``units`` units of ``period`` children each."""

    path: str
    units: int
    period: int
    kind: str = "head"


def find_towers(root: nn.Module, layers: set[str]) -> list[Tower]:
    """The towers of ``root`` whose convolutions are all in ``layers`` (the neck/head layers), outermost first.

    Two units or more, or one unit that is a module of its own (the RPN's ``Sequential(Conv2dNormActivation)``): a
    container holding one unit's layers (an FPN's ``Conv2dNormActivation`` output conv) is a layer, not a tower.
    """
    towers: list[Tower] = []
    for path, container in root.named_modules():
        if not isinstance(container, nn.Sequential) or any(path.startswith(t.path + ".") for t in towers):
            continue
        convs = [f"{path}.{n}" for n, m in container.named_modules() if n and isinstance(m, nn.Conv2d)]
        if not convs or not all(c in layers for c in convs):
            continue
        children = list(container.children())
        if _cells(children):
            towers.append(Tower(path, len(children), 1, "neck"))
            continue
        for period in (1, 2, 3, 4):
            units = [children[i:i + period] for i in range(0, len(children), period)]
            if len(children) % period or (len(units) < 2 and not (period == 1 and list(children[0].children()))):
                continue
            signatures = {_signature(u) for u in units}
            if len(signatures) == 1 and None not in signatures:
                towers.append(Tower(path, len(units), period))
                break
    return towers


def _cells(children: list[nn.Module]) -> bool:
    """Two or more modules of one type and the same parameter shapes, each holding several convolutions: a neck's
    repeated layers (EfficientDet's BiFPN cells), which pass the levels on to the next."""
    if len(children) < 2 or len({type(c) for c in children}) != 1:
        return False
    shapes = {tuple((n, tuple(p.shape)) for n, p in c.named_parameters()) for c in children}
    return len(shapes) == 1 and sum(isinstance(m, nn.modules.conv._ConvNd) for m in children[0].modules()) > 1


def _signature(unit: list[nn.Module]) -> tuple[object, ...] | None:
    """The unit's module types and its one conv's shape, when it holds exactly one ``C -> C`` stride-1 spatial
    convolution; else ``None``."""
    convs = [m for u in unit for m in u.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if len(convs) != 1:
        return None
    c = convs[0]
    if c.in_channels != c.out_channels or any(s != 1 for s in c.stride) or c.groups != 1:
        return None
    return (*(type(m) for u in unit for m in u.modules()), c.in_channels, c.kernel_size)
