"""One table of facts about graph ops: which targets add, multiply, concatenate...

Every pass asks here instead of keeping its own list, so that ``x + y``, ``x += y``, ``torch.add(x, y)``,
``x.add(y)`` and ``x.add_(y)`` (and a quantizable model's ``FloatFunctional.add``, which traces to
``torch.add``) are one thing everywhere.

Example:
    >>> import torch.fx as fx
    >>> gm = fx.symbolic_trace(lambda x, y: torch.add(x, y))
    >>> [op_kind(n) for n in gm.graph.nodes if n.op == "call_function"]
    [<OpKind.ADD: 'add'>]
"""

from __future__ import annotations

import enum
import operator
from typing import Any

import torch
import torch.fx as fx

__all__ = ["BINARY", "OpKind", "is_add", "is_residual_add", "op_kind", "targets"]


class OpKind(enum.Enum):
    """What an elementwise binary op, or a concatenation, does to its operands."""

    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    CAT = "cat"


_TARGETS: dict[OpKind, tuple[Any, ...]] = {
    OpKind.ADD: (operator.add, operator.iadd, torch.add, "add", "add_"),
    OpKind.SUB: (operator.sub, operator.isub, torch.sub, "sub", "sub_"),
    OpKind.MUL: (operator.mul, operator.imul, torch.mul, "mul", "mul_"),
    OpKind.DIV: (operator.truediv, operator.itruediv, torch.div, "div", "div_"),
    OpKind.POW: (operator.pow, torch.pow, "pow"),
    OpKind.CAT: (torch.cat, torch.concat, torch.concatenate),
}
_KIND: dict[Any, OpKind] = {t: kind for kind, ts in _TARGETS.items() for t in ts}

#: every elementwise binary op (add, sub, mul, div, pow in all their spellings)
BINARY: tuple[Any, ...] = tuple(t for kind, ts in _TARGETS.items() if kind is not OpKind.CAT for t in ts)


def targets(kind: OpKind) -> tuple[Any, ...]:
    """The fx targets (functions, operators, ``Tensor`` method names) of ``kind``."""
    return _TARGETS[kind]


def op_kind(node: fx.Node) -> OpKind | None:
    """The kind of a ``call_function``/``call_method`` node, or ``None`` for any other op."""
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return _KIND.get(node.target)
    except TypeError:  # an unhashable target
        return None


def is_add(node: fx.Node) -> bool:
    return op_kind(node) is OpKind.ADD


def is_residual_add(node: fx.Node) -> bool:
    """An add of two tensors computed in the graph (not of a tensor and a constant)."""
    return is_add(node) and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2
