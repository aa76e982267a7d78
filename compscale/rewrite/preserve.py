"""Function-preserving growth (``scale(..., init="preserve")``): Net2Net over channel groups, identity new blocks.

Width (Chen et al., "Net2Net", 2016): each channel group gets a *source map*, new channel -> the old channel it
copies (the old channels first, then copies). Every layer writing the group takes each source's incoming
weights, bias, norm affine and running statistics; every layer reading it divides a source's outgoing weights by
the number of copies it sums over. One map per group keeps this consistent through residual adds, depthwise
convs, squeeze-excitation and Linear heads; a concatenation reads its parts' maps one after another, a split
or a shuffle derives its pieces' maps from the whole's. Copies stay inside the blocks of grouped convs and
group norms, so a grouped conv still sums only what it summed.

Depth: a new residual block starts with its branch at zero (the branch's last norm, else its last conv or layer
scale, zeroed: found by trying them on the block), a new plain unit as an identity conv, and a new dense layer's
channels are cancelled (zero weights) in the layers outside the new ones that read them.

What cannot be grown exactly (a LayerNorm over channels copied unevenly, a unit whose activation is not identity
on its input, a shrunken layer) gets its closest form and is noted in :attr:`Growth.inexact`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compscale.analyse.channels import ChannelGraph
from compscale.layers import NORMS, STANDARD_TENSORS, channels
from compscale.trace.tracer import eval_mode

__all__ = [
    "Growth", "cancel_map", "cancel_new_channels", "layer_maps", "probe_input", "source_maps", "transplant",
    "transplant_param", "zero_layer",
]

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


@dataclasses.dataclass
class Growth:
    """One ``init="preserve"`` call: its noise, its seeded generator, and what it could not grow exactly.

    Attributes:
        noise: relative std of the noise added to the incoming weights of copied channels (0: exact copies).
        seed: seeds the choice of source channels (and the noise).
        inexact: path -> why, for every layer or block that does not compute exactly what it did.
        grown: ids of the parameters grown from the model's own (``kept``: its parameters' ids); they keep their
            ``requires_grad``, where a new block's are made trainable.
    """

    noise: float = 0.0
    seed: int = 0
    inexact: dict[str, str] = dataclasses.field(default_factory=dict)
    grown: set[int] = dataclasses.field(default_factory=set)
    kept: set[int] = dataclasses.field(default_factory=set)

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def note(self, path: str, why: str) -> None:
        self.inexact.setdefault(path, why)

    # -- depth -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def zero_branch(self, block: nn.Module, x: torch.Tensor, name: str) -> None:
        """Make a new residual ``block`` the identity: zero its branch's last norm (weight and bias), else the
        last conv/linear or a layer-scale parameter, whichever makes ``block(x) == x`` on ``x``, an input like the
        ones it will be fed (:func:`probe_input`)."""
        try:
            found = _zero_branch(block, x)
        except Exception:  # the block needs other inputs (a mask): zero its last norm unchecked
            layers = [m for m in block.modules() if isinstance(m, (*NORMS, *_LAYERS))]
            last = [m for m in layers if isinstance(m, NORMS)] or layers
            if last:
                zero_layer(last[-1])
            self.note(name, "a new block that could not be run alone: its last norm was zeroed unchecked")
            return
        if not found:
            self.note(name, "a new block that no zeroed layer makes the identity (an activation after its residual "
                            "add, a channel shuffle): its last norm was zeroed")

    @torch.no_grad()
    def identity_unit(self, unit: nn.Module, x: torch.Tensor, name: str) -> None:
        """Make a new plain unit (conv-norm-activation, depthwise + pointwise) the identity: Dirac convs, identity
        norms; where the unit sums branches (RepVGG), only one branch is kept. Checked on ``x``, an input like the
        ones it will be fed (:func:`probe_input`)."""
        try:
            if _zero_branch(unit, x, fallback=False):  # a unit that adds its input back (ResNeSt's, in a plain net)
                return
        except Exception:
            self.note(name, "a new unit that could not be run alone: it was left as drawn")
            return
        norms: list[nn.Module] = [m for m in unit.modules() if isinstance(m, NORMS)]
        for layer in (m for m in unit.modules() if isinstance(m, _LAYERS)):
            if not _dirac(layer):
                self.note(name, f"a new unit whose {type(layer).__name__} cannot be an identity (in != out or strided)")
                return
        for norm in norms:
            _identity_norm(norm)
        if _is_identity(unit, x):
            return
        for keep in norms:  # branches summed (RepVGG): keep one path
            if _zeroes_to_identity(unit, x, [t for m in norms if m is not keep for t in _tensors(m)]):
                return
        self.note(name, "a new unit whose activation is not the identity on its input: it starts as identity convs "
                        "and norms, close to but not exactly the identity")


# -- source maps --------------------------------------------------------------------------------------------------

def cancel_map(old: int, new: int) -> torch.Tensor:
    """The map of a group that grew by channels to be cancelled: the old channels, then ``-1`` (no source)."""
    return torch.cat([torch.arange(min(old, new)), torch.full((max(0, new - old),), -1, dtype=torch.long)])


def source_maps(root: nn.Module, cg: ChannelGraph, old: Mapping[int, int], new: Mapping[int, int],
                growth: Growth, cancel: bool = False, cancelled: Iterable[int] = ()) -> dict[int, torch.Tensor]:
    """Per channel group, its source map: ``map[c]`` is the old channel new channel ``c`` copies (``-1``: none).

    ``root`` holds the layers as they were (their ``groups`` make the blocks copies stay in). With ``cancel``, new
    channels get no source (their readers zero them) instead of a copy; groups in ``cancelled`` have none at all.
    """
    blocks = _blocks(root, cg)
    derive: dict[int, tuple[str, list[int]]] = {}
    cuts: dict[int, list[list[int]]] = {}
    pieces_of: dict[int, list[tuple[int, str, list[int], int]]] = {}  # a group -> the relations it is a piece in
    for whole, kind, sources in _relations(cg):
        derive.setdefault(whole, (kind, sources))
        if kind == "concat" and len(sources) > 1:
            cuts.setdefault(whole, []).append(sources)
        for i, s in enumerate(sources):
            pieces_of.setdefault(s, []).append((whole, kind, sources, i))
    gone = set(cancelled)
    maps: dict[int, torch.Tensor] = {}

    def atomic(g: int) -> torch.Tensor:
        if g in gone:
            return torch.full((new[g],), -1, dtype=torch.long)
        if cancel:
            return cancel_map(old[g], new[g])
        return _spread(old[g], new[g], blocks.get(g, 1), growth.generator)


    def get(g: int, visiting: frozenset[int]) -> torch.Tensor:
        if g in maps:
            return maps[g]
        m = None
        clash = False
        for whole, kind, sources, i in pieces_of.get(g, ()):  # a piece of a whole already mapped (a split's half)
            if whole not in maps and whole not in visiting and len(cuts.get(whole, ())) > 1:
                get(whole, visiting | {g})  # a whole cut several ways is mapped first, its pieces follow
            if whole in maps and g not in gone:
                m = _extract(kind, maps[whole], i, [old[s] for s in sources], [new[s] for s in sources])
                if m is not None:
                    break
                clash = True
        if clash and m is None and not cancel:
            members = [p for p, _ in cg.groups[g].members] or [p for p, _ in cg.groups[whole].members]
            growth.note(members[0] if members else f"channel group {g}",
                        "its copies cannot follow two ways of cutting one tensor (a split after a channel shuffle)")
        how = derive.get(g)
        if m is None and g not in gone and not cancel and len(cuts.get(g, ())) > 1:
            m = _refined(cuts[g], old, new, growth.generator)  # cut two ways (MixConv's pw and dw splits)
        if m is None and how is not None and g not in gone and not any(s in visiting for s in how[1]):
            kind, sources = how
            parts = [get(s, visiting | {g}) for s in sources]
            m = _combine(kind, parts, [old[s] for s in sources])
            if len(m) != new[g]:
                m = None
        maps[g] = atomic(g) if m is None else m
        return maps[g]

    for group in cg.groups:
        get(group.id, frozenset())
    return maps


def layer_maps(cg: ChannelGraph, maps: Mapping[int, torch.Tensor], old: Mapping[int, int],
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per conv/linear/norm/depthwise path and layer-scale parameter: ``(out_map, in_map)`` over its channels."""
    result = {path: (maps[lc.output], _segments(maps, old, lc.inputs)) for path, lc in cg.layers.items()}
    per_channel = [*cg.norms.items(), *cg.depthwise.items(), *((t, gs) for t, (_, gs) in cg.params.items())]
    for path, gs in per_channel:
        m = _segments(maps, old, [(g, 1) for g in gs])
        result[path] = (m, m)
    return result


