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
