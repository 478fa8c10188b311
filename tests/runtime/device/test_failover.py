"""Failover across nodes: retries on UNAVAILABLE / RESOURCE_EXHAUSTED and on one node's own
refusals (token, model), never on a spent deadline or a bad request; deadlines derived from a
latency target."""

from __future__ import annotations

import socket

import pytest
import torch

from edgesplit.runtime.codec import encode
from edgesplit.runtime.device.breaker import CircuitBreaker
from edgesplit.runtime.device.failover import FailoverClient
from edgesplit.runtime.device.runner import WHERE_EDGE, DeviceRunner
from edgesplit.runtime.transport.client import EdgeClient, OffloadError
from tests.helpers import CheckedThread, gated_model, start_in_thread, stop_in_thread, wait_until


@pytest.fixture
def slow_nodes():
    """Two one-request nodes whose model holds each batch until its gate is released (open
    unless a test closes it), so "busy" and "too slow" never depend on the clock."""
    started = []
    for _ in range(2):
        model, gate = gated_model("slow")
        gate.release.set()
        node, thread = start_in_thread(model, max_inflight=1)
        node.gate = gate
        started.append((node, thread))
    yield [n for n, _ in started]
    for n, t in started:
        n.gate.release.set()
        stop_in_thread(n, t)


def dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


X = encode(torch.ones(1, 4), "fp32")


def test_unavailable_node_fails_over_and_its_breaker_opens(slow_nodes):
    client = FailoverClient([EdgeClient(dead_address()), EdgeClient(slow_nodes[0].address)], failure_threshold=2,
                            reset_seconds=60)
    dead, alive = client.targets
    assert client.infer("slow", X, timeout=5).logits.shape == (1, 4)
    assert client.attempts == {dead: 1, alive: 1}
    assert client.breakers[0].state == CircuitBreaker.CLOSED, "one failure of two: still closed"
    for _ in range(3):
        assert client.infer("slow", X, timeout=5).logits.shape == (1, 4)
    assert client.attempts == {dead: 1, alive: 4}, "the preferred node switched after the first failover"
    # Back to the dead node first: its second failure opens its breaker, which then keeps it out.
    client._preferred = 0
    client.infer("slow", X, timeout=5)
    assert client.breakers[0].state == CircuitBreaker.OPEN and client.attempts[dead] == 2
    client._preferred = 0
    client.infer("slow", X, timeout=5)
    assert client.attempts == {dead: 2, alive: 6}, "an open breaker is skipped without a call"
    client.close()


def test_resource_exhausted_goes_to_the_next_node(slow_nodes):
    a, b = slow_nodes
    a.gate.release.clear()  # a holds its one request until the test lets it go
    client = FailoverClient([EdgeClient(a.address), EdgeClient(b.address)])
    other = EdgeClient(a.address)
    occupy = CheckedThread(lambda: other.infer("slow", X, timeout=30), name="occupy")
    occupy.start()
    wait_until(lambda: a.plane.inflight == 1, 5, "node a to be full")
    client.infer("slow", X, timeout=5)
    a.gate.release.set()
    occupy.result(10)
    other.close()
    assert client.attempts == {a.address: 1, b.address: 1}
    assert client.breakers[0].state == "closed", "a full node is alive: no failure counted"
    client.close()


def test_spent_deadline_is_not_retried(slow_nodes):
    a, b = slow_nodes
    a.gate.release.clear()  # a never answers within the deadline
    client = FailoverClient([EdgeClient(a.address), EdgeClient(b.address)])
    with pytest.raises(OffloadError) as err:
        client.infer("slow", X, timeout=0.1)
    assert err.value.reason == "DEADLINE_EXCEEDED"
    assert client.attempts[b.address] == 0
    client.close()


