"""Training writes a NoNN bundle whose manifest carries the partition and its statistics, and
loading verifies the hash and rebuilds members that answer as they did when saved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edgesplit.models.datasets import load_fashion_mnist, to_tensor
from edgesplit.partitioner.nonn.bundle import NonnBundleError, load_ensemble
from edgesplit.partitioner.nonn.partition import Partition
from edgesplit.partitioner.nonn.train import accuracy, random_presence


def test_manifest_records_partition_statistics_sizes_and_training(tiny_nonn):
    m = tiny_nonn.manifest
    partition = Partition.from_dict(m["partition"])
    assert partition == tiny_nonn.partition and partition.method == "enhanced"
    assert [len(p) for p in partition.parts] == [32, 32] and partition.member_part == (0, 1, 0, 1)
    stats = m["statistics"]
    assert stats["filters"] == 64 and stats["images"] == 500
    assert len(stats["graph"]) == 64 and all(len(row) == 64 for row in stats["graph"])
    assert [s["params"] for s in m["student"]["members"]] == [
        sum(p.numel() for p in s.parameters()) for s in tiny_nonn.students]
    assert m["teacher"]["params"] > 10 * m["student"]["members"][0]["params"]
    assert m["training_seconds"] > 0 and len(m["history"]) == 1 and 0 <= m["test_accuracy"] <= 1


def test_loaded_ensemble_reproduces_the_recorded_test_accuracy(tiny_nonn):
    images, labels = load_fashion_mnist("test")
    x, y = to_tensor(images[:300]), torch.from_numpy(labels[:300]).long()
    with torch.no_grad():
        answers = [s(x) for s in tiny_nonn.students]
    assert accuracy(tiny_nonn.aggregator, answers, y) == pytest.approx(tiny_nonn.manifest["test_accuracy"], abs=1e-4)


def test_tampered_or_malformed_bundles_are_refused(tiny_nonn, tmp_path):
    manifest = tiny_nonn.manifest_path
    for suffix in (".json", ".safetensors"):
        shutil.copy(manifest.with_suffix(suffix), tmp_path / f"b{suffix}")
    path = tmp_path / "b.json"
    data = json.loads(path.read_text())
    data["weights"] = "b.safetensors"
    path.write_text(json.dumps(data))
    assert load_ensemble(path).members == 4
    weights = tmp_path / "b.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    with pytest.raises(NonnBundleError, match="sha256"):
        load_ensemble(path)
    path.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(NonnBundleError, match="not a NoNN manifest"):
        load_ensemble(path)
    path.write_text("{not json")
    with pytest.raises(NonnBundleError, match="not valid JSON"):
        load_ensemble(path)
    with pytest.raises(NonnBundleError, match="no NoNN bundle"):
        load_ensemble("no_such_ensemble")


@pytest.mark.parametrize("change, words", [
    # widths and classes were built (gigabytes: 5.3 GB peak for these) before the weights
    # were found not to fit
    (lambda d: {**d, "student": {**d["student"], "widths": [8, 16, 12000]}}, "does not match the weights"),
    (lambda d: {**d, "num_classes": 20_000_000}, "does not match the weights"),
    # the weights file could be named anywhere and was read whole before its hash was checked
    (lambda d: {**d, "weights": "../elsewhere.safetensors"}, "file name beside the manifest"),
])
def test_a_manifest_cannot_make_the_loader_allocate_what_the_weights_do_not_hold(tiny_nonn, tmp_path, change,
                                                                                   words):
    import resource

    manifest = tiny_nonn.manifest_path
    for suffix in (".json", ".safetensors"):
        shutil.copy(manifest.with_suffix(suffix), tmp_path / f"b{suffix}")
    path = tmp_path / "b.json"
    data = {**json.loads(path.read_text()), "weights": "b.safetensors"}
    path.write_text(json.dumps(change(data)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with pytest.raises(NonnBundleError, match=words):
        load_ensemble(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024


def test_loading_some_members_builds_only_those(tiny_nonn):
    one = load_ensemble(tiny_nonn.manifest_path, members=[2])
    assert one.students[2] is not None and one.students[0] is None
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(one.students[2](x), tiny_nonn.students[2](x))
    with pytest.raises(NonnBundleError, match="members 0..3"):
        load_ensemble(tiny_nonn.manifest_path, members=[4])


def test_random_presence_draws_every_failure_count_and_keeps_one_member():
    mask = random_presence(4000, 8, torch.Generator().manual_seed(0))
    present = mask.sum(1)
    assert present.min() == 1 and present.max() == 8
    assert set(present.long().tolist()) == set(range(1, 9))


@pytest.mark.parametrize(("changes", "needle"), [
    ({"members": 1000}, "members must be between 1 and 64"),
    ({"members": 0}, "members must be between 1 and 64"),
    ({"members": 8, "parts": 5}, "8 members need 1 <= parts <= 4"),
    ({"widths": (0, 0, 0)}, "widths must be three channel counts >= 1"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"train_limit": 0}, "train limit must be at least 1"),
])
def test_impossible_recipes_are_refused_before_the_teacher_pass(changes, needle, monkeypatch, tmp_path):
    from edgesplit.partitioner.nonn import train as nonn_train
    from edgesplit.partitioner.nonn.train import NonnRecipe, train_and_save

    def no_teacher_pass(*args, **kwargs):
        raise AssertionError("the teacher pass ran before the recipe was checked")

    monkeypatch.setattr(nonn_train, "prepare", no_teacher_pass)
    with pytest.raises(ValueError, match=needle):
        train_and_save([NonnRecipe(**changes)], tmp_path, progress=False)
