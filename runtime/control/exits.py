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

import math
from collections.abc import Mapping, Sequence

import torch

from edgesplit.models.split_model import CONFIDENCES, SplitModel, confidence

from .policy import ExitSetting

DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


def calibrate_exits(model: SplitModel, x: torch.Tensor, labels: Sequence[int],
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS, batch: int = 256,
                    kind: str = "max_softmax") -> list[ExitSetting]:
    """The exit setting of each threshold (and "no exits") measured on ``x`` and ``labels``,
    with the confidence ``kind`` (max-softmax or entropy) the device runner will use."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if len(x) != len(y) or not len(y):
        raise ValueError(f"need as many labels as inputs, and some: {len(x)} inputs, {len(y)} labels")
    cuts = model.exit_cuts
    confs, preds = [], []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            outputs = model.forward_exits(x[start:start + batch])
            pairs = [confidence(logits, kind) for logits in outputs]
            confs.append(torch.stack([c for c, _ in pairs]))
            preds.append(torch.stack([p for _, p in pairs]))
    conf, pred = torch.cat(confs, dim=1), torch.cat(preds, dim=1)  # [exits + final, n]
    final_correct = (pred[-1] == y).float().mean().item()
    table = [ExitSetting({}, {}, final_correct, "no exits", kind)]
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
        table.append(ExitSetting({cut: t for cut in cuts}, rates, accuracy, f"exits at {t:g}", kind))
    return table


SAMPLE_CALIBRATION_IMAGES = 300  # the first images of the shipped sample; the demo runs on the rest


def calibrate_on_sample(model: SplitModel) -> list[ExitSetting]:
    """Exit settings for ``model`` calibrated on the first ``SAMPLE_CALIBRATION_IMAGES`` of the
    shipped Fashion-MNIST sample (what the demo and ``edgesplit controller`` decide with), when
    it has exits and takes those images; else none."""
    if not model.exit_cuts or tuple(model.input_shape) != (1, 28, 28):
        return []
    from edgesplit.models.datasets import load_sample, to_tensor

    images, labels = load_sample()
    n = SAMPLE_CALIBRATION_IMAGES
    return calibrate_exits(model, to_tensor(images[:n]), [int(v) for v in labels[:n]])


def settings_from_manifest(manifest: Mapping, exit_cuts: Sequence[int] | None = None) -> list[ExitSetting]:
    """The calibrated exit settings a bundle from ``edgesplit compress`` carries (validation
    rates and accuracy per accuracy budget), as the controller's exit settings, each with the
    confidence kind its thresholds were calibrated on. A bundle without them gives just "no
    exits".

    The tables are checked before a policy weighs anything by them (ValueError naming the
    field): thresholds finite and non-negative, at ``exit_cuts`` when given (the model's
    exits; default: the manifest's ``exit_cuts``); rates in 0..1 at cuts with a threshold,
    summing to at most 1; accuracies in 0..1. A rate sum above 1 would make the share of
    inputs reaching the edge negative, an accuracy of 7.5 win every accuracy target."""
    info = manifest.get("exits")
    if info is None:
        return [ExitSetting({}, {}, 1.0, "no exits")]
    if not isinstance(info, Mapping):
        raise ValueError(f"the manifest's 'exits' must be an object, not {type(info).__name__}")
    kind = info.get("confidence", "max_softmax")
    if kind not in CONFIDENCES:
        raise ValueError(f"exits.confidence must be one of {CONFIDENCES}, not {kind!r:.60}")
    cuts = exit_cuts if exit_cuts is not None else manifest.get("exit_cuts")
    known = None if cuts is None else {c for c in cuts if type(c) is int}
    final = _share(info.get("final_accuracy", 1.0), "exits.final_accuracy")
    settings = [ExitSetting({}, {}, final, "no exits", kind)]
    entries = info.get("settings", [])
    if not isinstance(entries, list):
        raise ValueError(f"exits.settings must be a list of settings, not {type(entries).__name__}")
    for i, entry in enumerate(entries):
        where = f"exits.settings[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be an object, not {type(entry).__name__}")
        thresholds = {_cut(c, f"{where}.thresholds", known): _threshold(t, f"{where}.thresholds[{c}]")
                      for c, t in _table(entry, "thresholds", where).items()}
        accuracy = _share(entry.get("accuracy"), f"{where}.accuracy")
        if not thresholds:
            settings[0] = ExitSetting({}, {}, accuracy, "no exits", kind)
            continue
        rates = {_cut(c, f"{where}.exit_rates", known): _share(r, f"{where}.exit_rates[{c}]")
                 for c, r in _table(entry, "exit_rates", where).items()}
        if not set(rates) <= set(thresholds):
            raise ValueError(f"{where}: exit rates at cuts {sorted(set(rates) - set(thresholds))} that have no "
                             "threshold")
        if sum(rates.values()) > 1.0 + 1e-6:
            raise ValueError(f"{where}: exit rates sum to {sum(rates.values()):.4g}, more than every input")
        budget = entry.get("max_drop_points")
        name = (f"calibrated, at most {budget:g} points" if _finite_number(budget)
                else f"calibrated setting {i}")
        settings.append(ExitSetting(thresholds, rates, accuracy, name, kind))
    return settings


def _finite_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _table(entry: Mapping, key: str, where: str) -> Mapping:
    table = entry.get(key)
    if not isinstance(table, Mapping):
        raise ValueError(f"{where}.{key} must be an object of cut -> value, not {table!r:.60}")
    return table


def _cut(key, where: str, known: set[int] | None) -> int:
    if not (isinstance(key, str) and key.isascii() and key.isdigit()):
        raise ValueError(f"{where}: {key!r:.40} is not a cut index")
    cut = int(key)
    if known is not None and cut not in known:
        raise ValueError(f"{where}: cut {cut} holds no exit (the model's exits: {sorted(known)})")
    return cut


def _threshold(value, where: str) -> float:
    if not _finite_number(value) or value < 0:
        raise ValueError(f"{where} must be a finite threshold >= 0, not {value!r:.40}")
    return float(value)


def _share(value, where: str) -> float:
    if not _finite_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a number from 0 to 1, not {value!r:.40}")
    return float(value)
