"""ImageNet-shaped ResNet-18 and MobileNetV2 (random weights) with cut points and exits.

They serve latency and bandwidth work: 224x224 inputs, real layer shapes and costs.
"""

from __future__ import annotations

from torch import nn

from .resnet_fm import BasicBlock, exit_head
from .split_model import SplitModel


def build_resnet18(num_classes: int = 1000) -> SplitModel:
    blocks: list[tuple[str, nn.Module]] = [
        (
            "stem",
            nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            ),
        )
    ]
    cin = 64
    for layer, (width, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for i in range(2):
            blocks.append((f"layer{layer}.{i}", BasicBlock(cin, width, stride if i == 0 else 1)))
            cin = width
    blocks.append(("classifier", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))))
    # Exits after layer2 (cut 5) and layer3 (cut 7).
    exits = {5: exit_head(128, num_classes), 7: exit_head(256, num_classes)}
    return SplitModel("resnet18", blocks, exits, (3, 224, 224), num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion, channels, repeats, stride) as in the MobileNetV2 paper.
_MBV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def build_mobilenet_v2(num_classes: int = 1000) -> SplitModel:
    blocks: list[tuple[str, nn.Module]] = [
        ("features.0", nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)))
    ]
    cin = 32
    for expand, cout, repeats, stride in _MBV2_SETTINGS:
        for i in range(repeats):
            blocks.append((f"features.{len(blocks)}", InvertedResidual(cin, cout, stride if i == 0 else 1, expand)))
            cin = cout
    blocks.append(
        (
            f"features.{len(blocks)}",
            nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)),
        )
    )
    blocks.append(
        (
            "classifier",
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, num_classes)),
        )
    )
    # Exits after the 32-channel stage (cut 7) and the 96-channel stage (cut 14).
    exits = {7: exit_head(32, num_classes), 14: exit_head(96, num_classes)}
    return SplitModel("mobilenet_v2", blocks, exits, (3, 224, 224), num_classes)
