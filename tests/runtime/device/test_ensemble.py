"""A NoNN ensemble over real node servers: answers match the in-process ensemble with every
member, with any members down, with a member that never answers, and with none at all."""

from __future__ import annotations

import dataclasses
import threading

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from edgesplit.runtime.device.ensemble import EnsembleClient
from edgesplit.runtime.metrics import EnsembleMetrics
from edgesplit.runtime.node.registry import ModelRegistry, register_nonn_members
from edgesplit.runtime.transport.client import EdgeClient
from tests.helpers import Gate, start_in_thread, stop_in_thread


@pytest.fixture
def member_nodes(tiny_nonn):
    """One real node per member, each serving only its member."""
    nodes = []
    try:
        for i in range(tiny_nonn.members):
            registry = ModelRegistry()
            register_nonn_members(registry, tiny_nonn, [i])
            nodes.append(start_in_thread(registry))
        yield nodes
    finally:
        for node, thread in nodes:
            if thread.is_alive():
                stop_in_thread(node, thread)


@pytest.fixture
def clients_for():
    """Node clients for a test; every one made is closed afterwards."""
    made = []

    def make(nodes):
        clients = [EdgeClient(node.address) for node, _ in nodes]
        made.extend(clients)
        return clients

    yield make
    for client in made:
        client.close()


def expected(ensemble, x, members):
    with torch.no_grad():
        return ensemble.aggregator.combine({i: ensemble.students[i](x) for i in members})


def test_every_member_answers_like_the_in_process_ensemble(tiny_nonn, member_nodes, clients_for):
    metrics = EnsembleMetrics(CollectorRegistry())
    client = EnsembleClient(tiny_nonn, clients_for(member_nodes), deadline_s=10, input_codec="fp32", metrics=metrics)
    x = torch.randn(3, 1, 28, 28)
    answer = client.classify(x)
    assert answer.answered == (0, 1, 2, 3) and answer.missing == {} and answer.how == "all"
    torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, range(4)), atol=1e-5, rtol=1e-5)
    assert answer.sent_bytes == 4 * 3 * 784 * 4
    assert metrics.registry.get_sample_value("edgesplit_nonn_answers_total",
                                             {"ensemble": tiny_nonn.name, "how": "all"}) == 1


def test_members_down_are_missing_and_the_rest_classify(tiny_nonn, member_nodes, clients_for):
    metrics = EnsembleMetrics(CollectorRegistry())
    client = EnsembleClient(tiny_nonn, clients_for(member_nodes), deadline_s=10, input_codec="fp32", metrics=metrics)
    for i in (1, 2):
        stop_in_thread(*member_nodes[i])
    x = torch.randn(2, 1, 28, 28)
    answer = client.classify(x)
    assert answer.answered == (0, 3) and answer.missing == {1: "UNAVAILABLE", 2: "UNAVAILABLE"}
    torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, (0, 3)), atol=1e-5, rtol=1e-5)
    assert metrics.registry.get_sample_value(
        "edgesplit_nonn_member_missing_total",
        {"ensemble": tiny_nonn.name, "member": "1", "reason": "UNAVAILABLE"}) == 1


def test_nobody_answering_falls_back_to_the_local_student(tiny_nonn, member_nodes, clients_for):
    client = EnsembleClient(tiny_nonn, clients_for(member_nodes), deadline_s=10, input_codec="fp32",
                            fallback_member=1)
    for node in member_nodes:
        stop_in_thread(*node)
    x = torch.randn(2, 1, 28, 28)
    answer = client.classify(x)
    assert answer.fallback and answer.answered == () and set(answer.missing) == {0, 1, 2, 3}
    torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, (1,)), atol=1e-5, rtol=1e-5)


class Stalled(torch.nn.Module):
    """A member whose batches wait at a gate: a node that accepted the request and hangs."""

    def __init__(self, student) -> None:
        super().__init__()
        self.student, self.filters, self.gate = student, student.filters, Gate()

    def forward(self, x):
        return self.student(self.gate(x))


