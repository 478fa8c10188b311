"""Structured pruning through Torch-Pruning's dependency graph, adaptive BN and the knee."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgesplit.models.train import evaluate_exits
from edgesplit.partitioner.compress.prune import (
    adapt_bn,
    count_params,
    interpolated_widths,
    knee,
    prune_to,
    prune_to_widths,
    sweep,
)


@pytest.mark.parametrize("importance", ["magnitude", "bn_scale", "taylor"])
@pytest.mark.parametrize("global_pruning", [True, False])
def test_pruning_reaches_the_target_and_keeps_exits_consistent(trained_model, tiny_splits, importance,
                                                               global_pruning):
    calibration = (tiny_splits.x[:64], tiny_splits.y[:64])
    pruned = prune_to(trained_model, 0.9, importance, global_pruning, calibration)
    assert 1 - count_params(pruned) / count_params(trained_model) >= 0.9
    cuts = pruned.cut_points()
    for cut in pruned.exit_cuts:  # each exit reads as many channels as its block now gives
        first = next(m for m in pruned.exits[str(cut)].modules() if isinstance(m, nn.Conv2d))
        assert first.in_channels == cuts[cut].shape[0] < trained_model.cut_points()[cut].shape[0]
    outs = pruned.eval().forward_exits(torch.randn(2, 1, 28, 28))
    assert [tuple(o.shape) for o in outs] == [(2, 10)] * 3  # classifier outputs are never pruned
    assert count_params(trained_model) == 296398  # the original is untouched


def _widths(model) -> list[int]:
    return [m.out_channels for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and name.startswith("blocks.")]


def test_isomorphic_ranking_allocates_the_same_budget_differently(trained_model, tiny_splits):
    free = prune_to(trained_model, 0.9)
    iso = prune_to(trained_model, 0.9, isomorphic=True)
    assert 0.9 <= 1 - count_params(iso) / count_params(trained_model) < 0.91
    assert _widths(iso) != _widths(free)
    assert [tuple(o.shape) for o in iso.eval().forward_exits(tiny_splits.x[:2])] == [(2, 10)] * 3


HAND_WIDTHS = {"blocks.0.0": 8, "blocks.1.conv1": 6, "blocks.4.conv2": 12, "blocks.5.conv1": 5,
               "blocks.7.conv2": 20, "blocks.9.conv1": 7, "exits.7.0": 9}


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_pruning_to_hand_set_widths_prunes_each_coupled_group_to_them(trained_model, tiny_splits, importance):
    import copy

    calibration = (tiny_splits.x[:64], tiny_splits.y[:64])
    pruned = prune_to_widths(copy.deepcopy(trained_model), HAND_WIDTHS, importance, calibration)
    convs = {name: m for name, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    for name, width in HAND_WIDTHS.items():
        assert convs[name].out_channels == width
    # a residual stage's width is its whole group's: every block's second convolution, the
    # shortcut, the next stage's inputs and the exit head that reads the stage
    assert {convs[f"blocks.{b}.conv2"].out_channels for b in (1, 2, 3)} == {8}
    assert convs["blocks.4.shortcut.0"].out_channels == 12 == convs["blocks.7.conv1"].in_channels
    assert convs["exits.4.0"].in_channels == 8 and convs["exits.7.0"].in_channels == 12
    assert convs["blocks.2.conv1"].out_channels == 16  # an unnamed inner width stays whole
    outs = pruned.eval().forward_exits(tiny_splits.x[:3])
    assert [tuple(o.shape) for o in outs] == [(3, 10)] * 3
    assert count_params(trained_model) == 296398  # the original is untouched
    if importance == "magnitude":  # the channels kept are the group's most important, in order
        import torch_pruning as tp

        from edgesplit.partitioner.compress.prune import _all_outputs, _importance, _sum_outputs

        graph = tp.DependencyGraph().build_dependency(trained_model, torch.zeros(2, 1, 28, 28),
                                                      forward_fn=_all_outputs, output_transform=_sum_outputs)
        conv = trained_model.get_submodule("blocks.1.conv1")
        scores = _importance("magnitude")(graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(16))))
        keep = sorted(torch.argsort(scores, descending=True)[:6].tolist())
        alone = prune_to_widths(copy.deepcopy(trained_model), {"blocks.1.conv1": 6})
        assert torch.equal(alone.get_submodule("blocks.1.conv1").weight, conv.weight[keep])
        assert torch.equal(alone.get_submodule("blocks.1.conv2").weight, trained_model.blocks[1].conv2.weight[:, keep])


def test_hand_set_widths_are_checked_and_steps_approach_them_geometrically(trained_model):
    import copy

    model = copy.deepcopy(trained_model)
    with pytest.raises(ValueError, match="not a convolution"):
        prune_to_widths(model, {"blocks.1.bn1": 4})
    with pytest.raises(ValueError, match="cannot widen"):
        prune_to_widths(model, {"blocks.1.conv1": 17})
    with pytest.raises(ValueError, match="at least 1"):
        prune_to_widths(model, {"blocks.1.conv1": 0})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="disagree"):  # two members of the stem's group
        prune_to_widths(model, {"blocks.0.0": 8, "blocks.1.conv2": 4})
    after = model.state_dict()  # refused before anything was pruned
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    half = interpolated_widths(trained_model, {"blocks.7.conv2": 16, "blocks.1.conv1": 4}, 0.5)
    assert half == {"blocks.7.conv2": 32, "blocks.1.conv1": 8}
    assert interpolated_widths(trained_model, {"blocks.7.conv2": 16}, 1.0) == {"blocks.7.conv2": 16}


def test_taylor_needs_data(trained_model):
    with pytest.raises(ValueError, match="calibration"):
        prune_to(trained_model, 0.5, "taylor")
    with pytest.raises(ValueError, match="importance"):
        prune_to(trained_model, 0.5, "random")


def test_adaptive_bn_re_estimates_statistics_from_the_data(trained_model, tiny_splits):
    pruned = prune_to(trained_model, 0.5)
    x = tiny_splits.x[:512]
    adapt_bn(pruned, x, batch_size=128, batches=4)
    stem_bn = pruned.blocks[0][1]
    with torch.no_grad():
        pre = pruned.blocks[0][0](x)  # what the stem's batch norm sees
    assert torch.allclose(stem_bn.running_mean, pre.mean((0, 2, 3)), atol=1e-4)
    assert stem_bn.momentum == 0.1 and not pruned.training


def test_sweep_and_knee(trained_model, tiny_splits):
    def val(model):
        return evaluate_exits(model, tiny_splits.val_x, tiny_splits.val_y)[-1]

    curve = sweep(trained_model, [0.0, 0.5, 0.9], val, tiny_splits.x)
    assert [p["removed"] for p in curve][0] == 0.0 and curve[-1]["removed"] >= 0.9
    assert curve[0]["accuracy"] > curve[-1]["accuracy"]
    # a curve flat until 0.6 then falling has its knee at 0.6
    assert knee([0.0, 0.2, 0.4, 0.6, 0.8, 0.9], [0.93, 0.93, 0.929, 0.925, 0.7, 0.3]) == 3
    assert knee([0, 1, 2], [1, 1, 1]) == 2
    with pytest.raises(ValueError):
        knee([0, 1], [1, 0])
