"""Fashion-MNIST loading: IDX parsing, the shipped sample, and the missing-data error."""

import gzip

import numpy as np
import pytest

from edgesplit.models import datasets
from edgesplit.models.datasets import (
    DatasetNotFoundError,
    load_fashion_mnist,
    load_sample,
    read_idx,
    to_tensor,
    write_idx,
)


def test_shipped_sample_has_100_images_of_each_class():
    images, labels = load_sample()
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [100] * 10


def test_idx_round_trip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)


def test_corrupt_idx_is_rejected(tmp_path):
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") * 3 + b"\x00" * 5)
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "magic").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")


def test_missing_data_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPLIT_DATA", str(tmp_path))
    monkeypatch.setattr(datasets, "DEBIAN_DIR", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as err:
        load_fashion_mnist("test")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "EDGESPLIT_DATA" in str(err.value)


def test_edgesplit_data_folder_is_used(tmp_path, monkeypatch):
    images, labels = load_sample()
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:7])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:7])
    monkeypatch.setenv("EDGESPLIT_DATA", str(tmp_path))
    x, y = load_fashion_mnist("test")
    assert x.shape == (7, 28, 28) and np.array_equal(y, labels[:7])


def test_full_test_set_from_debian_package():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)


def test_to_tensor_normalises():
    x = to_tensor(np.full((2, 28, 28), 255, dtype=np.uint8))
    assert x.shape == (2, 1, 28, 28)
    assert abs(float(x[0, 0, 0, 0]) - (1 - datasets.MEAN) / datasets.STD) < 1e-6


def test_an_explicit_root_without_the_dataset_is_an_error_not_a_fall_back(tmp_path, monkeypatch):
    images, labels = load_sample()
    fallback = tmp_path / "fallback"
    fallback.mkdir()
    write_idx(fallback / "t10k-images-idx3-ubyte.gz", images[:7])
    write_idx(fallback / "t10k-labels-idx1-ubyte.gz", labels[:7])
    monkeypatch.setenv("EDGESPLIT_DATA", str(fallback))
    monkeypatch.setattr(datasets, "DEBIAN_DIR", fallback)
    (tmp_path / "empty").mkdir()
    for root, why in ((tmp_path / "empty", "does not hold"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(DatasetNotFoundError, match=why) as err:
            load_fashion_mnist("test", root)
        assert str(root) in str(err.value)
    assert len(load_fashion_mnist("test")[1]) == 7  # without a root, $EDGESPLIT_DATA
    monkeypatch.setenv("EDGESPLIT_DATA", str(tmp_path / "empty"))  # set but wrong: no fall-back either
    with pytest.raises(DatasetNotFoundError, match=r"does not hold .* in \$EDGESPLIT_DATA"):
        load_fashion_mnist("test")
    monkeypatch.delenv("EDGESPLIT_DATA")
    assert len(load_fashion_mnist("test")[1]) == 7  # neither: the Debian folder