def test_a_member_that_never_answers_is_cut_off_at_the_deadline(tiny_nonn, member_nodes, clients_for):
    stalled = Stalled(tiny_nonn.students[3])
    registry = ModelRegistry()
    students = list(tiny_nonn.students)
    students[3] = stalled
    register_nonn_members(registry, dataclasses.replace(tiny_nonn, students=students), [3])
    hung = start_in_thread(registry)
    hung_client = EdgeClient(hung[0].address)
    try:
        clients = clients_for(member_nodes)
        clients[3] = hung_client
        for c in clients:  # connected first, so the deadline is spent on the request alone
            grpc.channel_ready_future(c.channel).result(timeout=30)
        client = EnsembleClient(tiny_nonn, clients, deadline_s=0.5, input_codec="fp32")
        x = torch.randn(1, 1, 28, 28)
        answer = client.classify(x)
        assert stalled.gate.entered.is_set()  # the request reached the member, which never answered
        assert answer.answered == (0, 1, 2) and answer.missing == {3: "DEADLINE_EXCEEDED"}
        torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, (0, 1, 2)), atol=1e-5, rtol=1e-5)
    finally:
        hung_client.close()
        stalled.gate.release.set()
        stop_in_thread(*hung)


def test_int8_input_is_the_image_size_and_close_to_float(tiny_nonn, member_nodes, clients_for):
    from edgesplit.models.datasets import load_sample, to_tensor

    client = EnsembleClient(tiny_nonn, clients_for(member_nodes), deadline_s=10)
    x = to_tensor(load_sample()[0][:1])  # a real image: int8 keeps its class
    answer = client.classify(x)
    assert answer.sent_bytes == 4 * 784
    assert answer.logits.argmax() == expected(tiny_nonn, x, range(4)).argmax()


def test_bad_configuration_is_refused(tiny_nonn, member_nodes, clients_for):
    clients = clients_for(member_nodes)
    with pytest.raises(ValueError, match="4 members"):
        EnsembleClient(tiny_nonn, clients[:3])
    with pytest.raises(ValueError, match="deadline"):
        EnsembleClient(tiny_nonn, clients, deadline_s=0)
    with pytest.raises(ValueError, match="fallback member 7"):
        EnsembleClient(tiny_nonn, clients, fallback_member=7)


class Broken(torch.nn.Module):
    """A member that answers garbage: non-finite features, or one feature too many."""

    def __init__(self, filters: int, kind: str) -> None:
        super().__init__()
        self.filters, self.kind = filters, kind

    def forward(self, x):
        value = {"nan": float("nan"), "huge": 3e38, "negative": -1.0}.get(self.kind)
        if value is not None:
            return torch.full((len(x), self.filters), value)
        return torch.zeros(len(x), self.filters + 1)


@pytest.mark.parametrize("kind", ["nan", "huge", "negative", "shape"])
def test_a_member_answering_garbage_is_ignored_not_trusted(tiny_nonn, member_nodes, clients_for, kind):
    students = list(tiny_nonn.students)
    students[0] = Broken(tiny_nonn.students[0].filters, kind)
    registry = ModelRegistry()
    if kind == "shape":  # the served spec says filters + 1, as a misconfigured node would
        students[0].filters += 1
    register_nonn_members(registry, dataclasses.replace(tiny_nonn, students=students), [0])
    bad = start_in_thread(registry)
    bad_client = EdgeClient(bad[0].address)
    try:
        clients = clients_for(member_nodes)
        clients[0] = bad_client
        x = torch.randn(2, 1, 28, 28)
        answer = EnsembleClient(tiny_nonn, clients, deadline_s=10, input_codec="fp32").classify(x)
        # a NaN from the model is refused by the node itself (INTERNAL); other garbage is
        # caught by the device's own check of the answer
        assert answer.missing == {0: "INTERNAL" if kind == "nan" else "INVALID_ANSWER"}
        assert answer.answered == (1, 2, 3)
        assert torch.isfinite(answer.logits).all()
        torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, (1, 2, 3)), atol=1e-5, rtol=1e-5)
    finally:
        bad_client.close()
        stop_in_thread(*bad)


