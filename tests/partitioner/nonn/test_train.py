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
    with pytest.raises(NonnBundleError, match="unreadable"):
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
