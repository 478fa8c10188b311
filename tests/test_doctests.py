"""The runnable examples in module docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "edgesplit.models",
    "edgesplit.models.datasets",
    "edgesplit.models.split_model",
    "edgesplit.partitioner.flops",
    "edgesplit.partitioner.graph",
    "edgesplit.partitioner.cuts",
    "edgesplit.partitioner.profile",
    "edgesplit.partitioner.cost",
    "edgesplit.partitioner.optimise",
    "edgesplit.partitioner.explain",
    "edgesplit.partitioner.bundle",
    "edgesplit.partitioner.nonn",
    "edgesplit.partitioner.nonn.bundle",
    "edgesplit.runtime.codec",
    "edgesplit.runtime.node.dataplane",
    "edgesplit.runtime.device.runner",
    "edgesplit.runtime.metrics",
    "edgesplit.runtime.device.breaker",
    "edgesplit.runtime.inference",
    "edgesplit.runtime.plan",
    "edgesplit.runtime.control.estimators",
    "edgesplit.runtime.control.battery",
    "edgesplit.runtime.control.policy",
    "edgesplit.runtime.metrics_http",
    "edgesplit.runtime.node.registry",
    "edgesplit.runtime.node.settings",
    "edgesplit.runtime.transport.oip",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no runnable example"
    assert result.failed == 0
