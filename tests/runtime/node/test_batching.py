"""Dynamic batching: concurrent requests share batches, answers go back to their callers,
mixed codecs batch together, one bad request fails alone, expired and abandoned requests
never run, limits hold, and an idle node never waits."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from edgesplit.runtime.codec import encode
from edgesplit.runtime.inference import InferError, InferInput, InferRequest
from edgesplit.runtime.metrics import NodeMetrics
from edgesplit.runtime.node.dataplane import DataPlane
from edgesplit.runtime.node.registry import BatchingConfig
from tests.helpers import gated_model, registry_of, wait_for


def request(tensor: torch.Tensor, codec: str = "fp32", timeout_s: float | None = None) -> InferRequest:
    enc = encode(tensor, codec)
    return InferRequest("echo", [InferInput("input", enc.datatype, enc.shape, enc.data, enc.params)],
                        timeout_s=timeout_s)


def values(result) -> np.ndarray:
    return np.frombuffer(result.outputs[0].data, dtype="<f4").reshape(result.outputs[0].shape)


def with_plane(coro_fn, batching: BatchingConfig | None = None, workers: int = 1, **kw):
    model, gate = gated_model()
    registry = registry_of(model, batching=batching or BatchingConfig(preferred_batch=4, max_batch=8,
                                                                        max_delay_s=0.0))
    prom = CollectorRegistry()

    async def main():
        plane = DataPlane(registry, NodeMetrics(prom), workers=workers, **kw)
        try:
            return await coro_fn(plane, gate)
        finally:
            gate.release.set()
            await plane.aclose()

    return asyncio.run(main()), gate, registry, prom


async def occupy(plane, gate):
    """Start one request and wait until it holds the only worker."""
    task = asyncio.ensure_future(plane.infer(request(torch.full((1, 4), -1.0))))
    await wait_for(gate.entered.is_set, 10, "the first batch to start")
    return task


def test_requests_queued_behind_a_busy_worker_run_as_one_batch_and_get_their_own_rows():
    async def go(plane, gate):
        first = await occupy(plane, gate)
        tasks = [asyncio.ensure_future(plane.infer(request(torch.full((1, 4), float(i))))) for i in range(5)]
        await wait_for(lambda: plane.inflight == 6, 10, "five requests queued")
        gate.release.set()
        results = await asyncio.gather(*tasks)
        await first
        return results

    results, gate, registry, prom = with_plane(go)
    assert gate.rows == [1, 5]
    for i, r in enumerate(results):
        assert values(r).tolist() == [[float(i)] * 4] and r.batch_size == 5
    stats = registry.get("echo").stats
    assert stats.batches == 2 and stats.rows == 6 and stats.mean_batch == 3.0
    assert prom.get_sample_value("edgesplit_node_batch_size_count", {"model": "echo"}) == 2
    assert prom.get_sample_value("edgesplit_node_batch_size_sum", {"model": "echo"}) == 6
    assert prom.get_sample_value("edgesplit_node_queue_wait_seconds_count", {"model": "echo"}) == 6


def test_mixed_codecs_are_decoded_separately_then_stacked():
    rows = [torch.tensor([[0.5, -1.0, 2.0, 0.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
            torch.tensor([[-3.0, 0.25, 0.0, 1.0]])]

    async def go(plane, gate):
        first = await occupy(plane, gate)
        tasks = [asyncio.ensure_future(plane.infer(request(x, codec)))
                 for x, codec in zip(rows, ("fp32", "fp16", "int8-channel"))]
        await wait_for(lambda: plane.inflight == 4, 10, "three requests queued")
        gate.release.set()
        await first
        return await asyncio.gather(*tasks)

    results, gate, _, _ = with_plane(go)
    assert gate.rows == [1, 3]
    for x, r, tol in zip(rows, results, (0, 1e-3, 0.03)):
        assert np.abs(values(r) - x.numpy()).max() <= tol


def test_one_bad_request_fails_alone_in_its_batch():
    async def go(plane, gate):
        first = await occupy(plane, gate)
        bad = request(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))  # passes the shape checks, fails decoding
        tasks = [asyncio.ensure_future(plane.infer(r)) for r in (request(torch.ones(1, 4)), bad,
                                                                  request(torch.zeros(1, 4)))]
        await wait_for(lambda: plane.inflight == 4, 10, "three requests queued")
        gate.release.set()
        await first
        return await asyncio.gather(*tasks, return_exceptions=True)

    (ok1, bad, ok2), gate, _, _ = with_plane(go)
    assert isinstance(bad, InferError) and bad.code == InferError.INVALID_ARGUMENT
    assert values(ok1).tolist() == [[1.0] * 4] and values(ok2).tolist() == [[0.0] * 4]
    assert gate.rows == [1, 2]


def test_an_expired_request_is_answered_deadline_exceeded_and_never_run():
    async def go(plane, gate):
        first = await occupy(plane, gate)
        late = asyncio.ensure_future(plane.infer(request(torch.ones(1, 4), timeout_s=0.01)))
        fresh = asyncio.ensure_future(plane.infer(request(torch.zeros(1, 4), timeout_s=30)))
        await wait_for(lambda: plane.inflight == 3, 10, "two requests queued")
        await asyncio.sleep(0.05)  # past the late request's deadline (a condition on time itself)
        gate.release.set()
        await first
        return await asyncio.gather(late, fresh, return_exceptions=True)

    (late, fresh), gate, _, _ = with_plane(go)
    assert isinstance(late, InferError) and late.code == InferError.DEADLINE_EXCEEDED and "not run" in late.message
    assert values(fresh).tolist() == [[0.0] * 4]
    assert gate.rows == [1, 1], "the expired request never reached the model"


def test_a_caller_that_leaves_is_dropped_from_the_queue():
    async def go(plane, gate):
        first = await occupy(plane, gate)
        leaving = asyncio.ensure_future(plane.infer(request(torch.ones(1, 4))))
        staying = asyncio.ensure_future(plane.infer(request(torch.zeros(1, 4))))
        await wait_for(lambda: plane.inflight == 3, 10, "two requests queued")
        leaving.cancel()
        await wait_for(lambda: plane.inflight == 2, 10, "the cancelled request to leave")
        gate.release.set()
        await first
        return await staying

    staying, gate, _, _ = with_plane(go)
    assert values(staying).tolist() == [[0.0] * 4] and gate.rows == [1, 1]


def test_max_batch_bounds_every_batch_and_disabled_batching_runs_one_request_each():
    async def go(plane, gate):
        first = await occupy(plane, gate)
        tasks = [asyncio.ensure_future(plane.infer(request(torch.full((2, 4), float(i))))) for i in range(7)]
        await wait_for(lambda: plane.inflight == 8, 10, "seven requests queued")
        gate.release.set()
        await first
        return await asyncio.gather(*tasks)

    results, gate, _, _ = with_plane(go, BatchingConfig(preferred_batch=2, max_batch=5, max_delay_s=0))
    assert gate.rows[0] == 1 and all(r <= 5 for r in gate.rows) and sum(gate.rows) == 15
    assert [values(r)[0, 0] for r in results] == [float(i) for i in range(7)]
    _, gate, _, _ = with_plane(go, BatchingConfig(enabled=False, preferred_batch=1, max_batch=8))
    assert gate.rows == [1] + [2] * 7


def test_an_idle_node_does_not_wait_for_a_fuller_batch():
    async def go(plane, gate):
        gate.release.set()
        started = time.perf_counter()
        await plane.infer(request(torch.ones(1, 4)))
        return time.perf_counter() - started

    # A delay of 1 s for 64 rows: an idle node must not wait for them.
    elapsed, gate, _, _ = with_plane(go, BatchingConfig(preferred_batch=64, max_batch=64, max_delay_s=1.0),
                                     workers=2)
    assert elapsed < 0.5 and gate.rows == [1]


def test_batch_config_is_checked():
    with pytest.raises(ValueError, match="preferred_batch"):
        BatchingConfig(preferred_batch=10, max_batch=4)
    with pytest.raises(ValueError, match="max_delay_s"):
        BatchingConfig(max_delay_s=5)


def test_callers_that_leave_free_their_place_and_payload_at_once():
    """Review finding: a cancelled request stopped counting toward max_inflight but stayed
    queued with its payload until a worker reached it, so send-and-cancel grew the queue."""
    async def go(plane, gate):
        first = await occupy(plane, gate)
        queue = plane._queues["echo"]
        for _ in range(50):
            task = asyncio.ensure_future(plane.infer(request(torch.ones(1, 4))))
            await wait_for(lambda: len(queue) == 1, 5, "the request to be queued")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert len(queue) == 0 and plane.inflight == 1
        gate.release.set()
        await first
        return plane.inflight

    inflight, gate, _, _ = with_plane(go, max_inflight=2)
    assert inflight == 0 and gate.rows == [1]


def test_requests_whose_outputs_overflow_are_refused_and_the_rest_of_the_batch_answered():
    # Finite inputs can overflow inside the model (an int8 input at a scale of 1e36 did):
    # NaN logits answered OK would be read as a prediction by a client that does not check.
    from torch import nn

    from edgesplit.models.split_model import SplitModel
    from edgesplit.runtime.node.batching import execute_batch

    lin = nn.Linear(4, 2, bias=False)
    lin.weight.data = torch.tensor([[1e30, -1e30, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    registry = registry_of(SplitModel("overflow", [("lin", lin)], {}, (4,), 2).eval())
    served = registry.get("overflow")

    def req(row):
        enc = encode(torch.tensor([row]), "fp32")
        return InferRequest("overflow", [InferInput("input", enc.datatype, enc.shape, enc.data, enc.params)])

    outcome = execute_batch(served, [req([1.0, 1.0, 0.0, 0.0]), req([1e10, 1e10, 0.0, 0.0])], 1 << 20)
    good, bad = outcome.answers
    # inputs far beyond what a model handles: the caller's doing, not counted against the node
    assert isinstance(bad, InferError) and bad.code == InferError.INVALID_ARGUMENT and "NaN or Inf" in bad.message
    assert np.frombuffer(good.outputs[0].data, dtype="<f4").tolist() == [0.0, 2.0]
    # NaN from ordinary inputs: the model is broken (devices fail over from INTERNAL)
    lin.weight.data[1] = float("nan")
    broken = execute_batch(served, [req([1.0, 1.0, 0.0, 0.0])], 1 << 20).answers[0]
    assert isinstance(broken, InferError) and broken.code == InferError.INTERNAL and "broken" in broken.message


def test_with_one_worker_process_a_queue_runs_in_it_and_only_an_idle_node_runs_in_process():
    from edgesplit.runtime.node.workers import ProcessWorkers

    model, gate = gated_model()
    registry = registry_of(model, batching=BatchingConfig(preferred_batch=4, max_batch=64, max_delay_s=0.0))
    gate.release.set()  # the forked worker's copy of the gate stays open: only this process's batches wait
    executor = ProcessWorkers(registry, workers=1, threads=1, max_elements=1 << 20)
    gate.release.clear()

    async def main():
        plane = DataPlane(registry, NodeMetrics(CollectorRegistry()), executor=executor)
        try:
            first = await occupy(plane, gate)  # an idle node: runs on a thread of this process
            tasks = [asyncio.ensure_future(plane.infer(request(torch.full((1, 4), float(i))))) for i in range(5)]
            await wait_for(lambda: plane.inflight == 6, 10, "five requests queued")
            gate.release.set()
            await first
            return await asyncio.gather(*tasks)
        finally:
            gate.release.set()
            await plane.aclose()

    results = asyncio.run(main())
    for i, r in enumerate(results):
        assert values(r).tolist() == [[float(i)] * 4]
    # the batch taken from the queue (all five, the queue then empty) went to the worker
    # process; before, one worker's process never ran anything: every batch that found no
    # other one running ran on the node's own thread, beside the event loop
    assert (executor.local_batches, executor.process_batches) == (1, 1)
    assert gate.rows == [1]  # only the request that found the node idle passed this process's gate
