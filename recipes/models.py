"""Small models the recipes train on a CPU in minutes."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_resnet"]


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


def tiny_resnet(num_classes: int = 4) -> nn.Module:
    """A CIFAR-style ResNet: 16-channel stem, stages of 2 blocks at 16, 32 and 64 channels."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Sequential(_Basic(16, 16), _Basic(16, 16)),
        nn.Sequential(_Basic(16, 32, 2), _Basic(32, 32)),
        nn.Sequential(_Basic(32, 64, 2), _Basic(64, 64)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
    )
