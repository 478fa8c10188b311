"""Train a split model jointly at all its exits (weighted exit losses) and write its card.

The card (``<name>.json`` beside ``<name>.safetensors``) records the accuracy of every exit
on the test set, the dataset, the recipe, the parameter count, the MACs and the weights'
sha256.

Example (about half an hour on 2 CPU cores)::

    edgesplit train resnet_fm --epochs 10
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import WEIGHTS_DIR, build_model
from .datasets import TensorBatches, load_fashion_mnist, to_tensor
from .split_model import SplitModel
from .weights_io import card_path, save_weights


@dataclass
class Recipe:
    """Hyper-parameters of joint early-exit training (SGD with a one-cycle schedule)."""

    epochs: int = 10
    batch_size: int = 128
    max_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    # Loss weight of each early exit, in order, then of the final classifier.
    exit_weights: list[float] = field(default_factory=lambda: [0.5, 0.5, 1.0])
    augment: bool = True
    seed: int = 0
    train_limit: int | None = None  # use only the first N training images (tests)


def check_recipe(recipe: Recipe) -> None:
    """Raise ValueError for settings no training can run with (before any data is loaded)."""
    if recipe.epochs < 1:
        raise ValueError(f"epochs must be at least 1, not {recipe.epochs}")
    if recipe.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, not {recipe.batch_size}")
    if recipe.train_limit is not None and recipe.train_limit < 1:
        raise ValueError(f"train limit must be at least 1 image (or None for all), not {recipe.train_limit}")
    if not math.isfinite(recipe.max_lr) or recipe.max_lr <= 0:
        raise ValueError(f"learning rate must be a finite number above 0, not {recipe.max_lr}")


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and prove it writable, so a bad folder fails before training, not after."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except FileExistsError:
        raise ValueError(f"cannot write weights to {out}: it exists and is not a folder") from None
    except OSError as exc:
        raise ValueError(f"cannot write weights to {out}: {exc.strerror or exc}") from None
    return out


def nesterov_sgd(parameters, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum, decaying weights (ndim > 1) only, not biases or norm scales."""
    params = list(parameters)
    return torch.optim.SGD(
        [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
         {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
        lr=lr, momentum=momentum, nesterov=True,
    )


def evaluate_exits(model: SplitModel, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> list[float]:
    """Top-1 accuracy of every exit, then of the final classifier."""
    model.eval()
    correct: list[int] = []
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            outs = model.forward_exits(images[start : start + batch_size])
            y = labels[start : start + batch_size]
            hits = [int((o.argmax(1) == y).sum()) for o in outs]
            correct = hits if not correct else [a + b for a, b in zip(correct, hits)]
    return [c / len(labels) for c in correct]


def train(
    name: str = "resnet_fm",
    recipe: Recipe | None = None,
    out_dir: str | Path = WEIGHTS_DIR,
    data_root: str | Path | None = None,
    progress: bool = True,
    count_macs: Callable[[SplitModel], dict] | None = None,
) -> dict:
    """Train ``name`` on Fashion-MNIST, write weights and card to ``out_dir``, return the card.

    ``count_macs`` (for example :func:`edgesplit.partitioner.flops.mac_summary`) fills the
    card's MAC counts."""
    recipe = recipe or Recipe()
    check_recipe(recipe)
    torch.manual_seed(recipe.seed)
    model = build_model(name)
    n_heads = len(model.exit_cuts) + 1
    if len(recipe.exit_weights) != n_heads:
        raise ValueError(f"{name} has {n_heads} outputs; give that many exit weights, not {recipe.exit_weights}")
    train_x, train_y = load_fashion_mnist("train", data_root)
    test_x, test_y = load_fashion_mnist("test", data_root)
    out_dir = prepare_out_dir(out_dir)  # after the data (no empty folder left by a wrong one), before training
    if recipe.train_limit:
        train_x, train_y = train_x[: recipe.train_limit], train_y[: recipe.train_limit]
    x, y = to_tensor(train_x), torch.from_numpy(train_y).long()
    tx, ty = to_tensor(test_x), torch.from_numpy(test_y).long()

    model = model.to(memory_format=torch.channels_last)
    batches = TensorBatches(x, y, recipe.batch_size, shuffle=True, augment=recipe.augment, seed=recipe.seed)
    optimizer = nesterov_sgd(model.parameters(), recipe.max_lr, recipe.momentum, recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.max_lr, epochs=recipe.epochs, steps_per_epoch=len(batches)
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    started = time.time()
    history = []
    for epoch in range(recipe.epochs):
        model.train()
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=not progress, unit="batch")
        running = 0.0
        for step, (xb, yb) in enumerate(bar, start=1):
            outs = model.forward_exits(xb.contiguous(memory_format=torch.channels_last))
            loss = sum(w * criterion(o, yb) for w, o in zip(recipe.exit_weights, outs))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running / step:.3f}", lr=f"{schedule.get_last_lr()[0]:.3f}")
        accs = evaluate_exits(model, tx, ty)
        history.append({"epoch": epoch + 1, "loss": running / len(batches), "test_accuracy": accs})
        if progress:
            tqdm.write(f"epoch {epoch + 1}: test accuracy per exit {[f'{a:.4f}' for a in accs]}")

    model = model.to(memory_format=torch.contiguous_format).eval()
    out_dir.mkdir(parents=True, exist_ok=True)  # (again, should it have been removed while training)
    weights = out_dir / f"{name}.safetensors"
    sha = save_weights(model, weights)
    card = make_card(model, recipe, history, sha, time.time() - started, len(y),
                     macs=count_macs(model) if count_macs else None)
    card_path(weights).write_text(json.dumps(card, indent=2) + "\n")
    return card


def make_card(
    model: SplitModel, recipe: Recipe, history: list[dict], sha: str, seconds: float, n_train: int,
    macs: dict | None = None,
) -> dict:
    """The JSON card saved beside trained weights. ``macs`` (per block and exit) comes from
    the caller, so that models do not depend on the partitioner that counts them."""
    final = history[-1]["test_accuracy"]
    exit_names = [f"exit@{c}" for c in model.exit_cuts] + ["final"]
    return {
        "model": model.name,
        "dataset": {"name": "Fashion-MNIST", "train_images": n_train, "test_images": 10000,
                    "source": "Debian dataset-fashion-mnist (gzip IDX)"},
        "exits": [
            {"name": n, "cut": c, "test_accuracy": round(a, 4)}
            for n, c, a in zip(exit_names, model.exit_cuts + [model.num_blocks], final)
        ],
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": macs or {},
        "history": history,
        "train_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "sha256": sha,
    }
