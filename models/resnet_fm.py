"""ResNet-20-like network for 28x28 Fashion-MNIST with two early exits.

Blocks: stem, three stages of three basic blocks (16, 32, 64 channels), classifier;
12 cuts (0..11). Exits read the end of stage 1 (cut 4) and of stage 2 (cut 7).
"""

from __future__ import annotations

from torch import nn

from .split_model import SplitModel


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def exit_head(cin: int, num_classes: int) -> nn.Module:
    """A small early-exit branch: strided conv, global pooling, linear classifier."""
    return nn.Sequential(
        nn.Conv2d(cin, 2 * cin, 3, 2, 1, bias=False),
        nn.BatchNorm2d(2 * cin),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * cin, num_classes),
    )


def light_exit_head(cin: int, num_classes: int) -> nn.Module:
    """An early-exit branch about 7x cheaper than :func:`exit_head`: the strided 3x3
    convolution split into a depthwise 3x3 (stride 2) and a pointwise 1x1, the way MobileNet
    splits its convolutions. At a cut of ``resnet_fm`` it costs 0.10-0.13 M MACs instead of
    0.90 M, which matters when a cascade runs several heads per input."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, 2 * cin, 1, bias=False),
        nn.BatchNorm2d(2 * cin),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * cin, num_classes),
    )


# exit head kinds by name (the compress config's ``exits.head`` and a bundle's ``exit_head``)
EXIT_HEADS = {"conv": exit_head, "light": light_exit_head}


def build_resnet_fm(num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)) -> SplitModel:
    w1, w2, w3 = widths
    blocks: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(inplace=True)))
    ]
    cin = w1
    for stage, (width, stride) in enumerate(((w1, 1), (w2, 2), (w3, 2)), start=1):
        for i in range(3):
            blocks.append((f"stage{stage}.{i}", BasicBlock(cin, width, stride if i == 0 else 1)))
            cin = width
    blocks.append(
        ("classifier", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes)))
    )
    exits = {4: exit_head(w1, num_classes), 7: exit_head(w2, num_classes)}
    return SplitModel("resnet_fm", blocks, exits, (1, 28, 28), num_classes)
