"""Bundles: written without pickle, loaded with every hash checked; tampering is refused with
a message naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from edgesplit.models import load_trained
from edgesplit.partitioner.bundle import MANIFEST, WEIGHTS, BundleError, load_bundle, write_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    write_bundle(load_trained("resnet_fm"), out)
    return out


def test_a_bundle_round_trips_and_holds_no_pickle(bundle_dir):
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    assert manifest["schema"] == 1 and manifest["model"] == "resnet_fm" and manifest["total_macs"] == 31_021_952
    assert {"index", "crossing", "shapes", "dtypes", "bytes", "head_macs"} <= set(manifest["cuts"][5])
    assert max(len(c["crossing"]) for c in manifest["cuts"]) >= 2
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), load_trained("resnet_fm")(x))
    for f in bundle_dir.iterdir():  # no pickle anywhere: no pickle protocol header in any file
        assert not f.read_bytes().startswith(b"\x80"), f
    # the weights readable as the manifest is (safetensors' save_file made them 0600: a node
    # running as another user could not load the bundle)
    modes = {f.name: f.stat().st_mode & 0o777 for f in bundle_dir.iterdir()}
    assert modes[WEIGHTS] == modes[MANIFEST], modes


def test_tampered_weights_or_manifest_are_refused(bundle_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    data = bytearray((bad / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (bad / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="weights.safetensors: sha256 .* refusing"):
        load_bundle(bad)
    shutil.copytree(bundle_dir, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / MANIFEST).read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (tmp_path / "m" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not a plain file name"):
        load_bundle(tmp_path / "m")
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(tmp_path)


@pytest.mark.parametrize("change", [
    lambda m: [m], lambda m: None, lambda m: {**m, "files": list(m["files"])},
    lambda m: {**m, "files": {k: 7 for k in m["files"]}}, lambda m: {**m, "model": ["resnet_fm"]},
    lambda m: {**m, "schema": True}, lambda m: {**m, "name": ""}, lambda m: {**m, "name": {"a": 1}},
    lambda m: {**m, "name": "x" * 5000},
])
def test_a_manifest_of_the_wrong_shape_is_a_bundle_error_not_a_traceback(bundle_dir, tmp_path, change):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    (bad / MANIFEST).write_text(json.dumps(change(json.loads((bad / MANIFEST).read_text()))))
    with pytest.raises(BundleError):
        load_bundle(bad)


@pytest.mark.parametrize("kind", ["sparse", "dev-zero", "fifo"])
def test_a_bundle_file_larger_than_the_model_or_not_regular_is_refused_unread(bundle_dir, tmp_path, kind):
    """The weights were read whole before their hash was compared: a 3 GiB sparse file took
    16 s and 3.3 GB before the refusal (a 30 GiB one would have filled this machine)."""
    import os
    import shutil
    import tracemalloc

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    weights = bad / WEIGHTS
    weights.unlink()
    if kind == "sparse":
        with open(weights, "wb") as f:
            f.truncate(3 << 30)  # 3 GiB of holes: nothing written to disk
    elif kind == "dev-zero":
        weights.symlink_to("/dev/zero")
    else:
        os.mkfifo(weights)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="over the .* allowed|not a regular file|not a plain file name"):
            load_bundle(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak  # refused unread: the 3 GiB file was read whole before


def test_weights_with_nan_are_refused_and_a_misfit_names_the_tensor(tmp_path):
    from edgesplit.models import build_model
    from edgesplit.models.weights_io import save_weights

    model = load_trained("resnet_fm")
    with torch.no_grad():
        model.blocks[3].conv1.weight[0, 0, 0, 0] = float("nan")
    write_bundle(model, tmp_path / "nan")  # hashed as written: only the values are wrong
    with pytest.raises(BundleError, match="holds NaN or Inf values"):
        load_bundle(tmp_path / "nan")
    write_bundle(load_trained("resnet_fm"), tmp_path / "misfit")
    other = build_model("mobilenet_v2")
    save_weights(other, tmp_path / "misfit" / WEIGHTS)
    manifest = json.loads((tmp_path / "misfit" / MANIFEST).read_text())
    from edgesplit.models.weights_io import sha256_file

    manifest["files"][WEIGHTS] = sha256_file(tmp_path / "misfit" / WEIGHTS)
    (tmp_path / "misfit" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"does not fit the model the manifest describes: (Missing|Unexpected) key"):
        load_bundle(tmp_path / "misfit")


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "deep", "huge"])
def test_a_manifest_that_is_not_a_small_regular_json_file_is_refused_unread(bundle_dir, tmp_path, kind):
    import os
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    manifest = bad / MANIFEST
    manifest.unlink()
    if kind == "dev-zero":  # read whole, it filled memory until the node died
        manifest.symlink_to("/dev/zero")
    elif kind == "fifo":  # read, it blocked the node for good
        os.mkfifo(manifest)
    elif kind == "directory":
        manifest.mkdir()
    elif kind == "deep":
        manifest.write_text("[" * 200_000)
    else:
        with open(manifest, "wb") as f:
            f.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of zeros, nothing written
    with pytest.raises(BundleError, match="refusing to load"):
        load_bundle(bad)


def test_the_weights_loaded_are_the_bytes_that_were_hashed(bundle_dir, tmp_path, monkeypatch):
    """The weights file was hashed, then reopened by name to load: a file swapped in between
    was served under the manifest's hash."""
    import shutil

    from edgesplit.models import build_model
    from edgesplit.models.weights_io import save_weights
    from edgesplit.partitioner import bundle as bundle_module

    copy = tmp_path / "b"
    shutil.copytree(bundle_dir, copy)
    swapped = []

    load_bytes = bundle_module.load_safetensors_bytes

    def swap_then_load(data):  # runs between the hash check and the load: a concurrent writer
        save_weights(build_model("resnet_fm"), copy / WEIGHTS)  # untrained weights in place of the hashed ones
        swapped.append(True)
        return load_bytes(data)

    monkeypatch.setattr(bundle_module, "load_safetensors_bytes", swap_then_load)
    loaded = load_bundle(copy)
    assert swapped
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), load_trained("resnet_fm")(x))