def _segments(maps: Mapping[int, torch.Tensor], old: Mapping[int, int], segments: Iterable[tuple[int, int]],
              ) -> torch.Tensor:
    """The map of a concatenation of groups (each ``factor`` times over, after a flatten): old offsets add up."""
    out, offset = [], 0
    for g, f in segments:
        m = maps[g]
        if f != 1:  # flatten: channel-major, c * f + p
            m = torch.where(m[:, None] >= 0, m[:, None] * f + torch.arange(f), -1).flatten()
        out.append(torch.where(m >= 0, m + offset, -1))
        offset += old[g] * f
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _combine(kind: str, parts: list[torch.Tensor], olds: list[int]) -> torch.Tensor:
    """A derived group's map: its pieces one after another (``concat``), ``k`` blocks of one map (``blocks:k``), or
    ``k`` interleaved copies of one map (``interleave:k``, channel ``c * k + j``)."""
    if kind == "concat":
        offsets = [sum(olds[:i]) for i in range(len(olds))]
        return torch.cat([torch.where(p >= 0, p + o, -1) for p, o in zip(parts, offsets)])
    k = int(kind.split(":")[1])
    m, b = parts[0], olds[0]
    if kind.startswith("blocks"):
        return torch.cat([torch.where(m >= 0, m + j * b, -1) for j in range(k)])
    c = torch.arange(len(m) * k)
    base = m[c // k]
    return torch.where(base >= 0, base * k + c % k, -1)


def _refined(cuts: list[list[int]], old: Mapping[int, int], new: Mapping[int, int],
             generator: torch.Generator) -> torch.Tensor | None:
    """The map of a tensor cut into pieces at several places: copies stay inside the cells between all the cuts, so
    that every piece's channels keep their own sources. ``None`` if the cuts do not grow consistently."""
    bounds: dict[int, int] = {}
    for pieces in cuts:
        o = n = 0
        for p in pieces:
            o, n = o + old[p], n + new[p]
            if bounds.setdefault(o, n) != n:
                return None
    edges = sorted(bounds.items())
    if any(b[1] < a[1] for a, b in itertools.pairwise(edges)):
        return None
    out, prev = [], (0, 0)
    for o, n in edges:
        cell = _spread(o - prev[0], n - prev[1], 1, generator)
        out.append(torch.where(cell >= 0, cell + prev[0], -1))
        prev = (o, n)
    return torch.cat(out)


def _extract(kind: str, whole: torch.Tensor, i: int, olds: list[int], news: list[int]) -> torch.Tensor | None:
    """Piece ``i``'s map out of its whole's (the inverse of :func:`_combine`), or ``None`` if the whole's map does
    not hold the piece's channels where the piece's map would put them."""
    if kind == "concat":
        start, offset = sum(news[:i]), sum(olds[:i])
        m = whole[start:start + news[i]]
        m = torch.where(m >= 0, m - offset, -1)
    elif kind.startswith("blocks"):
        m = whole[:news[0]]
    else:
        k = int(kind.split(":")[1])
        m = torch.where(whole[0::k] >= 0, whole[0::k] // k, -1)
    if len(m) != news[i] or ((m >= olds[i]) | (m < -1)).any():
        return None
    if kind != "concat" and not torch.equal(_combine(kind, [m], olds), whole):
        return None  # the whole's copies are not k blocks (or k interleaved copies) of one map
    return m


def _relations(cg: ChannelGraph) -> list[tuple[int, str, list[int]]]:
    """``(whole, kind, pieces)``: a group that is others put together (see :func:`_combine`): a sum of pieces, a
    whole cut in parts, the wider side of a tie. A group may be the whole of several (both halves of one split)."""
    found: list[tuple[int, str, list[int]]] = [(s, "concat", list(pieces)) for s, pieces in cg.sums.items()]
    cut: list[tuple[int, list[int]]] = []  # one split's pieces come in a row, from index 0
    for p in cg.parts:
        if p.index == 0 or not cut or cut[-1][0] != p.whole:
            cut.append((p.whole, []))
        cut[-1][1].append(p.piece)
    found += [(whole, "concat", pieces) for whole, pieces in cut]
    for out, src, factor in cg.ties:
        if factor == 1 or (factor > 1 and factor.denominator != 1) or (factor < 1 and factor.numerator != 1):
            continue
        big, small, k = (out, src, int(factor)) if factor > 1 else (src, out, int(1 / factor))
        kind = "interleave" if (out, src) in cg.interleaved else "blocks"
        found.append((big, f"{kind}:{k}", [small]))
    return found


def _blocks(root: nn.Module, cg: ChannelGraph) -> dict[int, int]:
    """Per group, the number of blocks its copies must stay in: the lcm of the grouped convs' and group norms'
    groups over it (a conv whose groups are its inputs, a depthwise multiplier, is not one)."""
    blocks: dict[int, int] = {}

    def need(g: int, k: int) -> None:
        blocks[g] = math.lcm(blocks.get(g, 1), k)

    for path, lc in cg.layers.items():
        m = root.get_submodule(path)
        k = getattr(m, "groups", 1)
        if k > 1 and k != channels(m)[0]:
            need(lc.output, k)
            if len(lc.inputs) == 1 and lc.inputs[0][1] == 1:
                need(lc.inputs[0][0], k)
    for path, gs in cg.norms.items():
        m = root.get_submodule(path)
        if isinstance(m, nn.GroupNorm) and len(gs) == 1:
            need(gs[0], m.num_groups)
    return blocks


def _spread(old: int, new: int, blocks: int, generator: torch.Generator) -> torch.Tensor:
    """``new`` channels over ``old``, per block: the block's own channels, then copies (each channel as often as
    the others when ``new`` is a multiple of ``old``, else from shuffled rounds). Shrinking keeps the first ones."""
    if old == new:
        return torch.arange(new)
    if old == 0:
        return torch.full((new,), -1, dtype=torch.long)
    if old % blocks or new % blocks:
        blocks = 1
    ob, nb = old // blocks, new // blocks
    out = []
    for k in range(blocks):
        if nb <= ob:
            idx = torch.arange(nb)
        else:
            extra = nb - ob
            if extra % ob == 0:
                src = torch.arange(ob).repeat(extra // ob)
            else:
                src = torch.cat([torch.randperm(ob, generator=generator) for _ in range(-(-extra // ob))])[:extra]
            idx = torch.cat([torch.arange(ob), src])
        out.append(idx + k * ob)
    return torch.cat(out)


# -- layers ------------------------------------------------------------------------------------------------------

@torch.no_grad()
def transplant(new: nn.Module, old: nn.Module, out_map: torch.Tensor, in_map: torch.Tensor, growth: Growth,
               path: str) -> None:
    """Give ``new`` (``old`` resized, freshly initialised) ``old``'s trained values along the source maps.

    A conv/linear copies each output's incoming weights from its source and divides each input's weights by the
    number of copies of its source the output sums over; inputs without a source (cancelled channels) get zero
    weights, outputs without one keep their fresh weights. A norm copies its per-channel values.
    """
    if getattr(new, "transposed", False):
        growth.note(path, "a transposed conv: drawn fresh")
        return
    if isinstance(new, _LAYERS):
        _transplant_layer(new, old, out_map, in_map, growth)
    elif isinstance(new, NORMS):
        _transplant_norm(new, old, out_map, growth, path)
    if any(id(p) in growth.kept for p in old.parameters(recurse=False)):  # grown from the model's own layer
        growth.grown.update(id(p) for p in new.parameters(recurse=False))


def transplant_param(new: torch.Tensor, old: torch.Tensor, dim: int, m: torch.Tensor) -> None:
    """A per-channel tensor (a layer scale) copies its sources along ``dim``."""
    has = (m >= 0).nonzero().flatten().to(new.device)
    with torch.no_grad():
        new.index_copy_(dim, has, old.index_select(dim, m.to(old.device)[has]))


def _transplant_layer(new: Any, old: Any, out_map: torch.Tensor, in_map: torch.Tensor, growth: Growth) -> None:
    wn, wo = new.weight, old.weight
    device = wo.device
    out_map, in_map = out_map.to(device), in_map.to(device)
    groups = getattr(new, "groups", 1)
    o_new, ipg_new = wn.shape[:2]
    o_old, ipg_old = wo.shape[:2]
    opg_new, opg_old = o_new // groups, o_old // getattr(old, "groups", 1)
    i_old = ipg_old * getattr(old, "groups", 1)
    q = torch.arange(o_new, device=device) // opg_new  # each output's conv group
    gi = q[:, None] * ipg_new + torch.arange(ipg_new, device=device)[None, :]
    src_in = in_map[gi]
    src_o = out_map
    has_o = src_o >= 0
    local = src_in - (src_o.clamp(min=0) // opg_old)[:, None] * ipg_old
    ok = (src_in >= 0) & has_o[:, None] & (local >= 0) & (local < ipg_old)
    # copies of one source that a conv group sums over
    flat = in_map.view(groups, ipg_new)
    qi = torch.arange(groups, device=device)[:, None].expand_as(flat)
    valid = flat >= 0
    counts = torch.bincount((qi * i_old + flat.clamp(min=0))[valid], minlength=groups * i_old)
    count = counts[q[:, None] * i_old + src_in.clamp(min=0)].clamp(min=1)
    w = wo[src_o.clamp(min=0)[:, None], local.clamp(0, ipg_old - 1)]
    extra = (1,) * (w.dim() - 2)
    w = w / count.view(*count.shape, *extra).to(w.dtype)
    w = torch.where(ok.view(*ok.shape, *extra), w, torch.zeros((), dtype=w.dtype, device=device))
    rows = has_o.nonzero().flatten()
    if growth.noise > 0:
        copies = torch.bincount(src_o[has_o], minlength=o_old)
        dup = has_o & (copies[src_o.clamp(min=0)] > 1)
        noise = torch.randn(w.shape, generator=growth.generator).to(device, w.dtype)
        w = w + dup.view(-1, *(1,) * (w.dim() - 1)) * noise * (growth.noise * wo.float().std().item())
    wn[rows] = w[rows].to(wn.dtype)
    if getattr(new, "bias", None) is not None and getattr(old, "bias", None) is not None:
        new.bias[rows] = old.bias[src_o[rows]]
    _transplant_extras(new, old, src_o, rows)


def _transplant_norm(new: Any, old: Any, m: torch.Tensor, growth: Growth, path: str) -> None:
    m = m.to(old.weight.device if old.weight is not None else "cpu")
    rows = (m >= 0).nonzero().flatten()
    for name in ("weight", "bias", "running_mean", "running_var"):
        t_new, t_old = getattr(new, name, None), getattr(old, name, None)
        if isinstance(t_new, torch.Tensor) and isinstance(t_old, torch.Tensor) and t_new.dim() == 1:
            t_new[rows] = t_old[m[rows]]
    if getattr(old, "num_batches_tracked", None) is not None and getattr(new, "num_batches_tracked", None) is not None:
        new.num_batches_tracked.copy_(old.num_batches_tracked)
    _transplant_extras(new, old, m, rows)
    if isinstance(new, nn.modules.batchnorm._NormBase):
        return  # per channel: exact (channels without a source are cancelled by their readers)
    groups = new.num_groups if isinstance(new, nn.GroupNorm) else 1
    if not _even(m, groups, len(old.weight) if old.weight is not None else int(m.max()) + 1):
        growth.note(path, f"a {type(new).__name__} over channels copied unevenly: its statistics change")


def _transplant_extras(new: nn.Module, old: nn.Module, m: torch.Tensor, rows: torch.Tensor) -> None:
    """Per-output-channel tensors a subclass adds (a ``gain``) copy their sources too."""
    for name, t in [*new._parameters.items(), *new._buffers.items()]:
        t_old = getattr(old, name, None)
        if name in STANDARD_TENSORS or t is None or not isinstance(t_old, torch.Tensor) or not t.dim():
            continue
        if t.shape[0] == len(m) and t_old.shape[1:] == t.shape[1:]:
            with torch.no_grad():
                t[rows] = t_old[m[rows]]


def _even(m: torch.Tensor, groups: int, old: int) -> bool:
    """Whether a norm over ``groups`` groups sees the same statistics: each new group copies one old group,
    every channel of it equally often."""
    if (m < 0).any() or len(m) % groups or old % groups:
        return False
    nb, ob = len(m) // groups, old // groups
    for k in range(groups):
        piece = m[k * nb:(k + 1) * nb] - k * ob
        if (piece < 0).any() or (piece >= ob).any():
            return False
        counts = torch.bincount(piece, minlength=ob)
        if (counts != counts[0]).any() or counts[0] == 0:
            return False
    return True


# -- identity blocks ---------------------------------------------------------------------------------------------

def _zero_branch(block: nn.Module, x: torch.Tensor, fallback: bool = True) -> bool:
    """Zero the first of the branch's last norms, last layers and layer scales that makes ``block(x) == x``;
    if none does, the last norm (the closest form; with ``fallback``). Returns whether one did."""
    order = _call_order(block, x)
    candidates: list[list[torch.Tensor]] = [_tensors(m) for m in reversed(order) if isinstance(m, NORMS)][:3]
    candidates += [_tensors(m) for m in reversed(order) if isinstance(m, _LAYERS)][:2]
    candidates += [[p] for m in block.modules() if not isinstance(m, (*NORMS, *_LAYERS))
                   for p in m.parameters(recurse=False)]
    if any(_zeroes_to_identity(block, x, tensors) for tensors in candidates):
        return True
    if candidates and fallback:
        _zero(candidates[0])
    return False


def _zeroes_to_identity(module: nn.Module, x: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Zero ``tensors`` and keep them zeroed if that makes ``module(x) == x``; else restore them."""
    saved = [t.clone() for t in tensors]
    _zero(tensors)
    if _is_identity(module, x):
        return True
    for t, s in zip(tensors, saved):
        t.copy_(s)
    return False


@torch.no_grad()
def probe_input(last: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int],
                generator: torch.Generator) -> torch.Tensor:
    """What new blocks appended after ``last`` will be fed: ``last``'s output (eval mode) on a batch of 2
    standard-normal inputs of ``in_shape``; its sign matters (a ReLU after a residual add is the identity only on
    the previous ReLU's non-negative output). A non-negative normal batch if ``last`` does not run alone."""
    p = next(last.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    x = torch.randn((2, *in_shape[1:]), generator=generator).to(device, dtype)
    try:
        with eval_mode(last):
            y = last(x)
        if isinstance(y, torch.Tensor) and tuple(y.shape[1:]) == tuple(out_shape[1:]):
            return y
    except Exception:
        pass
    return torch.randn((2, *out_shape[1:]), generator=generator).abs().to(device, dtype)


def _is_identity(module: nn.Module, x: torch.Tensor) -> bool:
    with eval_mode(module), torch.no_grad():
        y = module(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return False
    return bool((y - x).abs().max() <= 1e-5 * x.abs().max().clamp(min=1e-12))


def _call_order(module: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The conv/linear/norm layers of ``module`` in the order one forward calls them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda *_, m=m: order.append(m)) for m in module.modules()
             if isinstance(m, (*NORMS, *_LAYERS))]
    try:
        with eval_mode(module), torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def zero_layer(m: nn.Module) -> None:
    """Zero a layer's weight and bias: it outputs zero (a conv, a linear) or passes zero on (a norm)."""
    _zero(_tensors(m))


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [t for t in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(t, torch.Tensor)]


def _zero(tensors: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for t in tensors:
            t.zero_()


def _dirac(m: nn.Module) -> bool:
    """Make a conv (any kernel, grouped or depthwise) or a square linear the identity; False if it cannot be."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor):
        return False
    if isinstance(m, nn.Linear):
        if m.in_features != m.out_features:
            return False
        nn.init.eye_(w)
    else:
        assert isinstance(m, nn.modules.conv._ConvNd)
        centred = all(p == (k - 1) // 2 * d for p, k, d in zip(_padding(m), m.kernel_size, m.dilation))
        if m.in_channels != m.out_channels or any(s != 1 for s in m.stride) or not centred:
            return False
        nn.init.dirac_(w, groups=m.groups)
    bias = getattr(m, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.zero_()
    return True


def _padding(m: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    if m.padding == "same":
        return tuple((k - 1) // 2 * d for k, d in zip(m.kernel_size, m.dilation))
    if isinstance(m.padding, str):
        return (0,) * len(m.kernel_size)
    return tuple(m.padding)


def _identity_norm(m: nn.Module) -> None:
    """A norm that passes its input through in eval mode (a BatchNorm: zero mean, unit variance, weight
    ``sqrt(1 + eps)``); a LayerNorm or GroupNorm at weight 1, bias 0 (the closest it gets)."""
    with torch.no_grad():
        eps = float(getattr(m, "eps", 0.0))
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        scale = 1.0
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            mean.zero_()
            var.fill_(1.0)
            scale = math.sqrt(1.0 + eps)
        for t, value in zip(_tensors(m), (scale, 0.0)):
            t.fill_(value)


# -- dense layers --------------------------------------------------------------------------------------------------

def cancel_new_channels(root: nn.Module, cg: ChannelGraph, before: Mapping[str, nn.Module], changed: Iterable[str],
                        new_blocks: Sequence[str], growth: Growth) -> None:
    """After new dense layers were added and the layers reading their stage grew (``changed``, fresh), give those
    layers their trained values back with every new channel cancelled: zero weights where they read one.

    ``before`` holds the layers as they were, by path; ``new_blocks`` the paths of the new dense layers, whose
    output channels are the new ones (so are the channels a transition grew by).
    """
    def is_new(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in new_blocks)

    cancelled = {g.id for g in cg.groups if any(is_new(p) for p in g.producers)}
    old = {g.id: 0 if g.id in cancelled else _old_width(cg, g.id, before) for g in cg.groups}
    new = {g.id: g.base for g in cg.groups}
    maps = layer_maps(cg, source_maps(root, cg, old, new, growth, cancel=True, cancelled=cancelled), old)
    for path in changed:
        if path in maps and path in before:
            transplant(root.get_submodule(path), before[path], *maps[path], growth, path)


def _old_width(cg: ChannelGraph, g: int, before: Mapping[str, nn.Module]) -> int:
    """Group ``g``'s width in the layers as they were: read off a layer that writes it or reads it alone."""
    for path, role in cg.groups[g].members:
        m = before.get(path)
        if m is None:
            continue
        if role == "out":
            return channels(m)[1]
        if role in ("norm", "depthwise") and len(cg.norms.get(path) or cg.depthwise.get(path) or ()) == 1:
            return channels(m)[0]
        lc = cg.layers.get(path)
        if role == "in" and lc is not None and len(lc.inputs) == 1:
            return channels(m)[0] // lc.inputs[0][1]
    return cg.groups[g].base
