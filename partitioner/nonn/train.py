"""Train NoNN students and their aggregator from a teacher, and write them as a NoNN bundle.

One pass over the training images computes the teacher's final feature maps and logits
(no augmentation, so they are computed once and shared by every ensemble trained in the
process). Each step runs all students (:class:`StudentBank`), and the loss is

- activation transfer: MSE between each student's maps and its part of the teacher's maps;
- logit distillation (temperature ``kd_temperature``, weight ``kd_weight``) plus
  cross-entropy, on the aggregator's logits with every member present, and again with a
  random set of members missing (the number missing drawn uniformly from 0 to S-1 per
  image), so the aggregator learns to classify with whoever answers.

The last ``validation`` training images are held out: the per-epoch accuracy that is
printed, and anything chosen from it, uses them; the test set is only evaluated at the end.

Example (about 10 minutes per ensemble on 2 CPU cores)::

    edgesplit nonn train --members 8 --method enhanced
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgesplit.models import load_trained
from edgesplit.models.split_model import SplitModel
from edgesplit.models.train import nesterov_sgd

from ..compress.data import load_splits
from ..compress.distill import kd_loss
from . import stats
from .bundle import WEIGHTS_DIR, save_ensemble
from .partition import build_partition
from .students import DEFAULT_WIDTHS, Aggregator, StudentBank


@dataclass
class NonnRecipe:
    """What to train: members, partitioning, student size, and the optimisation settings."""

    members: int = 8
    method: str = "enhanced"
    parts: int | None = None  # enhanced only; default members // 2
    widths: tuple[int, int, int] = DEFAULT_WIDTHS
    epochs: int = 10
    batch_size: int = 128
    max_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    kd_temperature: float = 4.0
    kd_weight: float = 0.7
    transfer_weight: float = 1.0
    dropped_weight: float = 1.0  # weight of the loss with random members missing
    validation: int = 5000
    seed: int = 0
    train_limit: int | None = None  # use only the first N training images (tests)


@dataclass
class TeacherTargets:
    """Training, validation and test data with the teacher's outputs on the training part."""

    teacher: SplitModel
    teacher_name: str
    x: torch.Tensor
    y: torch.Tensor
    maps: torch.Tensor  # float16 [N, C, H, W]
    logits: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    pooled: object = field(repr=False, default=None)
    graph: object = field(repr=False, default=None)


def prepare(teacher_name: str = "resnet_fm", validation: int = 5000, train_limit: int | None = None,
            data_root: str | Path | None = None, progress: bool = True, test_limit: int | None = None,
            teacher: SplitModel | None = None) -> TeacherTargets:
    """Load the data, hold out the validation images, run the teacher once, build the filter graph."""
    teacher = teacher if teacher is not None else load_trained(teacher_name)
    data = load_splits(validation, train_limit, test_limit, data_root)
    maps, logits = stats.teacher_outputs(teacher, data.x, progress=progress)
    pooled = stats.pooled_activations(maps)
    return TeacherTargets(teacher, teacher_name, data.x, data.y, maps, logits, data.val_x, data.val_y,
                          data.test_x, data.test_y, pooled, stats.filter_graph(pooled))


def _distill(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, recipe: NonnRecipe) -> torch.Tensor:
    return kd_loss(logits, teacher, labels, recipe.kd_temperature, recipe.kd_weight)


def random_presence(rows: int, members: int, generator: torch.Generator) -> torch.Tensor:
    """A [rows, members] 0/1 mask with a uniformly drawn number (0..S-1) of members missing per row."""
    missing = torch.randint(0, members, (rows, 1), generator=generator)
    rank = torch.rand(rows, members, generator=generator).argsort(dim=1).argsort(dim=1)
    return (rank >= missing).float()