def test_a_pruned_bundle_records_its_shapes_and_a_hostile_record_is_refused(trained_model, tmp_path):
    from edgesplit.partitioner.compress.prune import prune_to

    pruned = prune_to(trained_model, 0.7)
    pruned.name = "resnet_fm_pruned"
    manifest = write_bundle(pruned, tmp_path / "p", base="resnet_fm")
    assert manifest["model"] == "resnet_fm" and manifest["name"] == "resnet_fm_pruned"
    loaded = load_bundle(tmp_path / "p").model
    x = torch.randn(2, 1, 28, 28)
    assert loaded.name == "resnet_fm_pruned" and torch.equal(loaded(x), pruned.eval()(x))
    hostile = dict(manifest)
    hostile["architecture"] = {**manifest["architecture"],
                               "blocks.1.conv1": {"type": "Conv2d", "in": 16, "out": 1 << 30}}
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(hostile))
    with pytest.raises(BundleError, match="architecture record"):
        load_bundle(tmp_path / "p")
    hostile["architecture"] = manifest["architecture"]
    for cuts in ([99], [4.9], "4", [True]):  # 4.9 was taken as cut 4
        hostile["exit_cuts"] = cuts
        (tmp_path / "p" / MANIFEST).write_text(json.dumps(hostile))
        with pytest.raises(BundleError, match="architecture record"):
            load_bundle(tmp_path / "p")
    hostile["exit_cuts"] = manifest["exit_cuts"]
    hostile["architecture"] = [manifest["architecture"]]  # a list: it was an AttributeError traceback
    (tmp_path / "p" / MANIFEST).write_text(json.dumps(hostile))
    with pytest.raises(BundleError, match="architecture record"):
        load_bundle(tmp_path / "p")
