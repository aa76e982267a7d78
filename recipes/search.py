"""Step 1 of the paper on a small proxy: grid-search alpha, beta, gamma at phi=1 with compscale.search.

    python recipes/search.py                       # tiny ResNet, 12 candidates x 40 steps, in-process, minutes
    python recipes/search.py --workers 2           # a ProcessPoolExecutor; any concurrent.futures executor works
    python recipes/search.py --results search.jsonl   # rerun with the same file: finished candidates are kept

Each candidate is scaled by phi=1, trained ``--steps`` steps on the shapes data at its own input size and
scored by validation accuracy.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import compscale
from recipes.data import Shapes
from recipes.models import tiny_resnet
from recipes.train import _batches, cosine, evaluate, fit

__all__ = ["main", "train_and_score"]

GRID = {"alpha": [1.1, 1.2, 1.3], "beta": [1.05, 1.1, 1.15], "gamma": [1.1, 1.15, 1.2]}


def train_and_score(model: nn.Module, input_size: tuple[int, int], steps: int = 40, seed: int = 0) -> float:
    """Train ``model`` briefly on the shapes data at ``input_size``; its validation accuracy."""
    torch.manual_seed(seed)
    device = torch.device("cpu")
    loader = DataLoader(Shapes(2048, input_size[0], seed=seed), batch_size=32, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    fit(model, _batches(loader, None), opt, cosine(opt, steps), range(steps), device)
    return evaluate(model, Shapes(256, input_size[0], seed=seed + 1), device)


def main(argv: Sequence[str] | None = None) -> compscale.SearchResult:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--workers", type=int, default=0, help="0: in-process; N: a ProcessPoolExecutor of N")
    p.add_argument("--results", default=None, help="JSONL file: appended as candidates finish, resumed on rerun")
    p.add_argument("--tolerance", type=float, default=0.1)
    args = p.parse_args(argv)
    score = functools.partial(train_and_score, steps=args.steps)
    executor: Executor | None = ProcessPoolExecutor(args.workers) if args.workers else None
    try:
        result = compscale.search(tiny_resnet, score, GRID, tolerance=args.tolerance, executor=executor,
                                  results=args.results, input_size=32)
    finally:
        if executor is not None:
            executor.shutdown()
    print(result)
    return result


if __name__ == "__main__":
    main()