@torch.no_grad()
def member_answers(bank: StudentBank, x: torch.Tensor, batch_size: int = 1000) -> list[torch.Tensor]:
    """Every member's answer ([N, filters] each) on ``x``."""
    bank.eval()
    parts = [bank(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    return [torch.cat([p[i] for p in parts]) for i in range(bank.partition.members)]


@torch.no_grad()
def accuracy(aggregator: Aggregator, answers: list[torch.Tensor], labels: torch.Tensor,
             present: torch.Tensor | None = None) -> float:
    present = present if present is not None else torch.ones(len(labels), aggregator.partition.members)
    return float((aggregator(answers, present).argmax(1) == labels).float().mean())


def train_ensemble(recipe: NonnRecipe, data: TeacherTargets, progress: bool = True
                   ) -> tuple[StudentBank, Aggregator, dict]:
    """Train one ensemble; return the bank, the aggregator and the training record."""
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    partition = build_partition(recipe.method, data.graph, recipe.members, recipe.parts, recipe.seed)
    bank = StudentBank(partition, recipe.widths).to(memory_format=torch.channels_last)
    filter_mean = torch.from_numpy(data.pooled.mean(axis=0)).float()
    aggregator = Aggregator(partition, filter_mean, data.logits.shape[1])
    classifier = data.teacher.blocks[-1][-1]
    aggregator.classifier.load_state_dict(classifier.state_dict())
    optimizer = nesterov_sgd([*bank.parameters(), *aggregator.parameters()], recipe.max_lr, recipe.momentum,
                             recipe.weight_decay)
    steps = (len(data.y) + recipe.batch_size - 1) // recipe.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.max_lr, epochs=recipe.epochs,
                                                   steps_per_epoch=steps)
    indices = [torch.tensor(partition.member_filters(i)) for i in range(partition.members)]
    history, started = [], time.time()
    for epoch in range(recipe.epochs):
        bank.train()
        aggregator.train()
        order = torch.randperm(len(data.y), generator=generator)
        bar = tqdm(range(steps), desc=f"{recipe.method} S={recipe.members} epoch {epoch + 1}/{recipe.epochs}",
                   disable=not progress, unit="batch")
        running = 0.0
        for step in bar:
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            xb, yb, tl = data.x[idx].contiguous(memory_format=torch.channels_last), data.y[idx], data.logits[idx]
            tmaps = data.maps[idx].float()
            maps = bank.maps(xb)
            answers = [m.mean(dim=(2, 3)) for m in maps]
            transfer = sum(F.mse_loss(m, tmaps[:, k]) for m, k in zip(maps, indices)) / len(maps)
            everyone = torch.ones(len(yb), partition.members)
            loss = _distill(aggregator(answers, everyone), tl, yb, recipe) + recipe.transfer_weight * transfer
            if recipe.dropped_weight:
                present = random_presence(len(yb), partition.members, generator)
                loss = loss + recipe.dropped_weight * _distill(aggregator(answers, present), tl, yb, recipe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if step % 20 == 19:
                bar.set_postfix(loss=f"{running / (step + 1):.3f}")
        aggregator.eval()
        val = accuracy(aggregator, member_answers(bank, data.val_x), data.val_y)
        history.append({"epoch": epoch + 1, "loss": running / steps, "val_accuracy": round(val, 4)})
        if progress:
            tqdm.write(f"{recipe.method} S={recipe.members} epoch {epoch + 1}: validation accuracy {val:.4f}")
    bank.eval()
    aggregator.eval()
    test = accuracy(aggregator, member_answers(bank, data.test_x), data.test_y)
    record = {"recipe": asdict(recipe), "history": history, "training_seconds": round(time.time() - started, 1),
              "test_accuracy": round(test, 4), "validation_accuracy": history[-1]["val_accuracy"] if history else None}
    return bank, aggregator, record


def check_recipe(recipe: NonnRecipe, filters: int) -> None:
    """Raise ValueError for a recipe that cannot train on a teacher with ``filters`` final filters.

    Called before the teacher pass, so a mistake costs no minutes."""
    if recipe.method not in ("original", "enhanced"):
        raise ValueError(f"unknown partitioning {recipe.method!r}; use original or enhanced")
    if not 1 <= recipe.members <= filters:
        raise ValueError(f"members must be between 1 and {filters} (the teacher's final filters), "
                         f"not {recipe.members}")
    if recipe.method == "enhanced" and recipe.parts is not None:
        most = min(filters, recipe.members // 2 if recipe.members > 1 else filters)
        if not 1 <= recipe.parts <= most:
            raise ValueError(f"{recipe.members} members need 1 <= parts <= {most}, not {recipe.parts}")
    if len(recipe.widths) != 3 or any(w < 1 for w in recipe.widths):
        raise ValueError(f"widths must be three channel counts >= 1, not {tuple(recipe.widths)}")
    for what, value in (("epochs", recipe.epochs), ("batch size", recipe.batch_size),
                        ("validation images", recipe.validation)):
        if value < 1:
            raise ValueError(f"{what} must be at least 1, not {value}")
    if recipe.train_limit is not None and recipe.train_limit < 1:
        raise ValueError(f"train limit must be at least 1 image (or None for all), not {recipe.train_limit}")


def teacher_filters(teacher: SplitModel) -> int:
    """The number of filters (channels) of the teacher's final feature maps, which members share out."""
    return teacher.cut_points()[stats.feature_cut(teacher)].shape[0]


def train_and_save(recipes: list[NonnRecipe], out_dir: str | Path = WEIGHTS_DIR, teacher_name: str = "resnet_fm",
                   data_root: str | Path | None = None, progress: bool = True,
                   data: TeacherTargets | None = None) -> list[dict]:
    """Train each recipe (sharing one teacher pass) and write its bundle; return the manifests.

    Every recipe is checked (:func:`check_recipe`) before the teacher pass."""
    if not recipes:
        raise ValueError("nothing to train")
    validation = {r.validation for r in recipes}
    limits = {r.train_limit for r in recipes}
    if len(validation) != 1 or len(limits) != 1:
        raise ValueError("recipes trained together must share validation and train_limit")
    teacher = data.teacher if data is not None else load_trained(teacher_name)
    filters = teacher_filters(teacher)
    for recipe in recipes:
        check_recipe(recipe, filters)
    data = data or prepare(teacher_name, validation.pop(), limits.pop(), data_root, progress, teacher=teacher)
    manifests = []
    for recipe in recipes:
        bank, aggregator, record = train_ensemble(recipe, data, progress)
        name = ensemble_name(teacher_name, recipe)
        manifests.append(save_ensemble(out_dir, name, bank, aggregator, record, data))
    return manifests


def ensemble_name(teacher_name: str, recipe: NonnRecipe) -> str:
    """The bundle name of a recipe, e.g. ``nonn_resnet_fm_s8_enhanced`` (``..._nodrop`` without member dropout)."""
    return f"nonn_{teacher_name}_s{recipe.members}_{recipe.method}" + ("" if recipe.dropped_weight else "_nodrop")
