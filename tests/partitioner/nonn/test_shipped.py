"""The committed NoNN ensembles: hashes verified, partitions reproducible from the statistics
in their manifests, balanced where they should be, and trained (accuracy on the shipped sample)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgesplit.models.datasets import load_sample, to_tensor
from edgesplit.partitioner.nonn.bundle import load_ensemble, shipped_ensembles
from edgesplit.partitioner.nonn.partition import build_partition

REQUIRED = {f"nonn_resnet_fm_s{s}_{m}" for s in (4, 8) for m in ("original", "enhanced")}


def test_the_four_ensembles_of_the_benchmark_are_committed():
    assert REQUIRED <= set(shipped_ensembles())


@pytest.mark.parametrize("name", shipped_ensembles())
def test_shipped_partition_is_reproducible_from_its_statistics(name):
    ensemble = load_ensemble(name)
    m = ensemble.manifest
    graph = np.array(m["statistics"]["graph"])
    parts = len(ensemble.partition.parts) if ensemble.partition.method == "enhanced" else None
    rebuilt = build_partition(ensemble.partition.method, graph, ensemble.members, parts, ensemble.partition.seed)
    assert rebuilt == ensemble.partition
    sizes = [len(p) for p in ensemble.partition.parts]
    if ensemble.partition.method == "enhanced":
        assert max(sizes) - min(sizes) <= 1 and len(sizes) == ensemble.members // 2
        assert ensemble.partition.member_part == tuple(i % len(sizes) for i in range(ensemble.members))
    else:
        assert len(sizes) == ensemble.members


@pytest.mark.parametrize("name", shipped_ensembles())
def test_shipped_ensemble_is_trained(name):
    ensemble = load_ensemble(name)
    images, labels = load_sample()
    with torch.no_grad():
        logits = ensemble.aggregator.combine({i: s(to_tensor(images)) for i, s in enumerate(ensemble.students)})
    accuracy = float((logits.argmax(1) == torch.from_numpy(labels).long()).float().mean())
    assert accuracy > 0.88, f"{name}: {accuracy:.3f} on the shipped sample"
    assert ensemble.manifest["training_seconds"] > 0 and ensemble.manifest["test_accuracy"] > 0.88


def test_a_manifest_that_is_not_a_small_regular_file_is_refused_unread(tmp_path):
    import os

    from edgesplit.partitioner.nonn.bundle import NonnBundleError

    os.symlink("/dev/zero", tmp_path / "zero.json")  # read whole, it filled the node's memory
    os.mkfifo(tmp_path / "fifo.json")  # read, it blocked the node for good
    for name in ("zero.json", "fifo.json"):
        with pytest.raises(NonnBundleError, match="not a regular file"):
            load_ensemble(tmp_path / name)


@pytest.mark.parametrize("edit, message", [
    # another partition of the same shape: it loaded and classified at 10 % instead of 93 %
    (lambda m: m["partition"]["parts"].reverse(), "its partition is not the one its weights were trained with"),
    (lambda m: m["statistics"]["pooled_std"].__setitem__(0, 1e-9), "its statistics is not the one"),
    (lambda m: m["statistics"].update(pooled_mean=m["statistics"]["pooled_mean"][:-1]), "pooled_mean must be"),
    (lambda m: m["statistics"]["pooled_std"].__setitem__(0, float("nan")), "pooled_std must be"),
    (lambda m: m.update(statistics=[]), "'statistics' must be an object"),
    (lambda m: m.update(input_shape=[3, 28, 28]), "input_shape must be"),
    (lambda m: m.update(input_shape="abc"), "input_shape must be"),
])
def test_a_manifest_that_disagrees_with_its_weights_is_refused(tmp_path, edit, message):
    import json
    import shutil

    from edgesplit.partitioner.nonn.bundle import NonnBundleError, _manifest_path

    name = "nonn_resnet_fm_s4_enhanced"
    source = _manifest_path(name)
    manifest = json.loads(source.read_text())
    shutil.copy(source.parent / manifest["weights"], tmp_path / manifest["weights"])
    edit(manifest)
    (tmp_path / f"{name}.json").write_text(json.dumps(manifest))
    with pytest.raises(NonnBundleError, match=message):
        load_ensemble(tmp_path / f"{name}.json")
