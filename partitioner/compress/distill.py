"""Knowledge distillation from a teacher split model to a student split model.

The loss of every student output (each exit, then the final classifier) is
``(1 - kd_weight) * CE(labels) + kd_weight * T^2 * KL(teacher_final / T || student / T)``:
logit distillation with temperature ``T``, every exit taught by the teacher's final
output. Hint (feature) distillation adds ``hint_weight * MSE(adapt(student_h), teacher_h)``
at chosen cuts, where ``adapt`` is a 1x1 convolution from the student's channels to the
teacher's, trained with the student and dropped afterwards. Teacher and student are chains
of the same blocks (a pruned copy, or a zoo model with smaller widths), so a cut names the
same place in both.

Hint points are given, or chosen by :func:`cluster_hint_points`: the teacher's cuts are
clustered on statistics of their activations and the cut nearest each cluster centre is
taken (hint-layer selection by clustering, as in the compression literature).

Training is resumable: with ``checkpoint`` set, every epoch ends with a checkpoint and a
rerun continues after the last finished epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from edgesplit.models.datasets import TensorBatches
from edgesplit.models.split_model import SplitModel
from edgesplit.models.train import evaluate_exits, nesterov_sgd

from .architecture import layer_shapes
from .checkpoint import fast_forward, load_checkpoint, read_progress, save_checkpoint
from .data import Splits


@dataclass
class DistillRecipe:
    """Hyper-parameters of distillation (SGD with Nesterov momentum, one-cycle schedule)."""

    epochs: int = 20
    batch_size: int = 128
    max_lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 4.0
    kd_weight: float = 0.9
    hint_weight: float = 1.0  # 0 turns hint distillation off
    hints: list[int] | str = "cluster"  # cut indices, or "cluster" to choose them
    n_hints: int = 2
    exit_weights: list[float] = field(default_factory=lambda: [0.5, 0.5, 1.0])
    augment: bool = True
    seed: int = 0


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
            kd_weight: float) -> torch.Tensor:
    """Cross-entropy with the labels blended with the temperature-scaled KL to the teacher."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    return (1 - kd_weight) * F.cross_entropy(student, labels) + kd_weight * soft


def run_with_features(model: SplitModel, x: torch.Tensor, cuts: list[int]) -> tuple[dict[int, torch.Tensor],
                                                                                      list[torch.Tensor]]:
    """The tensors crossing ``cuts`` and the outputs of every exit then the final classifier."""
    features: dict[int, torch.Tensor] = {}
    outputs = []
    wanted = set(cuts)
    h = x
    for i, block in enumerate(model.blocks):
        h = block(h)
        if i + 1 in wanted:
            features[i + 1] = h
        if str(i + 1) in model.exits:
            outputs.append(model.exits[str(i + 1)](h))
    outputs.append(h)
    return features, outputs


@torch.no_grad()
def layer_statistics(model: SplitModel, images: torch.Tensor) -> dict[int, list[float]]:
    """Per inner cut: mean, standard deviation, fraction of zeros, log2 of the elements per
    sample and relative depth of the tensor crossing it."""
    model.eval()
    cuts = list(range(1, model.num_blocks))
    features, _ = run_with_features(model, images, cuts)
    stats = {}
    for cut, h in features.items():
        stats[cut] = [float(h.mean()), float(h.std()), float((h.abs() < 1e-6).float().mean()),
                      math.log2(h[0].numel()), cut / model.num_blocks]
    return stats


