"""Layer-shape records rebuild a pruned model that the zoo class alone cannot load."""

from __future__ import annotations

import pytest
import torch

from edgesplit.models import build_model
from edgesplit.partitioner.compress.architecture import layer_shapes, rebuild
from edgesplit.partitioner.compress.prune import prune_to


def test_a_pruned_state_dict_loads_only_after_rebuilding(trained_model):
    pruned = prune_to(trained_model, 0.6)
    fresh = build_model("resnet_fm")
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(pruned.state_dict())
    rebuilt = rebuild(build_model("resnet_fm"), layer_shapes(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(3, 1, 28, 28)
    for a, b in zip(rebuilt.eval().forward_exits(x), pruned.eval().forward_exits(x)):
        assert torch.equal(a, b)
    assert rebuilt.cut_points()[4].shape == pruned.cut_points()[4].shape != trained_model.cut_points()[4].shape


def test_a_record_from_another_architecture_is_refused():
    shapes = layer_shapes(build_model("resnet_fm"))
    del shapes["blocks.1.conv1"]
    with pytest.raises(ValueError, match="missing"):
        rebuild(build_model("resnet_fm"), shapes)
    shapes = layer_shapes(build_model("resnet_fm"))
    shapes["blocks.1.conv1"] = {"type": "Linear", "in": 3, "out": 4}
    with pytest.raises(ValueError, match="cannot take"):
        rebuild(build_model("resnet_fm"), shapes)


def test_a_record_larger_than_the_base_model_is_refused():
    shapes = layer_shapes(build_model("resnet_fm"))
    shapes["blocks.1.conv1"] = {"type": "Conv2d", "in": 16, "out": 10**9}
    with pytest.raises(ValueError, match="1..16"):
        rebuild(build_model("resnet_fm"), shapes)
    shapes["blocks.1.conv1"] = {"type": "Conv2d", "in": "16", "out": 8}
    with pytest.raises(ValueError, match="integer"):
        rebuild(build_model("resnet_fm"), shapes)
