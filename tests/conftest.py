"""Shared fixtures: the shipped model, and a real node server on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from edgesplit.models import load_trained

from .helpers import RunningNode, start_in_thread, stop_in_thread

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_model():
    return load_trained("resnet_fm")


@pytest.fixture
def node(trained_model) -> Iterator[RunningNode]:
    running, thread = start_in_thread(trained_model)
    try:
        yield running
    finally:
        stop_in_thread(running, thread)


@pytest.fixture(scope="session")
def tiny_nonn(tmp_path_factory, trained_model):
    """A NoNN bundle (4 members, enhanced) trained for one epoch on 600 images: seconds, not minutes."""
    from edgesplit.partitioner.nonn.bundle import load_ensemble
    from edgesplit.partitioner.nonn.train import NonnRecipe, prepare, train_and_save

    out = tmp_path_factory.mktemp("nonn")
    data = prepare(validation=100, train_limit=600, test_limit=300, progress=False, teacher=trained_model)
    recipe = NonnRecipe(members=4, method="enhanced", widths=(2, 4, 4), epochs=1, validation=100, train_limit=600)
    manifest = train_and_save([recipe], out, data=data, progress=False)[0]
    return load_ensemble(out / f"{manifest['name']}.json")