def cluster_hint_points(model: SplitModel, images: torch.Tensor, n: int, iterations: int = 50) -> list[int]:
    """``n`` hint cuts: k-means over the standardised layer statistics, then the cut nearest
    each cluster centre (deterministic: farthest-point initialisation)."""
    stats = layer_statistics(model, images)
    cuts = sorted(stats)
    if not 0 < n <= len(cuts):
        raise ValueError(f"cannot choose {n} hint points among {len(cuts)} cuts")
    data = torch.tensor([stats[c] for c in cuts])
    data = (data - data.mean(0)) / data.std(0).clamp_min(1e-9)
    centres = [data[len(cuts) // 2]]
    while len(centres) < n:
        dist = torch.cdist(data, torch.stack(centres)).min(1).values
        centres.append(data[int(dist.argmax())])
    centre = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cdist(data, centre).argmin(1)
        new = torch.stack([data[assign == k].mean(0) if (assign == k).any() else centre[k] for k in range(n)])
        if torch.allclose(new, centre):
            break
        centre = new
    chosen: list[int] = []
    for k in range(n):  # nearest cut to each centre, never one already taken
        order = torch.cdist(centre[k : k + 1], data)[0].argsort().tolist()
        chosen.append(next(cuts[i] for i in order if cuts[i] not in chosen))
    return sorted(chosen)


def adaptation_layers(student: SplitModel, teacher: SplitModel, cuts: list[int]) -> nn.ModuleDict:
    """A 1x1 convolution per hint cut from the student's channels to the teacher's."""
    s_shapes, t_shapes = student.cut_points(), teacher.cut_points()
    return nn.ModuleDict({str(c): nn.Conv2d(s_shapes[c].shape[0], t_shapes[c].shape[0], 1, bias=False)
                          for c in cuts})


def distill(student: SplitModel, teacher: SplitModel, data: Splits, recipe: DistillRecipe | None = None,
            checkpoint: str | Path | None = None, progress: bool = True, desc: str = "distil",
            on_epoch: Callable[[dict], None] | None = None, context: dict | None = None,
            extra_teachers: Sequence[SplitModel] = ()) -> dict:
    """Train ``student`` in place from ``teacher`` on ``data``; return the history and the
    hint cuts. Validation accuracy per output is measured after every epoch, and
    ``on_epoch`` is called with that epoch's record once its checkpoint is written.
    ``context`` (JSON values) joins the checkpoint's fingerprint: settings outside the
    recipe that made the student, so a checkpoint made under others is refused (name
    ``extra_teachers`` there: their final logits are averaged with ``teacher``'s to make the
    soft targets, an ensemble teacher; hints come from ``teacher`` alone)."""
    recipe = recipe or DistillRecipe()
    n_outputs = len(student.exit_cuts) + 1
    if len(recipe.exit_weights) != n_outputs:
        raise ValueError(f"{student.name} has {n_outputs} outputs; give that many exit weights, "
                         f"not {recipe.exit_weights}")
    if student.num_blocks != teacher.num_blocks:
        raise ValueError("teacher and student must be chains of the same number of blocks")
    teacher.eval()
    for extra in extra_teachers:
        extra.eval()
    if recipe.hint_weight > 0:
        hints = (cluster_hint_points(teacher, data.val_x[:512], recipe.n_hints) if recipe.hints == "cluster"
                 else sorted(int(c) for c in recipe.hints))
    else:
        hints = []
    torch.manual_seed(recipe.seed)
    adapt = adaptation_layers(student, teacher, hints)
    params = list(student.parameters()) + list(adapt.parameters())
    optimizer = nesterov_sgd(params, recipe.max_lr, recipe.momentum, recipe.weight_decay)
    steps_per_epoch = math.ceil(len(data.y) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.max_lr, epochs=recipe.epochs,
                                                   steps_per_epoch=steps_per_epoch)
    history: list[dict] = []
    start_epoch, seconds = 0, 0.0
    fingerprint = {"recipe": asdict(recipe), "hints": hints, "layers": layer_shapes(student)}
    if context:
        fingerprint["context"] = context
    if checkpoint is not None and read_progress(checkpoint, fingerprint) is not None:
        saved = load_checkpoint(checkpoint, student, optimizer, {"adapt": adapt})
        start_epoch, history, seconds = saved["epoch"], saved["history"], saved["seconds"]
        fast_forward(schedule, start_epoch * steps_per_epoch)
    for epoch in range(start_epoch, recipe.epochs):
        started = time.time()
        student.train()
        adapt.train()
        batches = TensorBatches(data.x, data.y, recipe.batch_size, shuffle=True, augment=recipe.augment,
                                seed=recipe.seed + epoch)
        bar = tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{recipe.epochs}", disable=not progress, unit="batch",
                   leave=False)
        running = 0.0
        for step, (xb, yb) in enumerate(bar, start=1):
            with torch.no_grad():
                t_feats, t_outs = run_with_features(teacher, xb, hints)
                target = t_outs[-1]
                if extra_teachers:
                    target = torch.stack([target, *(t(xb) for t in extra_teachers)]).mean(0)
            s_feats, s_outs = run_with_features(student, xb, hints)
            loss = sum(w * kd_loss(o, target, yb, recipe.temperature, recipe.kd_weight)
                       for w, o in zip(recipe.exit_weights, s_outs))
            for c in hints:
                loss = loss + recipe.hint_weight * F.mse_loss(adapt[str(c)](s_feats[c]), t_feats[c])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running / step:.3f}", lr=f"{schedule.get_last_lr()[0]:.4f}")
        val = evaluate_exits(student, data.val_x, data.val_y)
        seconds += time.time() - started
        history.append({"epoch": epoch + 1, "loss": round(running / steps_per_epoch, 4),
                        "val_accuracy": [round(a, 4) for a in val]})
        if progress:
            tqdm.write(f"{desc} epoch {epoch + 1}: validation accuracy per output {[f'{a:.4f}' for a in val]}")
        if checkpoint is not None:
            save_checkpoint(checkpoint, student, optimizer,
                            {"epoch": epoch + 1, "history": history, "seconds": round(seconds, 1)},
                            {"adapt": adapt}, fingerprint)
        if on_epoch is not None:
            on_epoch(history[-1])
    student.eval()
    return {"history": history, "hints": hints, "seconds": round(seconds, 1), "recipe": asdict(recipe)}
