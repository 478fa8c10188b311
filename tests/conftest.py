"""Shared fixtures: the shipped model, and a real node server on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from prometheus_client import CollectorRegistry

from edgesplit.models import load_trained
from edgesplit.runtime.dataplane import DataPlane
from edgesplit.runtime.grpc_server import NodeServer, start_node_server
from edgesplit.runtime.metrics import NodeMetrics

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained_model():
    return load_trained("resnet_fm")


@dataclass
class RunningNode:
    port: int
    plane: DataPlane
    registry: CollectorRegistry
    server: NodeServer
    loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_in_thread(model, **plane_kwargs) -> tuple[RunningNode, threading.Thread]:
    """Run a node server on its own event loop in a daemon thread."""
    registry = CollectorRegistry()
    plane = DataPlane(model, NodeMetrics(registry), **plane_kwargs)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        holder["server"] = loop.run_until_complete(start_node_server(plane, "127.0.0.1", 0))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "node server did not start"
    server = holder["server"]
    return RunningNode(server.port, plane, registry, server, loop), thread


def stop_in_thread(node: RunningNode, thread: threading.Thread) -> None:
    asyncio.run_coroutine_threadsafe(node.server.stop(1.0), node.loop).result(10)
    node.loop.call_soon_threadsafe(node.loop.stop)
    thread.join(10)
    node.plane.close()


@pytest.fixture
def node(trained_model) -> Iterator[RunningNode]:
    running, thread = start_in_thread(trained_model)
    try:
        yield running
    finally:
        stop_in_thread(running, thread)
