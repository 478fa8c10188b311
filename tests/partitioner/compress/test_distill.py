"""Logit and hint distillation, hint-point clustering, and resumable training."""

from __future__ import annotations

import pytest
import torch

from edgesplit.models.train import evaluate_exits
from edgesplit.partitioner.compress.checkpoint import read_progress
from edgesplit.partitioner.compress.distill import (
    DistillRecipe,
    adaptation_layers,
    cluster_hint_points,
    distill,
    kd_loss,
)
from edgesplit.partitioner.compress.prune import adapt_bn, prune_to


def test_kd_loss_is_zero_only_when_the_student_matches_the_teacher():
    logits = torch.randn(8, 10)
    labels = logits.argmax(1)
    assert kd_loss(logits, logits, labels, 4.0, 1.0).abs().item() < 1e-6
    assert kd_loss(logits + torch.randn(8, 10), logits, labels, 4.0, 1.0).item() > 1e-3
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.isclose(kd_loss(logits, logits, labels, 4.0, 0.0), ce)


def test_hint_points_come_from_clustering_the_teachers_layers(trained_model, tiny_splits):
    cuts = cluster_hint_points(trained_model, tiny_splits.val_x[:128], 3)
    assert len(cuts) == len(set(cuts)) == 3 and all(0 < c < trained_model.num_blocks for c in cuts)
    assert cuts == cluster_hint_points(trained_model, tiny_splits.val_x[:128], 3)  # deterministic
    with pytest.raises(ValueError):
        cluster_hint_points(trained_model, tiny_splits.val_x[:16], 40)
    pruned = prune_to(trained_model, 0.5)
    adapt = adaptation_layers(pruned, trained_model, cuts)
    for c in cuts:
        h = pruned.run(torch.zeros(1, 1, 28, 28), 0, c)
        assert adapt[str(c)](h).shape == trained_model.run(torch.zeros(1, 1, 28, 28), 0, c).shape


def test_distillation_recovers_a_pruned_model(trained_model, tiny_splits):
    pruned = prune_to(trained_model, 0.8)
    adapt_bn(pruned, tiny_splits.x)
    before = evaluate_exits(pruned, tiny_splits.val_x, tiny_splits.val_y)[-1]
    recipe = DistillRecipe(epochs=2, max_lr=0.02, hints=[4, 7])
    result = distill(pruned, trained_model, tiny_splits, recipe, progress=False)
    after = evaluate_exits(pruned, tiny_splits.val_x, tiny_splits.val_y)[-1]
    assert after > before + 0.1, (before, after)
    assert result["hints"] == [4, 7] and len(result["history"]) == 2


def test_an_interrupted_distillation_resumes_where_it_stopped(trained_model, tiny_splits, tmp_path):
    recipe = DistillRecipe(epochs=2, max_lr=0.02, hints=[7], augment=False)
    base = prune_to(trained_model, 0.8)
    reference = prune_to(trained_model, 0.8)
    reference.load_state_dict(base.state_dict())
    torch.manual_seed(1)
    distill(reference, trained_model, tiny_splits, recipe, progress=False)

    class Interrupted(Exception):
        pass

    def stop(record):
        raise Interrupted(record["epoch"])

    student = prune_to(trained_model, 0.8)
    student.load_state_dict(base.state_dict())
    torch.manual_seed(1)
    with pytest.raises(Interrupted):
        distill(student, trained_model, tiny_splits, recipe, tmp_path / "ck", progress=False, on_epoch=stop)
    assert read_progress(tmp_path / "ck")["progress"]["epoch"] == 1
    resumed = prune_to(trained_model, 0.8)
    result = distill(resumed, trained_model, tiny_splits, recipe, tmp_path / "ck", progress=False)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_a_checkpoint_of_a_student_pruned_otherwise_is_refused(trained_model, tiny_splits, tmp_path):
    from edgesplit.partitioner.compress.checkpoint import CheckpointMismatch

    recipe = DistillRecipe(epochs=1, max_lr=0.02, hint_weight=0.0, augment=False)
    student = prune_to(trained_model, 0.8)
    made = {"importance": "magnitude", "isomorphic": False}
    distill(student, trained_model, tiny_splits, recipe, tmp_path / "ck", progress=False, context=made)
    # the same layer shapes, pruned by another rule: the checkpoint is not this student's
    again = prune_to(trained_model, 0.8)
    with pytest.raises(CheckpointMismatch, match="another configuration"):
        distill(again, trained_model, tiny_splits, recipe, tmp_path / "ck", progress=False,
                context={**made, "isomorphic": True})
    assert len(distill(again, trained_model, tiny_splits, recipe, tmp_path / "ck", progress=False,
                       context=made)["history"]) == 1  # the same context: resumed, already done


def test_an_extra_teachers_logits_join_the_soft_targets(trained_model, tiny_splits):
    import copy

    biased = copy.deepcopy(trained_model)
    classifier = biased.blocks[-1][-1]
    with torch.no_grad():  # a teacher that says "class 0" whatever it sees
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[0] = 20.0
    recipe = DistillRecipe(epochs=1, max_lr=0.02, kd_weight=1.0, hint_weight=0.0)
    shares = []
    for extra in ([], [biased]):
        student = prune_to(trained_model, 0.5)
        distill(student, trained_model, tiny_splits, recipe, progress=False, extra_teachers=extra)
        with torch.no_grad():
            shares.append(float((student(tiny_splits.val_x).argmax(1) == 0).float().mean()))
    assert shares[1] > shares[0] + 0.3, shares
