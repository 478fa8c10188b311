"""The learned bottleneck: code size, 8-bit code, training, save and reload."""

from __future__ import annotations

import pytest
import torch

from edgesplit.partitioner.compress.bottleneck import (
    LEVELS,
    Bottleneck,
    code_point,
    load_bottleneck,
    save_bottleneck,
    train_bottleneck,
)
from edgesplit.partitioner.compress.config import BottleneckConfig
from edgesplit.partitioner.compress.data import accuracy
from edgesplit.runtime.rate import codec_point


def test_code_is_small_and_on_the_8_bit_grid(trained_model):
    b = Bottleneck((32, 14, 14), channels=2, stride=2).eval()
    assert b.code_shape == (2, 7, 7) and b.code_bytes == 98 < 784 / 2
    code = b.encode(trained_model.run(torch.randn(3, 1, 28, 28), 0, 7))
    assert code.min() >= 0 and code.max() <= 1
    assert torch.allclose(code * LEVELS, (code * LEVELS).round(), atol=1e-4)
    with pytest.raises(ValueError):
        Bottleneck((32, 14, 14), channels=2, stride=3)


def test_training_teaches_the_bottleneck_and_it_reloads(trained_model, tiny_splits, tmp_path):
    cfg = BottleneckConfig(epochs=2, finetune_epochs=1, batch_size=64, max_lr=0.01)
    torch.manual_seed(0)
    untrained = Bottleneck(trained_model.cut_points()[7].shape, 8, 2)
    net, info = train_bottleneck(trained_model, 7, 8, 2, tiny_splits, cfg, tmp_path / "ck", progress=False)
    assert len(info["history"]) == 3
    trained_acc = accuracy(net, tiny_splits.test_x, tiny_splits.test_y)
    from edgesplit.partitioner.compress.bottleneck import BottleneckModel

    base = accuracy(BottleneckModel(trained_model, 7, untrained.eval()), tiny_splits.test_x, tiny_splits.test_y)
    assert trained_acc > base + 0.3 and trained_acc > 0.6, (base, trained_acc)
    for p_net, p_orig in zip(net.model.blocks[:7].parameters(), trained_model.blocks[:7].parameters()):
        assert torch.equal(p_net, p_orig)  # the device's head is the shipped one
    save_bottleneck(net, tmp_path / "b.safetensors")
    again = load_bottleneck(trained_model, tmp_path / "b.safetensors")
    x = tiny_splits.test_x[:20]
    assert torch.equal(again(x), net(x))
    # on the wire (the int8 codec, one request at a time) the answers stay the same
    point = codec_point(net.head, net.tail, tiny_splits.test_x, tiny_splits.test_y, "int8")
    assert point["bytes"] == 8 * 7 * 7 + 8 and abs(point["accuracy"] - trained_acc) <= 0.01
    own = code_point(net, tiny_splits.test_x, tiny_splits.test_y)
    assert own["bytes"] == point["bytes"] and own["accuracy"] == trained_acc


def _retag(changes: dict):
    def edit(manifest, folder):
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = folder / "bottleneck.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(path))
        if changes.get("nan"):
            name = next(k for k in tensors if k.startswith("bottleneck.") and tensors[k].is_floating_point())
            tensors[name] = torch.full_like(tensors[name], float("nan"))
        else:
            meta.update(changes)
        save_file(tensors, str(path), metadata=meta)
    return edit


def _unlisted(manifest, folder):
    del manifest["bottleneck"]


@pytest.mark.parametrize("edit, message", [
    (lambda m, f: m["bottleneck"].update(cut=4, channels=8, stride=1, code_shape=[8, 28, 28]),
     "holds .*'cut': 7.*the manifest says .*'cut': 4"),
    (_unlisted, "carries no bottleneck section"),
    (lambda m, f: m["files"].pop("bottleneck.safetensors"), "not a file the manifest lists"),
    (_retag({"channels": "4"}), "does not fit a cut-7 bottleneck"),
    (_retag({"cut": "6"}), "does not fit a cut-6 bottleneck"),
    (_retag({"nan": True}), "holds NaN or Inf"),
])
def test_a_bundle_bottleneck_is_checked_against_its_manifest(tampered_bundle, edit, message):
    """A manifest saying cut 4 loaded a cut-7 bottleneck silently; an unlisted, unhashed file
    loaded; a file of another shape raised torch's RuntimeError."""
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.compress.bottleneck import bottleneck_from_bundle

    bundle = load_bundle(tampered_bundle("resnet_fm_bottleneck", edit))
    with pytest.raises(ValueError, match=message):
        bottleneck_from_bundle(bundle)


def test_the_committed_bottleneck_loads_from_its_bundle():
    from edgesplit.partitioner.bundle import load_bundle
    from edgesplit.partitioner.compress.bottleneck import bottleneck_from_bundle
    from tests.partitioner.compress.conftest import COMMITTED

    net = bottleneck_from_bundle(load_bundle(COMMITTED / "resnet_fm_bottleneck"))
    assert (net.cut, list(net.bottleneck.code_shape)) == (7, [2, 7, 7])
