"""The runnable examples in module docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "edgesplit.models",
    "edgesplit.models.datasets",
    "edgesplit.models.split_model",
    "edgesplit.partitioner.flops",
    "edgesplit.runtime.codec",
    "edgesplit.runtime.dataplane",
    "edgesplit.runtime.device",
    "edgesplit.runtime.metrics",
    "edgesplit.runtime.resilience",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
