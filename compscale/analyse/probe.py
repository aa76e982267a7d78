"""Probe an op that has no channel rule: does it map channels one to one?

Placeholder: :func:`probed_rule` finds no rule yet; the analysis then refuses the node by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx as fx

from compscale.analyse.rules import Desc

if TYPE_CHECKING:
    from compscale.analyse.channels import RuleContext

__all__ = ["probed_rule"]


def probed_rule(ctx: RuleContext, node: fx.Node) -> Desc | None:
    """The descriptor of ``node`` (a call without a registered rule) if probing shows that it maps channels one
    to one, else ``None`` (the caller refuses the node)."""
    return None
