"""Whether a grown model computes what its base did: both run on one random batch in eval mode.

Example:
    >>> import torch, compscale
    >>> from torchvision.models import resnet18
    >>> base = resnet18()
    >>> grown = compscale.scale(base, width=1.5, init="preserve")
    >>> output_error(base, grown, (1, 3, 224, 224)) < 1e-4
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from compscale.trace.tracer import eval_mode

__all__ = ["output_error"]


@torch.no_grad()
def output_error(base: nn.Module, grown: nn.Module, input_shape: Sequence[int],
                 extra_inputs: Sequence[torch.Tensor] = (), seed: int = 0) -> float:
    """``max |grown(x) - base(x)| / max |base(x)|`` over every tensor the models return, in eval mode, on a batch
    of standard-normal inputs of ``input_shape`` (2 of them unless other inputs come with it); both models'
    train/eval flags are restored.

    Returns ``inf`` when the outputs differ in structure or shape.
    """
    p = next(base.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    batch = 2 if not extra_inputs else input_shape[0]  # the other inputs' batch is the example's
    x = torch.randn((batch, *input_shape[1:]), generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    with eval_mode(base), eval_mode(grown):
        before = [t for t in tree_leaves(base(x, *extra_inputs)) if isinstance(t, torch.Tensor)]
        after = [t for t in tree_leaves(grown(x, *extra_inputs)) if isinstance(t, torch.Tensor)]
    if len(before) != len(after) or any(a.shape != b.shape for a, b in zip(before, after)):
        return float("inf")
    scale = max((b.abs().max().item() for b in before if b.numel() and b.is_floating_point()), default=0.0)
    diff = max(((a.double() - b.double()).abs().max().item() for a, b in zip(after, before) if a.numel()),
               default=0.0)
    return diff / scale if scale > 0 else diff
