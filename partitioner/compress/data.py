"""The data every compression step uses: training images, a validation split carved from
the training set (the last ``validation`` images), and the test set.

Every threshold and hyper-parameter is chosen on the validation split; the test set is
only evaluated for the figures that are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgesplit.models.datasets import load_fashion_mnist, to_tensor


@dataclass
class Splits:
    """Normalised image tensors [N, 1, 28, 28] and integer labels of each split."""

    x: torch.Tensor
    y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_splits(validation: int = 5000, train_limit: int | None = None, test_limit: int | None = None,
                data_root: str | Path | None = None) -> Splits:
    """Fashion-MNIST split into training, validation (the last ``validation`` training
    images) and test; ``train_limit`` and ``test_limit`` shrink them for tests."""
    train_x, train_y = load_fashion_mnist("train", data_root)
    test_x, test_y = load_fashion_mnist("test", data_root)
    if train_limit:
        train_x, train_y = train_x[:train_limit], train_y[:train_limit]
    if test_limit:
        test_x, test_y = test_x[:test_limit], test_y[:test_limit]
    if not 0 < validation < len(train_y):
        raise ValueError(f"validation must be between 1 and {len(train_y) - 1} images, got {validation}")
    x, y = to_tensor(train_x), torch.from_numpy(train_y).long()
    keep = len(y) - validation
    return Splits(x[:keep], y[:keep], x[keep:], y[keep:], to_tensor(test_x), torch.from_numpy(test_y).long())


@torch.no_grad()
def accuracy(fn, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``fn`` (images to logits) on ``x``."""
    hits = 0
    for s in range(0, len(y), batch_size):
        hits += int((fn(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).sum())
    return hits / max(1, len(y))
