"""Networks used by the recipes.

* :func:`resnet20` -- the CIFAR ResNet of He et al. (2016, section 4.2): a 3x3 stem, three
  stages of three basic blocks with 16, 32 and 64 channels, global average pooling.  Shortcuts
  that change shape are "option A" of the paper (stride-2 subsampling and zero-padded channels,
  no parameters), which gives the paper's 0.27M parameters.
* :func:`resnet18` -- the ResNet-18 layout (2-2-2-2 basic blocks, 64-512 channels) adapted to
  32x32 inputs as usual for CIFAR: a 3x3 stride-1 stem and no max-pool; 1x1 projection shortcuts;
  about 11.2M parameters.
* :class:`DigitsCNN` and :class:`MLP` -- small networks for the 8x8 digits of scikit-learn (the
  offline default), a few tens of thousands of parameters.

:func:`build_model` builds any of them by name (``ARCH_NAMES``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ec_hooks.validation import check_int

__all__ = [
    "ARCH_NAMES",
    "MLP",
    "BasicBlock",
    "CifarResNet",
    "DigitsCNN",
    "build_model",
    "resnet18",
    "resnet20",
]

logger = logging.getLogger(__name__)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "projection") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = _PadShortcut(stride, planes - in_planes)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for 32x32 images: 3x3 stem (stride 1), stages of basic blocks, average pool, linear.

    Args:
        blocks: number of basic blocks per stage.
        widths: channels of each stage (the first stage keeps stride 1, the others halve the size).
        num_classes: outputs of the last layer.
        in_channels: channels of the input images.
        shortcut: ``"pad"`` (option A, parameter-free) or ``"projection"`` (1x1 convolution).
    """

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "projection",
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError(f"blocks and widths must have the same length, got {blocks} and {widths}")
        if shortcut not in ("pad", "projection"):
            raise ValueError(f"shortcut must be one of ['pad', 'projection'], got {shortcut!r}")
        check_int("num_classes", num_classes, 1)
        check_int("in_channels", in_channels, 1)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        in_planes = widths[0]
        for i, (count, planes) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(count):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.stages(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-20 of He et al. for CIFAR (269,722 parameters for 10 classes)."""
    return CifarResNet((3, 3, 3), (16, 32, 64), num_classes, in_channels, shortcut="pad")


def resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-18 adapted to 32x32 inputs (11,173,962 parameters for 10 classes)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, shortcut="projection")


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 images: two 3x3 convolutions, a 2x2 max-pool, two linear layers.

    No batch norm, so every parameter of the model is trained by the communication method under
    test (nothing is kept per worker).  38,282 parameters for 1 channel and 10 classes.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, width: int = 16, hidden: int = 64
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("width", width),
            ("hidden", hidden),
        ):
            check_int(name, value, 1)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (8, 8):
            raise ValueError(f"DigitsCNN expects 8x8 images, got {tuple(x.shape[-2:])}")
        out = F.relu(self.conv1(x))
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = F.relu(self.fc1(out.flatten(1)))
        return self.fc2(out)


class MLP(nn.Module):
    """Flatten, one hidden ReLU layer, linear output (9,610 parameters for 8x8 inputs, 10 classes)."""

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_features", in_features), ("hidden", hidden)):
            check_int(name, value, 1)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ARCH_NAMES = ("resnet20", "resnet18", "digits_cnn", "mlp")


def build_model(arch: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a network by name (one of ``ARCH_NAMES``) for images of ``in_channels`` x size x size."""
    if arch == "resnet20":
        return resnet20(num_classes, in_channels)
    if arch == "resnet18":
        return resnet18(num_classes, in_channels)
    if arch == "digits_cnn":
        return DigitsCNN(num_classes, in_channels)
    if arch == "mlp":
        return MLP(num_classes, in_channels * image_size * image_size)
    raise ValueError(f"arch must be one of {list(ARCH_NAMES)}, got {arch!r}")
