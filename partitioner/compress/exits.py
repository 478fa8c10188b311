"""Early exits that pay: heads at chosen cuts trained by self-distillation, and thresholds
calibrated on the validation split to a target accuracy.

Training: every exit learns from the labels and from the model's own final output (the
deepest exit teaches the shallow ones: ``(1 - kd_weight) * CE + kd_weight * T^2 * KL``).
With ``freeze_backbone`` (the default) the backbone and final classifier stay as they are
and only the heads train; without it the whole network trains jointly (the final output
against the labels). The backbone is the shipped network unless ``backbone`` names other
weights of the same architecture: the shipped one was trained on all 60,000 training
images, the validation split included, so its confidence there is higher than on new
images; a backbone trained on the other 55,000 (``edgesplit train resnet_fm --limit
55000``) leaves the validation split unseen.

Calibration: confidence is max-softmax or normalised entropy (``1 - H(p) / log K``, so
both live in [0, 1]). For each exit and threshold the validation split gives the share of
inputs whose confidence clears it and their accuracy — the per-exit tables the bundle
stores for the cost model and the controller. Thresholds for the cascade are chosen
greedily: starting with every exit off, repeatedly lower the one threshold that saves the
most device MACs per point of validation accuracy lost, while the cascade's drop against
the final exit stays within ``max_drop_points`` — its upper 95% confidence bound
(``confidence_z`` = 1.645 standard errors of the paired per-image difference), not just the
measured drop: a point estimate tuned to the budget overshoots it on new data, and more so
when the validation images were part of what the backbone was trained on. An exit left off
is not run at all, so a head that does not pay for itself costs nothing.

The bundle also stores a ladder of calibrated settings (thresholds, the share leaving at
each exit, accuracy and mean MACs on validation) for accuracy budgets from 0.1 to 2 points;
:func:`edgesplit.runtime.control.exits.settings_from_manifest` turns them into the exit
settings the controller chooses among.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from edgesplit.models.datasets import TensorBatches
from edgesplit.models.resnet_fm import EXIT_HEADS
from edgesplit.models.split_model import SplitModel, confidence
from edgesplit.models.train import evaluate_exits, nesterov_sgd

from .checkpoint import fast_forward, load_checkpoint, read_progress, save_checkpoint
from .data import Splits, accuracy
from .distill import kd_loss

OFF = 1.01  # a threshold no confidence reaches: the exit is not run
# accuracy budgets (points below the final exit, validation) of the settings a bundle offers
SETTING_TARGETS = (0.1, 0.25, 0.5, 1.0, 2.0)
GRID = tuple(round(0.5 + 0.025 * i, 3) for i in range(20)) + (0.99, 0.995, 0.999)


def with_exits(model: SplitModel, cuts: list[int], head: str | None = None) -> SplitModel:
    """A copy of ``model`` with an exit head at each of ``cuts``.

    ``head`` None: existing heads are kept and new ones are the zoo's ``conv`` kind; a kind
    of :data:`~edgesplit.models.resnet_fm.EXIT_HEADS` (``conv``, ``light``): every head is a
    new one of that kind."""
    if head is not None and head not in EXIT_HEADS:
        raise ValueError(f"unknown exit head {head!r:.60}; known: {', '.join(EXIT_HEADS)}")
    make = EXIT_HEADS[head or "conv"]
    shapes = model.cut_points()
    heads = {}
    for cut in sorted(set(cuts)):
        if not 0 < cut < model.num_blocks:
            raise ValueError(f"an exit needs a cut in 1..{model.num_blocks - 1}, not {cut}")
        keep = head is None and str(cut) in model.exits
        heads[cut] = copy.deepcopy(model.exits[str(cut)]) if keep else make(shapes[cut].shape[0], model.num_classes)
    blocks = [(n, copy.deepcopy(b)) for n, b in zip(model.block_names, model.blocks)]
    out = SplitModel(model.name, blocks, heads, model.input_shape, model.num_classes)
    return out.eval()


@torch.no_grad()
def outputs_of(model: SplitModel, x: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
    """Logits of every exit, then of the final classifier, for all of ``x``."""
    model.eval()
    parts = [model.forward_exits(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def train_exits(model: SplitModel, data: Splits, cfg, checkpoint: Path | None = None, progress: bool = True) -> dict:
    """Train ``model``'s exit heads in place (self-distillation); return the history."""
    freeze = getattr(cfg, "freeze_backbone", True)
    params = [p for h in model.exits.values() for p in h.parameters()]
    if freeze:
        for p in list(model.blocks.parameters()):
            p.requires_grad_(False)
    else:
        params = list(model.parameters())
    optimizer = nesterov_sgd(params, cfg.max_lr, 0.9, 5e-4)
    steps = math.ceil(len(data.y) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.max_lr, epochs=cfg.epochs,
                                                   steps_per_epoch=steps)
    history, start, seconds = [], 0, 0.0
    fingerprint = {"config": asdict(cfg), "exit_cuts": model.exit_cuts}
    if checkpoint is not None and read_progress(checkpoint, fingerprint) is not None:
        saved = load_checkpoint(checkpoint, model, optimizer)
        start, history, seconds = saved["epoch"], saved["history"], saved["seconds"]
        fast_forward(schedule, start * steps)
    for epoch in range(start, cfg.epochs):
        began = time.time()
        model.train()
        if freeze:
            model.blocks.eval()  # the shipped batch-norm statistics stay
        batches = TensorBatches(data.x, data.y, cfg.batch_size, shuffle=True, augment=True, seed=epoch)
        bar = tqdm(batches, desc=f"exits epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        running = 0.0
        for xb, yb in bar:
            outs = model.forward_exits(xb)
            final = outs[-1].detach()
            loss = sum(kd_loss(o, final, yb, cfg.temperature, cfg.kd_weight) for o in outs[:-1])
            if not freeze:
                loss = loss + nn.functional.cross_entropy(outs[-1], yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += float(loss.detach())
        val = evaluate_exits(model, data.val_x, data.val_y)
        seconds += time.time() - began
        history.append({"epoch": epoch + 1, "loss": round(running / steps, 4),
                        "val_accuracy": [round(a, 4) for a in val]})
        if progress:
            tqdm.write(f"exits epoch {epoch + 1}: validation accuracy per output {history[-1]['val_accuracy']}")
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, optimizer, {"epoch": epoch + 1, "history": history,
                                                           "seconds": round(seconds, 1)}, config=fingerprint)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"history": history, "seconds": round(seconds, 1)}