class AnswersNaN(torch.nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_a_node_answering_nan_counts_as_failing_and_the_next_node_answers(slow_nodes):
    """A node with corrupted weights answers NaN to everything: it was taken as healthy (its
    breaker never opened) and the healthy node was never tried."""
    from edgesplit.models.split_model import SplitModel

    good = slow_nodes[1]
    broken, thread = start_in_thread(SplitModel("slow", [("nan", AnswersNaN())], {}, (4,), 4))
    client = FailoverClient([EdgeClient(broken.address), EdgeClient(good.address)],
                            breakers=[CircuitBreaker(1, 60.0), CircuitBreaker(1, 60.0)])
    try:
        result = client.infer("slow", X, timeout=10)
        assert torch.equal(result.logits, torch.ones(1, 4))  # the good node's identity answer
        assert client.attempts == {broken.address: 1, good.address: 1}
        assert client.breakers[0].state == CircuitBreaker.OPEN  # counted as a failure
    finally:
        client.close()
        stop_in_thread(broken, thread)


class AnswersTooNarrow(torch.nn.Module):
    def forward(self, x):
        return x[:, :2]


def test_a_node_answering_the_wrong_shape_counts_as_failing_and_the_next_node_answers(slow_nodes):
    """A node answering [1, 2] logits for a 4-class model was taken as healthy: its answer was
    used (a wrong prediction) or made the device runner raise."""
    from edgesplit.models.split_model import SplitModel

    good = slow_nodes[1]
    broken, thread = start_in_thread(SplitModel("slow", [("narrow", AnswersTooNarrow())], {}, (4,), 4))
    client = FailoverClient([EdgeClient(broken.address), EdgeClient(good.address)],
                            breakers=[CircuitBreaker(1, 60.0), CircuitBreaker(1, 60.0)])
    try:
        result = client.infer("slow", X, timeout=10, expect=(1, 4))
        assert torch.equal(result.logits, torch.ones(1, 4))
        assert client.attempts == {broken.address: 1, good.address: 1}
        assert client.breakers[0].state == CircuitBreaker.OPEN
    finally:
        client.close()
        stop_in_thread(broken, thread)


def test_bad_request_is_not_retried(slow_nodes):
    a, b = slow_nodes
    client = FailoverClient([EdgeClient(a.address), EdgeClient(b.address)])
    with pytest.raises(OffloadError) as err:
        client.infer("slow", encode(torch.ones(1, 5), "fp32"), timeout=5)  # 5 values for a 4-wide model
    assert err.value.reason == "INVALID_ARGUMENT"
    assert client.attempts == {a.address: 1, b.address: 0}
    client.close()


def test_a_node_refusing_the_token_or_the_model_is_passed_over_for_one_that_serves():
    """Defect: UNAUTHENTICATED (and NOT_FOUND, UNIMPLEMENTED) from the first node was taken as
    what every node would say: each call gave up there, never reached the node that serves it,
    and kept the refusing node's breaker closed."""
    model, gate = gated_model("slow")
    gate.release.set()
    locked, locked_thread = start_in_thread(model, server_kwargs={"token": "s3cret-token"})
    other_model, other_gate = gated_model("other")
    other_gate.release.set()
    other, other_thread = start_in_thread(other_model)
    open_, open_thread = start_in_thread(model)
    client = FailoverClient([EdgeClient(locked.address), EdgeClient(other.address), EdgeClient(open_.address)],
                            failure_threshold=1, reset_seconds=60)
    try:
        assert torch.equal(client.infer("slow", X, timeout=5).logits, torch.ones(1, 4))
        assert client.attempts == {locked.address: 1, other.address: 1, open_.address: 1}
        # the refused token makes the node useless to this client; the missing model does not
        assert [b.state for b in client.breakers] == [CircuitBreaker.OPEN, CircuitBreaker.CLOSED,
                                                      CircuitBreaker.CLOSED]
        client.infer("slow", X, timeout=5)  # straight to the node that served
        assert client.attempts[open_.address] == 2 and client.attempts[locked.address] == 1
        assert torch.equal(client.infer("other", X, timeout=5).logits, torch.ones(1, 4))  # other's own model
    finally:
        client.close()
        for node, thread in ((locked, locked_thread), (other, other_thread), (open_, open_thread)):
            stop_in_thread(node, thread)


def test_a_segment_a_lone_node_does_not_serve_leaves_its_breaker_closed_for_those_it_does(slow_nodes):
    client = FailoverClient([EdgeClient(slow_nodes[0].address)], failure_threshold=1, reset_seconds=60)
    try:
        for _ in range(3):
            with pytest.raises(OffloadError) as err:
                client.infer("slow.from.99", X, timeout=5)
            assert err.value.reason == "NOT_FOUND"
        assert client.breakers[0].state == CircuitBreaker.CLOSED
        assert client.infer("slow", X, timeout=5).logits.shape == (1, 4)
    finally:
        client.close()


def test_device_runner_fails_over_between_real_nodes(trained_model):
    nodes = [start_in_thread(trained_model) for _ in range(2)]
    stopped = []
    try:
        client = FailoverClient([EdgeClient(n.address) for n, _ in nodes])
        runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=client, deadline_s=5)
        x = torch.randn(1, 1, 28, 28)
        assert runner.infer(x).where == WHERE_EDGE
        stop_in_thread(*nodes[0])
        stopped.append(0)
        answers = [runner.infer(x) for _ in range(5)]
        assert all(a.where == WHERE_EDGE for a in answers)
        client.close()
    finally:
        for i, n in enumerate(nodes):
            if i not in stopped:
                stop_in_thread(*n)


def test_deadline_leaves_room_for_local_completion(trained_model):
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=None, latency_target_s=0.2)
    assert 0 < runner.local_tail_s < 0.2
    assert runner.offload_deadline(0.01) == pytest.approx(0.2 - 0.01 - runner.local_tail_s)
    assert runner.offload_deadline(1.0) == 0.005
    assert DeviceRunner(trained_model, cut=4, deadline_s=0.7).offload_deadline(0.5) == 0.7


