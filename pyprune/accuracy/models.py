"""The study's models: LeNet-5 from the zoo and a narrow ResNet-18 for 1-channel 32x32 images."""

from __future__ import annotations

import torch
from torch import nn

from ..models import lenet5
from ..models.resnet import BasicBlock

MODELS = ("lenet5", "resnet18-small")


class SmallResNet(nn.Module):
    """ResNet-18's block layout ([2, 2, 2, 2] BasicBlocks) at widths ``width * (1, 2, 4, 8)``, with a 3x3
    stride-1 stem and no max pooling, for small images as on CIFAR. x: (N, in_channels, H, W) -> (N, classes).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, inplanes = [], width
        for i, planes in enumerate(width * m for m in (1, 2, 4, 8)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            layers.append(
                nn.Sequential(BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(name: str, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """``"lenet5"`` (32x32 inputs) or ``"resnet18-small"`` (width 16, any size >= 8)."""
    if name == "lenet5":
        return lenet5(num_classes=num_classes, in_channels=in_channels)
    if name == "resnet18-small":
        return SmallResNet(num_classes=num_classes, in_channels=in_channels)
    raise ValueError(f"model must be one of {list(MODELS)}, got {name!r}")
