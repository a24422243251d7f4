"""ResNet feature nets written here (PyPI's torchvision does not import beside the pinned torch).

``resnet18``: the standard ResNet-18 (7×7/2 stem, max-pool, BasicBlocks [2, 2, 2, 2], widths
64·[1, 2, 4, 8]) without its classifier, global average pool -> 8·width features (512).
``resnet_slim``: a CPU-sized variant for small images: 3×3 stem, no max-pool, one BasicBlock per
stage, default width 16 -> 128 features. Same code, different config values.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """x (B, C, H, W) float -> h (B, 8·width)."""

    def __init__(self, in_channels: int, width: int, blocks: tuple[int, ...], stem: str):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                                      nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


def resnet_for(kind: str, in_channels: int, width: int) -> ResNet:
    if kind == "resnet18":
        return ResNet(in_channels, width, (2, 2, 2, 2), stem="imagenet")
    if kind == "resnet_slim":
        return ResNet(in_channels, width, (1, 1, 1, 1), stem="small")
    raise ValueError(f"unknown ResNet kind {kind!r}")
