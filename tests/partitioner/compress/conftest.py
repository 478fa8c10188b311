"""Small data for the compression tests: a few hundred Fashion-MNIST images per split."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesplit.partitioner.compress.data import load_splits


@pytest.fixture(scope="session")
def tiny_splits():
    return load_splits(validation=300, train_limit=1500, test_limit=400)


COMMITTED = Path(__file__).resolve().parents[3] / "partitioner" / "compress" / "weights"


@pytest.fixture
def tampered_bundle(tmp_path):
    """Copy a committed bundle, let ``edit(manifest, folder)`` change it, and rehash its files so
    the copy passes ``load_bundle``'s hash check: only what the edit changed is wrong."""
    import json
    import shutil

    from edgesplit.models.weights_io import sha256_file

    def make(name: str, edit) -> Path:
        out = tmp_path / name
        shutil.copytree(COMMITTED / name, out)
        manifest = json.loads((out / "manifest.json").read_text())
        edit(manifest, out)
        manifest["files"] = {f: sha256_file(out / f) for f in manifest["files"] if (out / f).is_file()}
        (out / "manifest.json").write_text(json.dumps(manifest))
        return out

    return make
