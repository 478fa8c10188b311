"""Exit calibration tables: for each candidate threshold, the share of inputs leaving at each
early exit and the accuracy that gives, measured on labelled data.

The policies weigh a plan's exits by these rates (an exit taken early saves the rest of the
device's work and the transfer) and filter plans by their accuracy. One threshold is used
for every exit; an input leaves at the first exit whose max-softmax confidence reaches it,
the rest go on to the final classifier. The table always holds "no exits" (the model's own
accuracy), so an accuracy target can be met.

Example::

    >>> import torch
    >>> from edgesplit.models import load_trained
    >>> from edgesplit.models.datasets import load_images, to_tensor
    >>> images, labels = load_images("sample")
    >>> table = calibrate_exits(load_trained("resnet_fm"), to_tensor(images[:200]), labels[:200])
    >>> [s.name for s in table][:2]
    ['no exits', 'exits at 0.8']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from edgesplit.models.split_model import SplitModel, confidence

from .policy import ExitSetting

DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def calibrate_exits(model: SplitModel, x: torch.Tensor, labels: Sequence[int],
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS, batch: int = 256) -> list[ExitSetting]:
    """The exit setting of each threshold (and "no exits") measured on ``x`` and ``labels``."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(x) != len(y) or not len(y):
        raise ValueError(f"need as many labels as inputs, and some: {len(x)} inputs, {len(y)} labels")
    cuts = model.exit_cuts
    confs, preds = [], []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            outputs = model.forward_exits(x[start:start + batch])
            pairs = [confidence(logits) for logits in outputs]
            confs.append(torch.stack([c for c, _ in pairs]))
            preds.append(torch.stack([p for _, p in pairs]))
    conf, pred = torch.cat(confs, dim=1), torch.cat(preds, dim=1)  # [exits + final, n]
    final_correct = (pred[-1] == y).float().mean().item()
    table = [ExitSetting({}, {}, final_correct, "no exits")]
    for t in thresholds:
        remaining = torch.ones(len(y), dtype=torch.bool)
        chosen = pred[-1].clone()
        rates = {}
        for i, cut in enumerate(cuts):
            leave = remaining & (conf[i] >= t)
            rates[cut] = leave.float().mean().item()
            chosen[leave] = pred[i][leave]
            remaining &= ~leave
        accuracy = (chosen == y).float().mean().item()
        table.append(ExitSetting({cut: t for cut in cuts}, rates, accuracy, f"exits at {t:g}"))
    return table


def settings_from_manifest(manifest: Mapping) -> list[ExitSetting]:
    """The calibrated exit settings a bundle from ``edgesplit compress`` carries (validation
    rates and accuracy per accuracy budget), as the controller's exit settings. A bundle
    without them gives just "no exits"."""
    info = manifest.get("exits") or {}
    settings = [ExitSetting({}, {}, float(info.get("final_accuracy", 1.0)), "no exits")]
    for entry in info.get("settings", []):
        thresholds = {int(c): float(t) for c, t in entry["thresholds"].items()}
        if not thresholds:
            settings[0] = ExitSetting({}, {}, float(entry["accuracy"]), "no exits")
            continue
        rates = {int(c): float(r) for c, r in entry["exit_rates"].items()}
        settings.append(ExitSetting(thresholds, rates, float(entry["accuracy"]),
                                    f"calibrated, at most {entry['max_drop_points']:g} points"))
    return settings
