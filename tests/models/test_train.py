"""Training writes safetensors weights and a card; loading verifies the recorded sha256."""

import json

import pytest
import torch

from edgesplit.models import WEIGHTS_DIR, load_trained
from edgesplit.models.train import Recipe, train
from edgesplit.models.weights_io import sha256_file
from edgesplit.partitioner.flops import mac_summary


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    card = train("resnet_fm", Recipe(epochs=1, batch_size=64, train_limit=512), out_dir=out, progress=False,
                 count_macs=mac_summary)
    return out, card


def test_training_writes_weights_and_card(tiny_run):
    out, card = tiny_run
    weights = out / "resnet_fm.safetensors"
    assert weights.exists()
    on_disk = json.loads((out / "resnet_fm.json").read_text())
    assert on_disk == card
    assert card["sha256"] == sha256_file(weights)
    assert [e["name"] for e in card["exits"]] == ["exit@4", "exit@7", "final"]
    assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in card["exits"])
    assert card["parameters"] > 100_000 and sum(card["macs"]["blocks"]) > 10_000_000
    assert card["recipe"]["train_limit"] == 512


def test_trained_weights_load_and_tampering_is_refused(tiny_run):
    out, _ = tiny_run
    model = load_trained("resnet_fm", out / "resnet_fm.safetensors")
    assert not model.training
    data = bytearray((out / "resnet_fm.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "resnet_fm.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="refusing"):
        load_trained("resnet_fm", out / "resnet_fm.safetensors")


def test_weights_without_a_card_or_a_hash_are_refused_and_another_models_are_an_error(tiny_run, tmp_path):
    import os
    import shutil

    out, _ = tiny_run
    weights = tmp_path / "resnet_fm.safetensors"
    shutil.copy(out / "resnet_fm.safetensors", weights)
    with pytest.raises(ValueError, match="no card resnet_fm.json"):
        load_trained("resnet_fm", weights)
    card = tmp_path / "resnet_fm.json"
    for text in ('{"exits": []}', "[]", '{"sha256": 7}', "not json"):
        card.write_text(text)
        with pytest.raises(ValueError, match="sha256|not valid JSON"):
            load_trained("resnet_fm", weights)
    card.unlink()
    os.symlink("/dev/zero", card)
    with pytest.raises(ValueError, match="not a regular file"):
        load_trained("resnet_fm", weights)
    card.unlink()
    card.write_text(json.dumps({"sha256": sha256_file(weights)}))  # (another test flips a byte of the run's)
    assert not load_trained("resnet_fm", weights).training  # with its card it loads
    with pytest.raises(ValueError, match="not weights of mobilenet_v2"):
        load_trained("mobilenet_v2", weights)


def test_wrong_number_of_exit_weights_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="exit weights"):
        train("resnet_fm", Recipe(epochs=1, exit_weights=[1.0]), out_dir=tmp_path, progress=False)


def test_shipped_weights_meet_the_card(trained_model):
    card = json.loads((WEIGHTS_DIR / "resnet_fm.json").read_text())
    assert card["sha256"] == sha256_file(WEIGHTS_DIR / "resnet_fm.safetensors")
    assert card["exits"][-1]["test_accuracy"] >= 0.92
    from edgesplit.models.datasets import load_sample, to_tensor

    images, labels = load_sample()
    with torch.inference_mode():
        outs = trained_model.forward_exits(to_tensor(images))
    accs = [float((o.argmax(1) == torch.from_numpy(labels).long()).float().mean()) for o in outs]
    assert accs[-1] >= 0.9, accs
    assert accs[0] < accs[-1]
