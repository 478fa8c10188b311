"""Exit calibration: rates and accuracy per threshold, measured on labelled data with the
shipped model; a lower threshold lets more inputs leave early."""

import pytest
import torch

from edgesplit.models import load_trained
from edgesplit.models.datasets import load_images, to_tensor
from edgesplit.models.split_model import confidence
from edgesplit.runtime.control.exits import calibrate_exits


def test_rates_and_accuracy_match_a_direct_count_on_the_shipped_model():
    model = load_trained("resnet_fm")
    images, labels = load_images("sample")
    x, y = to_tensor(images[:200]), [int(v) for v in labels[:200]]
    table = calibrate_exits(model, x, y, thresholds=(0.5, 0.9), batch=64)
    assert [s.name for s in table] == ["no exits", "exits at 0.5", "exits at 0.9"]
    with torch.inference_mode():
        outs = model.forward_exits(x)
    final = confidence(outs[-1])[1]
    assert table[0].accuracy == pytest.approx(sum(int(p) == t for p, t in zip(final, y)) / 200)
    first_cut = model.exit_cuts[0]
    c, _ = confidence(outs[0])
    assert table[2].rates[first_cut] == pytest.approx(float((c >= 0.9).float().mean()))
    assert table[2].thresholds == {cut: 0.9 for cut in model.exit_cuts}
    # a lower threshold: at least as many leave at the first exit, and never more than all
    assert table[1].rates[first_cut] >= table[2].rates[first_cut]
    assert all(sum(s.rates.values()) <= 1.0 + 1e-6 for s in table)


def test_labels_must_match_inputs():
    model = load_trained("resnet_fm")
    with pytest.raises(ValueError, match="as many labels"):
        calibrate_exits(model, torch.zeros(3, 1, 28, 28), [1, 2])
