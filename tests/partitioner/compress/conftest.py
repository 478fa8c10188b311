"""Small data for the compression tests: a few hundred Fashion-MNIST images per split."""

from __future__ import annotations

import pytest

from edgesplit.partitioner.compress.data import load_splits


@pytest.fixture(scope="session")
def tiny_splits():
    return load_splits(validation=300, train_limit=1500, test_limit=400)