def test_a_plan_with_its_own_offload_deadline_shortens_the_runners_never_lengthens_it(trained_model):
    from edgesplit.runtime.plan import Plan

    runner = DeviceRunner(trained_model, cut=4, deadline_s=0.7)
    assert runner.offload_deadline(0.0, 4, Plan(cut=4, offload_deadline_s=0.25)) == 0.25
    assert runner.offload_deadline(0.0, 4, Plan(cut=4, offload_deadline_s=3.0)) == 0.7
    assert runner.offload_deadline(0.0, 4, Plan(cut=4)) == 0.7
    targeted = DeviceRunner(trained_model, cut=4, client=None, latency_target_s=0.2)
    assert targeted.offload_deadline(0.01, 4, Plan(cut=4, offload_deadline_s=0.001)) == 0.001
    for bad in (0, -1.0, float("inf"), float("nan"), "1", True):
        with pytest.raises(ValueError, match="offload_deadline_s"):
            Plan(cut=4, offload_deadline_s=bad)


class TrainNode:
    """A node client that records when each call starts (and whether it waits for the
    connection) and when its answer is asked for."""

    def __init__(self, name, events, fail=None, can_start=True):
        self.target, self.events, self.fail = name, events, fail
        if not can_start:
            self.infer_async = None

    def infer(self, model_name, tensors, timeout, request_id="", wait_for_ready=False, expect=None):
        self.events.append((self.target, "send", len(tensors.data)))
        if self.fail:
            raise OffloadError(self.fail, "down")
        self.events.append((self.target, "answer", len(tensors.data)))
        return len(tensors.data)

    def infer_async(self, model_name, tensors, timeout, request_id="", **kwargs):
        self.events.append((self.target, "send", len(tensors.data), *kwargs))
        node = self

        class Pending:
            def result(self):
                node.events.append((node.target, "answer", len(tensors.data)))
                if node.fail:
                    raise OffloadError(node.fail, "down")
                return len(tensors.data)

            def cancel(self):
                node.events.append((node.target, "cancel", len(tensors.data)))

        return Pending()


def test_a_train_is_sent_back_to_back_and_answered_in_order_and_fails_over_like_a_call():
    """A probe times the gap between two requests at the node: the second must leave
    without waiting for the first's answer, or the gap is the device's own round trip."""
    small, large = encode(torch.zeros(1, 4), "int8"), encode(torch.zeros(1, 4), "fp32")
    events = []
    client = FailoverClient([TrainNode("a", events)])
    train = client.infer_train("m", [small, large], timeout=5)
    assert train.answers == [4, 16] and train.back_to_back
    assert events == [("a", "send", 4), ("a", "send", 16), ("a", "answer", 4), ("a", "answer", 16)]
    # a node client that cannot start a call without waiting gets them one after another
    events.clear()
    train = FailoverClient([TrainNode("s", events, can_start=False)]).infer_train("m", [small, large], 5)
    assert train.answers == [4, 16] and not train.back_to_back
    assert events == [("s", "send", 4), ("s", "answer", 4), ("s", "send", 16), ("s", "answer", 16)]
    # a node that fails: what it was sent is cancelled, its breaker told once, the next node
    # answers and is preferred from then on
    events.clear()
    client = FailoverClient([TrainNode("down", events, fail="UNAVAILABLE"), TrainNode("up", events)],
                            failure_threshold=2)
    assert client.infer_train("m", [small, large], timeout=5).answers == [4, 16]
    assert ("down", "cancel", 16) in events and events[-2:] == [("up", "answer", 4), ("up", "answer", 16)]
    assert client.breakers[0].state == CircuitBreaker.CLOSED and client.attempts == {"down": 1, "up": 1}
    events.clear()
    client.infer_train("m", [small, large], timeout=5)
    assert {e[0] for e in events} == {"up"}
    # a half-open breaker's train waits for the connection, as its call would
    events.clear()
    client = FailoverClient([TrainNode("back", events)], failure_threshold=1, reset_seconds=0.0)
    client.breakers[0].failure()
    assert client.infer_train("m", [small, large], timeout=5).answers == [4, 16]
    assert events[:2] == [("back", "send", 4, "wait_for_ready"), ("back", "send", 16, "wait_for_ready")]
    # a refusal that every node would give is not retried
    events.clear()
    client = FailoverClient([TrainNode("x", events, fail="INVALID_ARGUMENT"), TrainNode("y", events)])
    with pytest.raises(OffloadError, match="INVALID_ARGUMENT"):
        client.infer_train("m", [small, large], timeout=5)
    assert not any(e[0] == "y" for e in events)