class NeverAnswers:
    """A client whose calls stay pending whatever timeout they are given; records cancellation."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.calls = 0

    def infer_async(self, model_name, tensors, timeout, request_id=""):
        owner = self
        self.calls += 1
        self.cancelled.clear()

        class Pending:
            def done(self):
                return owner.cancelled.is_set()

            def add_done_callback(self, fn):
                pass

            def cancel(self):
                owner.cancelled.set()

            def result(self):
                raise AssertionError("result() of a call that never finished")

        return Pending()


class Refuses:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def infer_async(self, model_name, tensors, timeout, request_id=""):
        raise self.exc


def test_the_clients_own_deadline_cuts_off_and_cancels_a_call_that_never_ends(tiny_nonn, member_nodes,
                                                                               clients_for):
    from edgesplit.runtime.inference import OffloadError

    clients = clients_for(member_nodes)
    hung = NeverAnswers()
    clients[1] = hung
    clients[2] = Refuses(OffloadError("UNAVAILABLE", "refused"))
    clients[3] = Refuses(RuntimeError("a bug in the client"))
    x = torch.randn(1, 1, 28, 28)
    answer = EnsembleClient(tiny_nonn, clients, deadline_s=0.3, input_codec="fp32").classify(x)
    assert answer.missing == {1: "DEADLINE_EXCEEDED", 2: "UNAVAILABLE", 3: "CLIENT_ERROR"}
    assert answer.answered == (0,) and hung.cancelled.is_set()
    torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, (0,)), atol=1e-5, rtol=1e-5)


def test_without_a_fallback_student_nobody_answering_gives_the_prior(tiny_nonn, member_nodes, clients_for):
    from edgesplit.runtime.inference import OffloadError

    refused = [Refuses(OffloadError("UNAVAILABLE", "down")) for _ in range(4)]
    metrics = EnsembleMetrics(CollectorRegistry())
    client = EnsembleClient(tiny_nonn, refused, fallback_member=None, metrics=metrics)
    answer = client.classify(torch.randn(2, 1, 28, 28))
    assert answer.fallback and answer.how == "fallback" and answer.sent_bytes == 0
    prior = tiny_nonn.aggregator.classifier(tiny_nonn.aggregator.filter_mean)
    torch.testing.assert_close(answer.logits, prior.expand(2, -1).detach())
    assert metrics.registry.get_sample_value("edgesplit_nonn_answers_total",
                                             {"ensemble": tiny_nonn.name, "how": "fallback"}) == 1


def test_a_hung_member_is_skipped_after_two_misses_then_probed(tiny_nonn, member_nodes, clients_for):
    from edgesplit.runtime.device.breaker import CircuitBreaker

    now = [0.0]
    clients = clients_for(member_nodes)
    hung = NeverAnswers()
    clients[2] = hung
    client = EnsembleClient(tiny_nonn, clients, deadline_s=0.2, input_codec="fp32")
    client.breakers = [CircuitBreaker(2, 1.0, clock=lambda: now[0]) for _ in range(4)]
    x = torch.randn(1, 1, 28, 28)
    reasons = [client.classify(x).missing.get(2) for _ in range(3)]
    assert reasons == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "CIRCUIT_OPEN"] and hung.calls == 2
    answer = client.classify(x)  # still open: the others answer, member 2 is not even asked
    assert answer.missing == {2: "CIRCUIT_OPEN"} and answer.answered == (0, 1, 3) and hung.calls == 2
    now[0] += 1.5  # past the reset: one probe goes to member 2
    assert client.classify(x).missing == {2: "DEADLINE_EXCEEDED"} and hung.calls == 3
    assert client.breakers[0].state == CircuitBreaker.CLOSED


def test_a_probe_that_finds_the_member_full_does_not_lock_it_out(tiny_nonn, member_nodes, clients_for):
    from edgesplit.runtime.device.breaker import CircuitBreaker
    from edgesplit.runtime.inference import OffloadError

    now = [0.0]
    clients = clients_for(member_nodes)
    real = clients[1]
    clients[1] = Refuses(OffloadError("UNAVAILABLE", "down"))
    client = EnsembleClient(tiny_nonn, clients, deadline_s=10, input_codec="fp32")
    client.breakers = [CircuitBreaker(2, 1.0, clock=lambda: now[0]) for _ in range(4)]
    x = torch.zeros(1, 1, 28, 28)
    for _ in range(2):
        client.classify(x)
    assert client.breakers[1].state == CircuitBreaker.OPEN
    now[0] += 1.5
    # the probe: alive but full (the node's refusal carries its pushback)
    client.clients[1] = Refuses(OffloadError("RESOURCE_EXHAUSTED", "full", retry_after_s=0.01))
    assert client.classify(x).missing == {1: "RESOURCE_EXHAUSTED"}
    client.clients[1] = real  # back to normal: asked at once, not locked out
    assert client.classify(x).missing == {}


@pytest.mark.parametrize("error, opens", [
    # gRPC's own refusal of an answer over the message-size limit: no pushback, nothing shows the
    # member works (it was counted as "full but alive" and asked forever at full cost)
    (("RESOURCE_EXHAUSTED", "received message larger than max"), True),
    # the member refused the request as malformed: the request's fault, not the member's
    (("INVALID_ARGUMENT", "batch size 65 is outside 1..64"), False),
])
def test_which_refusals_count_against_a_member(tiny_nonn, member_nodes, clients_for, error, opens):
    from edgesplit.runtime.device.breaker import CircuitBreaker
    from edgesplit.runtime.inference import OffloadError

    clients = clients_for(member_nodes)
    clients[3] = Refuses(OffloadError(*error))
    client = EnsembleClient(tiny_nonn, clients, deadline_s=10, input_codec="fp32")
    x = torch.zeros(1, 1, 28, 28)
    for _ in range(3):
        client.classify(x)
    assert client.breakers[3].state == (CircuitBreaker.OPEN if opens else CircuitBreaker.CLOSED)


@pytest.mark.parametrize("images", [
    torch.zeros(65, 1, 28, 28), torch.zeros(1, 3, 28, 28), torch.zeros(0, 1, 28, 28), torch.zeros(1, 28, 28),
    torch.full((1, 1, 28, 28), float("nan")), torch.zeros(1, 1, 28, 28, dtype=torch.int64),
    # raw pixels, not normalised: members' answers failed the plausibility check and their
    # breakers opened for the next, correct caller
    torch.full((1, 1, 28, 28), 255.0),
])
def test_images_it_cannot_classify_are_refused_before_anything_is_sent(tiny_nonn, images):
    """They once reached the members (whose refusals opened every breaker) or raised from
    deep inside the codec or the fallback student."""
    members = [NeverAnswers() for _ in range(tiny_nonn.members)]
    client = EnsembleClient(tiny_nonn, members, deadline_s=0.2, input_codec="int8")
    with pytest.raises(ValueError, match="images"):
        client.classify(images)
    assert all(m.calls == 0 for m in members)
    assert all(b.state == "closed" for b in client.breakers)


def test_a_request_id_the_nodes_would_refuse_is_refused_before_anything_is_sent(tiny_nonn):
    """At 300 characters every member refused it and every call quietly fell back."""
    members = [NeverAnswers() for _ in range(tiny_nonn.members)]
    client = EnsembleClient(tiny_nonn, members, deadline_s=0.2, input_codec="int8")
    with pytest.raises(ValueError, match="request_id of 300 characters"):
        client.classify(torch.zeros(1, 1, 28, 28), request_id="x" * 300)
    assert all(m.calls == 0 for m in members)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_the_local_fallback_answers_images_of_any_float_type(tiny_nonn, dtype):
    """With every member down, float16/64 images raised from the float32 fallback student."""
    from edgesplit.runtime.inference import OffloadError

    members = [Refuses(OffloadError("UNAVAILABLE", "down")) for _ in range(tiny_nonn.members)]
    client = EnsembleClient(tiny_nonn, members, deadline_s=1.0, input_codec="fp32")
    answer = client.classify(torch.zeros(2, 1, 28, 28, dtype=dtype))
    assert answer.how == "fallback" and answer.logits.shape == (2, tiny_nonn.aggregator.classifier.out_features)
    assert torch.isfinite(answer.logits).all()