@dataclass
class Cascade:
    """What a set of thresholds does on some data."""

    thresholds: dict[int, float]
    accuracy: float
    mean_macs: float
    exit_rates: dict[int, float]
    predictions: torch.Tensor = field(repr=False, default=None)  # the answer given to each input


def exit_costs(model: SplitModel) -> tuple[dict[int, int], dict[int, int], int]:
    """Backbone MACs up to each cut, MACs of each exit head, MACs of the whole backbone."""
    from edgesplit.partitioner.flops import block_macs, exit_macs

    blocks = block_macs(model)
    upto = {c: sum(blocks[:c]) for c in range(model.num_blocks + 1)}
    return upto, exit_macs(model), sum(blocks)


def simulate(conf: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, cuts: list[int],
             thresholds: dict[int, float], costs: tuple[dict[int, int], dict[int, int], int]) -> Cascade:
    """The cascade on precomputed confidences ``conf`` and predictions ``pred`` ([outputs, N])."""
    upto, head, total = costs
    n = len(y)
    remaining = torch.ones(n, dtype=torch.bool)
    chosen = pred[-1].clone()
    macs = torch.zeros(n, dtype=torch.float64)
    spent_heads = 0.0
    rates = {}
    for i, cut in enumerate(cuts):
        t = thresholds.get(cut, OFF)
        if t >= OFF:
            rates[cut] = 0.0
            continue
        spent_heads += head[cut]
        leave = remaining & (conf[i] >= t)
        macs[leave] = upto[cut] + spent_heads
        chosen[leave] = pred[i][leave]
        rates[cut] = float(leave.float().mean())
        remaining &= ~leave
    macs[remaining] = total + spent_heads
    return Cascade(dict(thresholds), float((chosen == y).float().mean()), float(macs.mean()), rates, chosen)


