"""A node serving the shipped ``resnet_fm`` for the controller tests in this folder."""

import pytest

from edgesplit.models import load_trained
from tests.helpers import start_in_thread, stop_in_thread


@pytest.fixture(scope="module")
def node():
    model = load_trained("resnet_fm")
    running, thread = start_in_thread(model, workers=1)
    yield model, running
    stop_in_thread(running, thread)
