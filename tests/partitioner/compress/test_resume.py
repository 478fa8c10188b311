"""Interrupted bottleneck and exit training resume after the last finished epoch and end
where an uninterrupted run ends; a checkpoint from another configuration is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edgesplit.partitioner.compress import bottleneck as bottleneck_module
from edgesplit.partitioner.compress import exits as exits_module
from edgesplit.partitioner.compress.checkpoint import CheckpointMismatch
from edgesplit.partitioner.compress.config import BottleneckConfig, ExitsConfig


class Interrupted(Exception):
    pass


def interrupt_after_first_checkpoint(monkeypatch, module):
    real = module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(module, "save_checkpoint", save_then_stop)


def states_equal(a, b) -> bool:
    return all(torch.allclose(x.float(), y.float(), atol=1e-5) for x, y in zip(a.values(), b.values()))


def test_bottleneck_training_resumes(trained_model, tiny_splits, tmp_path, monkeypatch):
    cfg = BottleneckConfig(epochs=2, finetune_epochs=1, batch_size=128)

    def train(folder):
        torch.manual_seed(0)
        return bottleneck_module.train_bottleneck(trained_model, 7, 2, 2, tiny_splits, cfg, folder, progress=False)

    reference, _ = train(tmp_path / "a")
    with monkeypatch.context() as m:
        interrupt_after_first_checkpoint(m, bottleneck_module)
        with pytest.raises(Interrupted):
            train(tmp_path / "b")
    resumed, info = train(tmp_path / "b")
    assert [h["epoch"] for h in info["history"]] == [1, 2, 1]
    assert states_equal(resumed.state_dict(), reference.state_dict())
    with pytest.raises(CheckpointMismatch, match="another configuration"):
        bottleneck_module.train_bottleneck(trained_model, 7, 2, 2, tiny_splits, replace(cfg, max_lr=0.5),
                                           tmp_path / "b", progress=False)


def test_exit_training_resumes(trained_model, tiny_splits, tmp_path, monkeypatch):
    cfg = ExitsConfig(epochs=2, cuts=[2])

    def train(path):
        torch.manual_seed(0)
        model = exits_module.with_exits(trained_model, [2])
        exits_module.train_exits(model, tiny_splits, cfg, path, progress=False)
        return model

    reference = train(tmp_path / "a")
    with monkeypatch.context() as m:
        interrupt_after_first_checkpoint(m, exits_module)
        with pytest.raises(Interrupted):
            train(tmp_path / "b")
    assert states_equal(train(tmp_path / "b").state_dict(), reference.state_dict())
