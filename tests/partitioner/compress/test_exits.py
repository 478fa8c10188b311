"""Exits: heads at chosen cuts, self-distillation, confidence, cascade simulation and
threshold calibration."""

from __future__ import annotations

import pytest
import torch

from edgesplit.models.split_model import confidence as confidences
from edgesplit.partitioner.compress.config import ExitsConfig
from edgesplit.partitioner.compress.exits import (
    GRID,
    OFF,
    calibrate,
    exit_costs,
    outputs_of,
    simulate,
    stacked,
    tables,
    train_exits,
    with_exits,
)


def test_new_heads_join_existing_ones(trained_model):
    model = with_exits(trained_model, [2, 4, 7])
    assert model.exit_cuts == [2, 4, 7]
    x = torch.randn(2, 1, 28, 28)
    h = trained_model.run(x, 0, 4)
    assert torch.equal(model.exits["4"](h), trained_model.exits["4"](h))
    assert torch.equal(model(x), trained_model(x))


def test_light_heads_replace_every_head_and_cost_a_fraction_of_the_conv_ones(trained_model):
    conv = with_exits(trained_model, [2, 4, 7], head="conv")
    light = with_exits(trained_model, [2, 4, 7], head="light")
    conv_macs, light_macs = exit_costs(conv)[1], exit_costs(light)[1]
    assert set(light_macs) == {2, 4, 7}
    for cut in (2, 4, 7):
        assert light_macs[cut] < conv_macs[cut] / 5, (cut, light_macs[cut], conv_macs[cut])
    x = torch.randn(2, 1, 28, 28)
    h = trained_model.run(x, 0, 4)
    assert not torch.equal(light.exits["4"](h), trained_model.exits["4"](h))  # a new head, not the zoo's
    assert torch.equal(light(x), trained_model(x))  # the backbone is untouched
    with pytest.raises(ValueError, match="unknown exit head"):
        with_exits(trained_model, [2], head="huge")


def test_confidences_live_in_the_unit_interval():
    logits = torch.tensor([[10.0, 0, 0], [0.0, 0, 0]])
    for kind in ("max_softmax", "entropy"):
        conf, pred = confidences(logits, kind)
        assert 0 <= conf.min() and conf.max() <= 1 and conf[0] > conf[1] and pred[0] == 0
    assert confidences(torch.zeros(1, 4), "entropy")[0].item() < 1e-6


def test_self_distillation_trains_only_the_heads(trained_model, tiny_splits):
    torch.manual_seed(0)  # the new head's initial weights: unseeded, 2 epochs gained 0.10-0.26 over six seeds
    model = with_exits(trained_model, [2])
    backbone = {k: v.clone() for k, v in model.blocks.state_dict().items()}
    before = [float((o.argmax(1) == tiny_splits.val_y).float().mean()) for o in outputs_of(model, tiny_splits.val_x)]
    cfg = ExitsConfig(epochs=2, batch_size=128, max_lr=0.05, temperature=4.0, kd_weight=0.9)
    train_exits(model, tiny_splits, cfg, progress=False)
    after = [float((o.argmax(1) == tiny_splits.val_y).float().mean()) for o in outputs_of(model, tiny_splits.val_x)]
    assert after[0] > before[0] + 0.1  # the new head at cut 2 learned
    for k, v in model.blocks.state_dict().items():
        assert torch.equal(v, backbone[k]), k  # frozen backbone, batch-norm statistics included
    assert after[-1] == before[-1]


def test_calibration_keeps_accuracy_within_the_target_and_saves_macs(trained_model, tiny_splits):
    model = with_exits(trained_model, [4, 7])
    costs = exit_costs(model)
    conf, pred = stacked(outputs_of(model, tiny_splits.val_x), "max_softmax")
    y = tiny_splits.val_y
    off = simulate(conf, pred, y, model.exit_cuts, {}, costs)
    assert off.mean_macs == costs[2] and off.accuracy == float((pred[-1] == y).float().mean())
    chosen = calibrate(conf, pred, y, model.exit_cuts, costs, max_drop_points=1.0, z=0.0)
    assert chosen.accuracy >= off.accuracy - 0.01 - 1e-9
    careful = calibrate(conf, pred, y, model.exit_cuts, costs, max_drop_points=1.0, z=1.645)
    assert careful.mean_macs >= chosen.mean_macs  # the confidence bound spends less of the budget
    assert chosen.mean_macs < 0.8 * off.mean_macs
    assert all(t in GRID for t in chosen.thresholds.values())
    everything = simulate(conf, pred, y, model.exit_cuts, {4: 0.0}, costs)
    assert everything.exit_rates[4] == 1.0 and everything.mean_macs == costs[0][4] + costs[1][4]
    table = tables(conf, pred, y, model.exit_cuts)
    rates = [row["exit_rate"] for row in table["4"]]
    assert rates == sorted(rates, reverse=True) and len(rates) == len(GRID)
    assert OFF > max(GRID)
