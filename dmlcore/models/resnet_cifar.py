"""CIFAR-style ResNet (Guided DML's student, MyModel_CIFAR10.py:418-499, 555-567).

A 3x3 stride-1 stem conv + BN + ReLU, **no max-pool**, four stages of BasicBlocks (channels
``width``, 2, 4, 8 x ``width``; strides 1, 2, 2, 2; 1x1 projection shortcuts where the shape
changes), so a 32 px image ends in a 4x4 map (the authors' ``avg_pool2d(out, 4)`` there is the
global average of the ``linear`` head). ``depth`` 18 = [2, 2, 2, 2] blocks, 10 = [1, 1, 1, 1],
34 = [3, 4, 6, 3] (the authors' ``ResNet_size``). Random init (PyTorch defaults, as theirs).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register
from .pretrained import ModelError, load_pretrained

BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``B x 3 x H x W`` to the ``B x 8*width x H/8 x W/8`` feature map."""

    def __init__(self, depth: int = 18, width: int = 64) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ModelError(f"resnet_cifar: depth must be one of {', '.join(map(str, BLOCKS))}, got {depth!r}")
        if int(width) != width or width < 1:
            raise ModelError(f"resnet_cifar: width must be a positive integer, got {width!r}")
        w = int(width)
        self.conv1 = nn.Conv2d(3, w, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        stages, c_in = [], w
        for k, n in enumerate(BLOCKS[depth]):
            c_out = w * 2**k
            blocks = [BasicBlock(c_in if b == 0 else c_out, c_out, (1 if k == 0 else 2) if b == 0 else 1) for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = c_in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))


@register("backbone", "resnet_cifar", context=("pretrained",))
def resnet_cifar(depth: int = 18, width: int = 64, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """CIFAR-style ResNet (3x3 stem, no max-pool; depth 10/18/34, base width 64): Guided DML's student."""
    net = CifarResNet(int(depth) if isinstance(depth, (int, float)) else depth, width)
    if pretrained:
        load_pretrained(net, pretrained, ignore=(), name="resnet_cifar")
    return net, net.out_dim