def drop_bound(pred: torch.Tensor, chosen: torch.Tensor, y: torch.Tensor, z: float) -> float:
    """Upper confidence bound, in points, of the accuracy lost by answering ``chosen``
    instead of the final exit's ``pred[-1]``: the mean paired loss plus ``z`` standard errors."""
    loss = (pred[-1] == y).float() - (chosen == y).float()
    n = len(y)
    se = float(loss.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return 100 * (float(loss.mean()) + z * se)


def calibrate(conf: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, cuts: list[int],
              costs: tuple[dict[int, int], dict[int, int], int], max_drop_points: float,
              z: float = 1.645) -> Cascade:
    """Greedy thresholds: the most MACs saved per accuracy lost, while the upper ``z``
    confidence bound of the drop against the final exit stays within ``max_drop_points``
    (``z = 0``: the measured drop itself)."""
    current = simulate(conf, pred, y, cuts, {}, costs)
    while True:
        best, best_score = None, None
        for cut in cuts:
            now = current.thresholds.get(cut, OFF)
            for t in GRID:
                if t >= now:
                    continue
                trial = simulate(conf, pred, y, cuts, {**current.thresholds, cut: t}, costs)
                if trial.mean_macs >= current.mean_macs:
                    continue
                if drop_bound(pred, trial.predictions, y, z) > max_drop_points:
                    continue
                saved = current.mean_macs - trial.mean_macs
                lost = max(current.accuracy - trial.accuracy, 0.0) + 1e-4
                score = saved / lost
                if best_score is None or score > best_score:
                    best, best_score = trial, score
        if best is None:
            return current
        current = best


def tables(conf: torch.Tensor, pred: torch.Tensor, y: torch.Tensor, cuts: list[int]) -> dict[str, list[dict]]:
    """Per exit (alone), for each threshold of the grid: the share of inputs that clear it
    and their accuracy."""
    out = {}
    for i, cut in enumerate(cuts):
        rows = []
        for t in GRID:
            leave = conf[i] >= t
            share = float(leave.float().mean())
            acc = float((pred[i][leave] == y[leave]).float().mean()) if leave.any() else None
            rows.append({"threshold": t, "exit_rate": round(share, 4),
                         "accuracy": None if acc is None else round(acc, 4)})
        out[str(cut)] = rows
    return out


def stacked(outputs: list[torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [confidence(o, kind) for o in outputs]
    return torch.stack([c for c, _ in pairs]), torch.stack([p for _, p in pairs])


def run_exits(cfg, base: str, data: Splits, out: Path, progress: bool = True) -> dict:
    """Train exits at the configured cuts on the shipped model, calibrate them on the
    validation split, and write the bundle ``OUT/<base>_exits``."""
    from edgesplit.models import load_trained
    from edgesplit.partitioner.bundle import write_bundle

    started = time.time()
    shipped = load_trained(base)  # the reference every drop is measured against
    backbone = load_trained(base, cfg.backbone) if cfg.backbone else shipped
    model = with_exits(backbone, cfg.cuts, cfg.head)
    model.name = f"{base}_exits"
    trained = train_exits(model, data, cfg, out / "checkpoints" / "exits", progress)
    cuts = model.exit_cuts
    costs = exit_costs(model)
    val_outputs, test_outputs = outputs_of(model, data.val_x), outputs_of(model, data.test_x)
    per_kind = {}
    for kind in cfg.confidence:
        conf, pred = stacked(val_outputs, kind)
        chosen = calibrate(conf, pred, data.val_y, cuts, costs, cfg.max_drop_points, cfg.confidence_z)
        tconf, tpred = stacked(test_outputs, kind)
        test = simulate(tconf, tpred, data.test_y, cuts, chosen.thresholds, costs)
        per_kind[kind] = {"val": chosen, "test": test, "tables": tables(conf, pred, data.val_y, cuts)}
    kind = min(per_kind, key=lambda k: per_kind[k]["val"].mean_macs)
    pick = per_kind[kind]
    final_test = float((test_outputs[-1].argmax(1) == data.test_y).float().mean())
    shipped_test = accuracy(shipped, data.test_x, data.test_y)
    total = costs[2]
    summary = {
        "confidence": kind,
        "thresholds": {str(c): t for c, t in pick["val"].thresholds.items() if t < OFF},
        "exit_rates_test": {str(c): round(r, 4) for c, r in pick["test"].exit_rates.items()},
        "mean_device_macs": round(pick["test"].mean_macs),
        "final_macs": total,
        "mac_ratio": round(total / pick["test"].mean_macs, 3),
        "acc_before": shipped_test,
        "acc_final_exit": final_test,
        "backbone": _backbone_summary(cfg.backbone),
        "acc_after": pick["test"].accuracy,
        "acc_drop_points": round((shipped_test - pick["test"].accuracy) * 100, 2),
        "val": {"accuracy": pick["val"].accuracy, "mean_macs": round(pick["val"].mean_macs),
                "final_accuracy": float((val_outputs[-1].argmax(1) == data.val_y).float().mean()),
                "exit_rates": {str(c): round(r, 4) for c, r in pick["val"].exit_rates.items()}},
        "by_confidence": {k: {"thresholds": {str(c): t for c, t in v["val"].thresholds.items() if t < OFF},
                              "val_mac_ratio": round(total / v["val"].mean_macs, 3),
                              "test_mac_ratio": round(total / v["test"].mean_macs, 3),
                              "test_accuracy": v["test"].accuracy} for k, v in per_kind.items()},
        "exit_cuts": cuts,
        "exit_head_macs": {str(c): m for c, m in costs[1].items()},
        "history": trained["history"],
        "train_seconds": trained["seconds"],  # the epochs' time, summed over interrupted runs
        "seconds_this_run": round(time.time() - started, 1),
    }
    conf, pred = stacked(val_outputs, kind)
    settings = []
    for target in SETTING_TARGETS:
        c = calibrate(conf, pred, data.val_y, cuts, costs, target, cfg.confidence_z)
        settings.append({"max_drop_points": target,
                         "thresholds": {str(k): t for k, t in c.thresholds.items() if t < OFF},
                         "exit_rates": {str(k): round(r, 4) for k, r in c.exit_rates.items() if r > 0},
                         "accuracy": round(c.accuracy, 4), "mean_macs": round(c.mean_macs)})
    summary["settings"] = settings
    summary["exit_head"] = cfg.head or "conv"
    extra = {"exit_head": cfg.head} if cfg.head else {}
    write_bundle(model, out / f"{base}_exits", base=base, extra={**extra, "exits": {
        "confidence": kind, "thresholds": summary["thresholds"], "tables": pick["tables"], "settings": settings,
        "max_drop_points": cfg.max_drop_points, "confidence_z": cfg.confidence_z,
        "calibrated_on": f"validation ({len(data.val_y)} images)", "backbone": summary["backbone"],
        "final_accuracy": summary["val"]["final_accuracy"],
        "val_accuracy": summary["val"]["accuracy"], "mac_ratio_val": round(total / pick["val"].mean_macs, 3)}})
    return summary


def _backbone_summary(weights: str | None) -> dict:
    """Where the exits' backbone came from: the shipped weights, or a file and its card."""
    if not weights:
        return {"weights": "shipped", "train_images": 60000}
    path = Path(weights)
    card = path.with_suffix(".json")
    info = json.loads(card.read_text()) if card.is_file() else {}
    info = info if isinstance(info, dict) else {}
    dataset = info.get("dataset") if isinstance(info.get("dataset"), dict) else {}
    outputs = info.get("exits") if isinstance(info.get("exits"), list) else []
    final = outputs[-1] if outputs and isinstance(outputs[-1], dict) else {}
    return {"weights": path.name, "sha256": info.get("sha256"), "train_images": dataset.get("train_images"),
            "test_accuracy": final.get("test_accuracy")}
