"""Test helpers: real node servers on ephemeral ports, request builders, bounded waits, and
threads that hand their exceptions back to the test."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from edgesplit.models.split_model import SplitModel
from edgesplit.protos import inference_pb2
from edgesplit.runtime.codec import encode
from edgesplit.runtime.metrics import NodeMetrics
from edgesplit.runtime.node.dataplane import DataPlane
from edgesplit.runtime.node.registry import BatchingConfig, ModelRegistry, register_split_model
from edgesplit.runtime.node.servicer import NodeServer, start_node_server
from edgesplit.runtime.transport.oip import set_parameter


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy; fail the test if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class CheckedThread(threading.Thread):
    """A thread whose exception (or result) comes back to the test at :meth:`result`."""

    def __init__(self, target: Callable[[], object], name: str | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self._result: object = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self._target_fn()
        except BaseException as exc:  # handed to the test
            self._error = exc

    def result(self, timeout: float = 30.0) -> object:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"thread {self.name} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


def infer_request(model_name, tensor, codec="fp32", **overrides):
    """A ModelInferRequest with one input named ``input`` (override datatype, shape, data, name)."""
    enc = encode(tensor, codec)
    req = inference_pb2.ModelInferRequest(model_name=model_name, id="r1")
    inp = req.inputs.add(
        name=overrides.get("name", "input"), datatype=overrides.get("datatype", enc.datatype),
        shape=list(overrides.get("shape", enc.shape)),
    )
    for k, v in enc.params.items():
        set_parameter(inp.parameters[k], v)
    req.raw_input_contents.append(overrides.get("data", enc.data))
    return req


def tiny_model(name: str = "tiny") -> SplitModel:
    torch.manual_seed(0)
    return SplitModel(name, [("fc1", nn.Linear(4, 8)), ("relu", nn.ReLU()), ("fc2", nn.Linear(8, 3))], {}, (4,), 3)


def registry_of(*models: SplitModel, batching: BatchingConfig | None = None) -> ModelRegistry:
    registry = ModelRegistry()
    for model in models:
        register_split_model(registry, model, batching)
    return registry


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

    def call(self, coro, timeout: float = 10.0):
        """Run a coroutine on the node's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def start_in_thread(model, batching: BatchingConfig | None = None, server_kwargs: dict | None = None,
                    **plane_kwargs) -> tuple[RunningNode, threading.Thread]:
    """Run a node server (a split model, or a ready registry) on its own event loop in a thread."""
    registry = model if isinstance(model, ModelRegistry) else registry_of(model, batching=batching)
    prom = CollectorRegistry()
    plane = DataPlane(registry, NodeMetrics(prom), **plane_kwargs)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            kwargs = {"host": "127.0.0.1", "port": 0, **(server_kwargs or {})}
            holder["server"] = loop.run_until_complete(start_node_server(plane, **kwargs))
        except BaseException as exc:
            holder["error"] = exc
        finally:
            started.set()
        if "server" in holder:
            loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "node server did not start"
    if "error" in holder:
        raise holder["error"]
    server = holder["server"]
    return RunningNode(server.port, plane, prom, server, loop), thread


def stop_in_thread(node: RunningNode, thread: threading.Thread, grace: float = 1.0) -> None:
    async def stop() -> None:
        await node.server.stop(grace)
        await node.plane.aclose()

    asyncio.run_coroutine_threadsafe(stop(), node.loop).result(30)
    node.loop.call_soon_threadsafe(node.loop.stop)
    thread.join(10)
    assert not thread.is_alive(), "node thread did not stop"


class Gate(nn.Module):
    """A block that holds each batch until the test releases it, and records batch sizes.

    ``entered`` is set when a batch arrives; ``release`` lets every held batch through.
    It waits at most ``limit_s`` so a broken test cannot hang.
    """

    def __init__(self, limit_s: float = 20.0) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.limit_s = limit_s
        self.rows: list[int] = []

    def forward(self, x):
        self.rows.append(int(x.shape[0]))
        self.entered.set()
        if not self.release.wait(self.limit_s):
            raise TimeoutError("the gate was never released")
        return x


def gated_model(name: str = "echo", width: int = 4) -> tuple[SplitModel, Gate]:
    """An identity model (the answer is the input) behind a :class:`Gate`."""
    gate = Gate()
    model = SplitModel(name, [("gate", gate), ("id", nn.Identity())], {}, (width,), width)
    gate.release.set()
    model.cut_points()  # traced once, through the open gate
    gate.release.clear()
    gate.entered.clear()
    gate.rows.clear()
    return model, gate


async def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Like :func:`wait_until`, inside a coroutine (the loop keeps running)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)
