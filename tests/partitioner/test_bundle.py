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
