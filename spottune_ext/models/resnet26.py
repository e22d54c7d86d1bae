"""ResNet-26 of the Visual Decathlon (Rebuffi et al.), the backbone SpotTune uses there.

stem conv3x3 3->32 + BN (no ReLU), 3 stages x 4 BasicBlocks at 64/128/256 channels with stride 2
on each stage's first block, a parameter-free shortcut (2x2 average pool, then zero channels) where
a block changes shape, final BN + ReLU, global average pool, linear head: 12 residual blocks.

The blocks are torchvision's BasicBlock with a ZeroPadShortcut as `downsample`, so everything that
handles torchvision ResNets' blocks (routing, export) handles these unchanged.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, conv3x3


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: stride x stride average pool, then zero channels up to out_channels.

    The pool uses ceil_mode so odd feature maps match the strided 3x3 convolution of the block
    (on even sizes it is the plain 2x2 average of the original ResNet-26).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ZeroPadShortcut pads channels: out_channels ({out_channels}) must be >= "
                             f"in_channels ({in_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class DecathlonResNet(nn.Module):
    """ResNet with a 3x3 stride-1 stem, BasicBlocks and parameter-free shortcuts.

    resnet26() is layers (4, 4, 4) at widths (64, 128, 256); the SpotTune policy network is the
    same network with one block per stage (spottune_ext.PolicyNet).
    """

    def __init__(self, num_classes: int = 1000, layers: Sequence[int] = (4, 4, 4),
                 widths: Sequence[int] = (64, 128, 256), stem_width: int = 32) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers or min(layers) < 1:
            raise ValueError(f"DecathlonResNet expects one block count >= 1 per width, got layers={list(layers)} "
                             f"widths={list(widths)}")
        if any(b < a for a, b in zip((stem_width, *widths), widths)):
            raise ValueError(f"DecathlonResNet's shortcuts only add channels: widths must not decrease from the stem's "
                             f"{stem_width}, got {list(widths)}")
        self.num_classes, self.layers, self.widths, self.stem_width = num_classes, tuple(layers), tuple(widths), stem_width
        self.conv1 = conv3x3(3, stem_width)
        self.bn1 = nn.BatchNorm2d(stem_width)
        in_channels = stem_width
        for i, (n, width) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(in_channels, width, 2, ZeroPadShortcut(in_channels, width))]
            blocks += [BasicBlock(width, width) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            in_channels = width
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self):
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.layers))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        for stage in self.stages():
            x = stage(x)
        x = self.relu(self.bn2(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "layers": list(self.layers), "widths": list(self.widths),
                "stem_width": self.stem_width}


def resnet26(num_classes: int = 1000) -> DecathlonResNet:
    """ResNet-26 for the Visual Decathlon (12 BasicBlocks, 5,814,688 parameters without the head), random init.

    The paper's Decathlon setting keeps the first stage frozen:
    convert(resnet26(n), adaptive_blocks=range(4, 12)).
    """
    return DecathlonResNet(num_classes, (4, 4, 4), (64, 128, 256), 32)
