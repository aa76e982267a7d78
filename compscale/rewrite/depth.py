"""The depth pass: give each stage its planned number of blocks.

New blocks are appended at the stage's end as fresh copies of its repeat block (or of a synthesized one,
:mod:`compscale.rewrite.synth`), initialised as the model's constructor would. Drop-path rates that
are linear in the block index are re-spread over the new number of blocks. Where the stage's blocks' outputs are
also concatenated after it (a C2f block's bottleneck list, ``Stage.taps``), the forward concatenates the new
blocks' outputs too, and the layer reading the concatenation takes the new number of channels
(``cv2``: ``(2 + n) * c`` inputs), as the family's own constructor builds it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compscale.analyse.levels import Tower
from compscale.analyse.stages import Block, Stage, StageTable, cat_inputs
from compscale.errors import RewriteError
from compscale.layers import channels, copy_module, resize
from compscale.registry import drop_path_attr
from compscale.rewrite.init import InitRules, redrawn, reinit
from compscale.rewrite.modules import insert_after, move_after, next_name, remove_children, set_submodule
from compscale.rewrite.preserve import Growth, probe_input, zero_layer
from compscale.rewrite.synth import synthesize_dense, synthesize_repeat
from compscale.trace import Traced, trace

__all__ = ["RunAfter", "append_by_hook", "deepen", "deepen_tower", "follow_taps", "fresh_copy", "respread",
           "respread_drop_path"]


def fresh_copy(template: nn.Module, rules: InitRules | None) -> nn.Module:
    """A deep copy of ``template`` with every parameter drawn anew.

    The parameters that :func:`~compscale.rewrite.init.reinit` overwrites are not copied, only allocated: a
    ResNet-50 deepened twofold would otherwise copy 21 M weights to draw them again.
    """
    memo: dict[int, Any] = {}
    for m in template.modules():
        for name in redrawn(m, rules):
            p = m._parameters[name]
            if type(p) is nn.Parameter:  # what Parameter.__deepcopy__ makes, less the copy of its values
                memo[id(p)] = nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad)
    new = copy_module(template, memo)
    for (_, m), (_, t) in zip(new.named_modules(), template.named_modules()):
        if any(True for _ in m.parameters(recurse=False)) or list(m.buffers(recurse=False)):
            reinit(m, rules, template=t)
    return new


def deepen(root: nn.Module, traced: Traced, table: StageTable, counts: Mapping[int, int],
           rules: InitRules | None, growth: Growth | None = None) -> tuple[nn.Module, dict[int, list[str]]]:
    """Give stage ``i`` of ``table`` ``counts[i]`` blocks; returns the (new) root and the new paths per stage.

    ``root`` is the model being rewritten (``traced`` was traced from it). Blocks kept in an ``nn.Sequential``
    or ``nn.ModuleList`` are inserted there and ``root`` keeps its class; blocks that ``forward`` calls one by
    one (``x = self.block2(x)``) are inserted in the graph, and the root becomes a ``GraphModule``. Stages are
    handled last to first so that renumbering a flat container never moves a stage not yet handled.
    With ``growth`` (``init="preserve"``), each new block starts as the identity (:func:`start_as_identity`).
    """
    drop_rates = _drop_rates(root)
    block_types = {b.module_type for s in table.stages for b in s.blocks}
    dropouts = {rel: [m.p for m in mods] for rel, mods in _block_dropouts(root, block_types).items()}
    added: dict[int, list[nn.Module]] = {}
    by_name: list[tuple[Stage, list[nn.Module], nn.Module, nn.Module]] = []
    for stage in reversed(table.stages):
        extra = counts.get(stage.index, len(stage.blocks)) - len(stage.blocks)
        if extra == 0:
            continue
        parent = root.get_submodule(stage.parent) if stage.parent else root
        # a dense block's own forward (torchvision's _DenseBlock) calls each of its children in turn
        in_container = isinstance(parent, (nn.Sequential, nn.ModuleList)) or (
            stage.concat is not None and isinstance(parent, nn.ModuleDict))
        if extra < 0:  # shallower: drop trailing repeats, never the stage's first block
            if not in_container:
                raise RewriteError(
                    f"cannot remove blocks of stage {stage.name}: {type(parent).__name__}.forward calls them by name",
                    "keep the stage's blocks in an nn.Sequential, or use a depth multiplier >= 1.",
                )
            keep = max(1, len(stage.blocks) + extra)
            if growth is not None:
                growth.note(stage.name, f"{len(stage.blocks) - keep} blocks removed (depth < 1)")
            remove_children(parent, [p.rpartition(".")[2] for b in stage.blocks[keep:] for p in b.layers or [b.path]])
            continue
        new = _new_blocks(root, traced, table, stage, extra, rules)
        if growth is not None:
            start_as_identity(new, stage, growth, _unit(root, stage.blocks[-1]))
        if stage.blocks[-1].layers:  # runs of a flat container: their layers go in one after another
            new = [layer for run in new for layer in run.children()]
        if in_container:
            insert_after(parent, stage.blocks[-1].last_path.rpartition(".")[2], new)
            if isinstance(parent, nn.ModuleDict):
                _check_called(parent, stage, new, traced)
        else:  # the parent and the last block as objects: inserting into a flat container may renumber paths
            by_name.append((stage, new, parent, root.get_submodule(stage.blocks[-1].path)))
        added[stage.index] = new
    append_by_hook(traced, by_name)
    for stage in table.stages:
        if stage.taps and counts.get(stage.index, len(stage.blocks)) != len(stage.blocks):
            follow_taps(root, traced, stage, counts[stage.index] - len(stage.blocks), rules, growth)
    respread_drop_path(root, len(drop_rates), drop_rates)
    for rel, mods in _block_dropouts(root, block_types).items():
        if rel in dropouts:
            respread([(m, "p") for m in mods], dropouts[rel])
    # paths are read at the end: inserting into a flat container renumbers the stages after it
    paths = {id(m): name for name, m in root.named_modules()}
    return root, {i: [paths[id(m)] for m in mods] for i, mods in added.items()}


def follow_taps(root: nn.Module, traced: Traced, stage: Stage, extra: int, rules: InitRules | None,
                growth: Growth | None) -> list[str]:
    """Resize the layers that read a concatenation of ``stage``'s block outputs, now that it has ``extra`` more (or
    fewer) blocks, each adding its last block's output channels; returns their paths.

    The readers are the convs and linear layers fed by the concatenation in the traced graph (a C2f's ``cv2``);
    the graph cannot be traced again first, since a forward that iterates a chunk needs every value before it. With
    ``growth`` (``init="preserve"``), a reader keeps its weights for the channels it read and reads the new blocks'
    channels (appended at the end of the concatenation) with zero weights: the same function.
    """
    nodes = {n.name: n for n in traced.graph.nodes}
    entries = {nodes[b.entry] for b in stage.blocks}
    cats = {u for b in stage.blocks for u in nodes[b.exit].users if entries & set(cat_inputs(u) or ())}
    readers = {str(u.target) for cat in cats for u in cat.users
               if u.op == "call_module" and isinstance(traced.module(u), (nn.modules.conv._ConvNd, nn.Linear))}
    if len(readers) != sum(len(cat.users) for cat in cats):
        raise RewriteError(
            f"the blocks of stage {stage.name} are concatenated, and something other than a conv or linear layer "
            "reads the concatenation, so the layers reading it cannot follow its new width",
            "leave this stage out with `stages=`, or deepen it by hand.")
    width = extra * stage.blocks[-1].out_shape[1]
    for path in sorted(readers):
        old = root.get_submodule(path)
        c_in, c_out = channels(old)
        new = resize(old, c_in + width, c_out)
        if growth is None or not _keep_inputs(old, new):
            reinit(new, rules, template=old)
            if growth is not None:
                growth.note(path, "reads a concatenation that lost channels: fresh weights")
        else:
            growth.grown.update(id(p) for p in new.parameters())
        set_submodule(root, path, new)
    return sorted(readers)


@torch.no_grad()
def _keep_inputs(old: nn.Module, new: nn.Module) -> bool:
    """Copy ``old``'s weights into the first input channels of ``new`` (a wider input) and zero the rest."""
    w_old, w_new = getattr(old, "weight", None), getattr(new, "weight", None)
    if not (isinstance(w_old, torch.Tensor) and isinstance(w_new, torch.Tensor)) or w_new.shape[0] != w_old.shape[0]:
        return False
    n = w_old.shape[1]
    if w_new.shape[1] < n or w_new.shape[2:] != w_old.shape[2:]:
        return False
    w_new.zero_()
    w_new[:, :n] = w_old
    b_old, b_new = getattr(old, "bias", None), getattr(new, "bias", None)
    if isinstance(b_old, torch.Tensor) and isinstance(b_new, torch.Tensor):
        b_new.copy_(b_old)
    return True


def _new_blocks(root: nn.Module, traced: Traced, table: StageTable, stage: Stage, extra: int,
                rules: InitRules | None) -> list[nn.Module]:
    if stage.grows:
        return [fresh_copy(m, rules) for m in synthesize_dense(traced, stage, extra, rules)]
    if stage.repeat is not None:
        template = _unit(root, stage.repeat)
        return [fresh_copy(template, rules) for _ in range(extra)]
    first = synthesize_repeat(traced, stage, table.blocks, rules)  # unchanged layers still hold copied weights
    return [fresh_copy(first, rules) for _ in range(extra)]


def start_as_identity(blocks: Sequence[nn.Module], stage: Stage, growth: Growth, last: nn.Module) -> None:
    """Make each new block of ``stage`` compute the identity at first: a residual block's branch outputs zero, a
    plain unit is an identity conv (where its activation allows), checked on what ``last`` (the stage's last
    block, which feeds them) outputs. A dense stage's new layers output zero from their last conv, and their
    channels are cancelled in their readers once the layers after the stage have grown (``compscale.api``)."""
    if stage.grows:  # the new channels are cancelled in their readers; a residual half (DPN's) must add zero
        for block in blocks:
            layers = [m for m in block.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            if layers:
                zero_layer(layers[-1])
        return
    x = probe_input(last, stage.blocks[-1].in_shape, stage.blocks[-1].out_shape, growth.generator)
    for i, block in enumerate(blocks):
        name = f"{stage.name} (new block {i + 1})"
        if stage.plain:
            growth.identity_unit(block, x, name)
        else:
            growth.zero_branch(block, x, name)


def _unit(root: nn.Module, block: Block) -> nn.Module:
    """The block's module, or a run's layers in an ``nn.Sequential`` (to copy them as one)."""
    if block.layers:
        return nn.Sequential(*(root.get_submodule(p) for p in block.layers))
    return root.get_submodule(block.path)


def _check_called(parent: nn.Module, stage: Stage, new: Sequence[nn.Module], traced: Traced) -> None:
    """Raise ``RewriteError`` unless ``parent.forward`` calls the blocks just added (it may call children by name)."""
    names = {name for name, m in parent.named_children() if any(m is n for n in new)}
    called = _called_children(parent, traced, stage.blocks[0].in_shape)
    if names - called:
        raise RewriteError(
            f"{type(parent).__name__}.forward of {stage.parent!r} does not call the layers appended to it "
            f"({', '.join(sorted(names - called))})",
            "deepen this stage by hand, or leave it out with `stages=`.",
        )


def _called_children(parent: nn.Module, traced: Traced, in_shape: Sequence[int]) -> set[str]:
    """The names of the children that ``parent.forward`` calls.

    Raises:
        RewriteError: the parent cannot be traced alone, so whether it calls new children is unknown.
    """
    is_root = parent is traced.root
    try:
        sub = trace(parent, traced.input_shape if is_root else in_shape, shapes=False,
                    leaf_modules=(*traced.leaf_modules, *_block_types(parent)),
                    autowrap_functions=traced.autowrap_functions, extra_inputs=traced.extra_inputs if is_root else ())
    except Exception as e:
        raise RewriteError(f"cannot tell whether {type(parent).__name__}.forward calls the blocks appended to it: "
                           f"it does not trace alone ({type(e).__name__})",
                           "keep the stage's blocks in an nn.Sequential, or leave it out with `stages=`.") from e
    return {str(n.target).split(".")[0] for n in sub.graph.nodes if n.op == "call_module"}


def _block_types(parent: nn.Module) -> tuple[type[nn.Module], ...]:
    """The children's types, traced as leaves: only whether they are called matters."""
    return tuple({type(m) for m in parent.children()})


class RunAfter:
    """A forward hook that feeds a block's output through the blocks compscale appended after it.

    Used where ``forward`` calls its blocks by name (``x = self.block2(x)``): the new blocks become children
    named as the model names its own (``block3`` after ``block2``, or ``block2_0``), and the stage's last block
    hands them its output. The model keeps its class, its methods and its own ``forward``, with its training-only
    branches and ``no_grad`` regions; ``state_dict`` names the new blocks as children.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        self.blocks = list(blocks)

    def __call__(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        for block in self.blocks:  # the block's other arguments (a mask, a condition) go to every new block too
            output = block(output, *args[1:], **kwargs)
        return output

    def __repr__(self) -> str:
        return f"RunAfter({len(self.blocks)} appended blocks)"


def append_by_hook(traced: Traced, stages: Sequence[tuple[Stage, list[nn.Module], nn.Module, nn.Module]]) -> None:
    """Add each stage's new blocks beside its last block (given as ``(stage, new blocks, parent, last block)``);
    unless the parent's ``forward`` calls them already (it iterates ``self.children()``), they are called after the
    last block by a :class:`RunAfter` hook."""
    for stage, new, parent, last in stages:
        after = next(k for k, m in parent._modules.items() if m is last)
        names = []
        for module in new:
            name = _child_name(parent, after)
            parent.add_module(name, module)
            move_after(parent, name, after)  # named_modules() lists them in the order they run
            after = name
            names.append(name)
        called = set(names) & _called_children(parent, traced, stage.blocks[0].in_shape)
        if called and called != set(names):
            raise RewriteError(f"{type(parent).__name__}.forward of {stage.parent!r} calls only some of the blocks "
                               f"appended to it ({', '.join(sorted(called))})",
                               "deepen this stage by hand, or leave it out with `stages=`.")
        if not called:
            last.register_forward_hook(RunAfter(new), with_kwargs=True)


def _child_name(container: nn.Module, after: str) -> str:
    """Next index after ``after`` among the container's children (``block3`` after ``block2``), else ``after_0``."""
    existing = list(container._modules)
    name = next_name(existing, after)
    if not _is_next(after, name):  # the next index belongs to another stage's block: suffix this one's name
        name = next_name(existing, f"{after}_0")
    return name


def _is_next(after: str, name: str) -> bool:
    """Whether ``name`` is ``after`` with its trailing index plus one (``b2`` -> ``b3``)."""
    stem = after.rstrip("0123456789")
    return name.startswith(stem) and after[len(stem):].isdigit() and name[len(stem):] == str(int(after[len(stem):]) + 1)


def _drop_rates(root: nn.Module) -> list[float]:
    return [float(getattr(m, attr)) for m in root.modules() if (attr := drop_path_attr(m)) is not None]


def _block_dropouts(root: nn.Module, block_types: set[type]) -> dict[str, list[nn.Dropout]]:
    """The ``nn.Dropout`` layers at each relative path inside the blocks (Hugging Face's EfficientNet drops out
    before its residual add at a rate linear in the block index), in the order the blocks come."""
    found: dict[str, list[nn.Dropout]] = {}
    for block in root.modules():
        if type(block) not in block_types:
            continue
        for rel, m in block.named_modules():
            if isinstance(m, nn.Dropout) and rel:
                found.setdefault(rel, []).append(m)
    return found


def respread_drop_path(root: nn.Module, old_count: int, old_rates: list[float]) -> None:
    """Re-spread the rates of the registered drop-path layers over the new number of blocks (see :func:`respread`)."""
    respread([(m, attr) for m in root.modules() if (attr := drop_path_attr(m)) is not None], old_rates)


def respread(modules: Sequence[tuple[nn.Module, str]], old_rates: list[float]) -> None:
    """If the old rates were ``c * k`` over the blocks ``k``, set ``c`` anew for the new number of blocks.

    The reference builders use ``p * k / N`` (torchvision, Hugging Face) or ``p * k / (N - 1)`` (timm's
    linspace); the hypothesis whose ``p`` is the rounder number wins, and the new rates use the same ``p`` over
    the new ``N``.
    """
    old_count = len(old_rates)
    if old_count < 2 or len(modules) in (old_count, 1):
        return
    c = old_rates[1]
    if c <= 0 or any(abs(r - c * k) > 1e-6 for k, r in enumerate(old_rates)):
        return  # not linear in the block index: leave the rates as they are
    over_n = _roundness(c * old_count) <= _roundness(c * (old_count - 1))  # torchvision's p*k/N, else timm's
    p = c * old_count if over_n else c * (old_count - 1)
    n = len(modules) if over_n else len(modules) - 1
    for k, (m, attr) in enumerate(modules):
        setattr(m, attr, p * k / n)


def _roundness(p: float) -> float:
    """Distance of ``p`` from the nearest multiple of 0.05: smaller is rounder."""
    return abs(p / 0.05 - round(p / 0.05))


def deepen_tower(root: nn.Module, tower: Tower, layers: int, rules: InitRules, growth: Growth | None) -> list[str]:
    """Give a head tower of ``root`` ``layers`` more units (fresh copies of its last, appended), or fewer (its last
    ones dropped, one kept); returns the paths of the children added or dropped (the graph no longer holds)."""
    container = root.get_submodule(tower.path)
    assert isinstance(container, nn.Sequential)
    keep = max(1, tower.units + layers) * tower.period
    names = [n for n, _ in container.named_children()]
    last = [container.get_submodule(n) for n in names[-tower.period:]]
    changed = [f"{tower.path}.{name}" for name in names[keep:]]
    for name in names[keep:]:
        delattr(container, name)
        if growth is not None:
            growth.note(f"{tower.path}.{name}", "a head layer dropped")
    added = []
    for _ in range(max(0, keep - len(names)) // tower.period):
        for m in last:
            name = str(len(container))
            container.add_module(name, fresh_copy(m, rules))
            added.append(f"{tower.path}.{name}")
            if growth is not None:
                growth.note(added[-1], "a new head layer: fresh weights")
    return changed + added
