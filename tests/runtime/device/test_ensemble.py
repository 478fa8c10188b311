"""A NoNN ensemble over real node servers: answers match the in-process ensemble with every
member, with any members down, with a member that never answers, and with none at all."""

from __future__ import annotations

import dataclasses

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


def clients_for(nodes):
    return [EdgeClient(node.address) for node, _ in nodes]


def expected(ensemble, x, members):
    with torch.no_grad():
        return ensemble.aggregator.combine({i: ensemble.students[i](x) for i in members})


def test_every_member_answers_like_the_in_process_ensemble(tiny_nonn, member_nodes):
    metrics = EnsembleMetrics(CollectorRegistry())
    client = EnsembleClient(tiny_nonn, clients_for(member_nodes), deadline_s=10, input_codec="fp32", metrics=metrics)
    x = torch.randn(3, 1, 28, 28)
    answer = client.classify(x)
    assert answer.answered == (0, 1, 2, 3) and answer.missing == {} and answer.how == "all"
    torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, range(4)), atol=1e-5, rtol=1e-5)
    assert answer.sent_bytes == 4 * 3 * 784 * 4
    assert metrics.registry.get_sample_value("edgesplit_nonn_answers_total",
                                             {"ensemble": tiny_nonn.name, "how": "all"}) == 1


def test_members_down_are_missing_and_the_rest_classify(tiny_nonn, member_nodes):
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


def test_nobody_answering_falls_back_to_the_local_student(tiny_nonn, member_nodes):
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


def test_a_member_that_never_answers_is_cut_off_at_the_deadline(tiny_nonn, member_nodes):
    stalled = Stalled(tiny_nonn.students[3])
    registry = ModelRegistry()
    students = list(tiny_nonn.students)
    students[3] = stalled
    register_nonn_members(registry, dataclasses.replace(tiny_nonn, students=students), [3])
    hung = start_in_thread(registry)
    try:
        clients = clients_for(member_nodes)
        clients[3] = EdgeClient(hung[0].address)
        client = EnsembleClient(tiny_nonn, clients, deadline_s=0.5, input_codec="fp32")
        x = torch.randn(1, 1, 28, 28)
        answer = client.classify(x)
        assert stalled.gate.entered.is_set()  # the request reached the member, which never answered
        assert answer.answered == (0, 1, 2) and answer.missing == {3: "DEADLINE_EXCEEDED"}
        torch.testing.assert_close(answer.logits, expected(tiny_nonn, x, (0, 1, 2)), atol=1e-5, rtol=1e-5)
    finally:
        stalled.gate.release.set()
        stop_in_thread(*hung)


def test_int8_input_is_the_image_size_and_close_to_float(tiny_nonn, member_nodes):
    client = EnsembleClient(tiny_nonn, clients_for(member_nodes), deadline_s=10)
    x = torch.randn(1, 1, 28, 28)
    answer = client.classify(x)
    assert answer.sent_bytes == 4 * 784
    assert answer.logits.argmax() == expected(tiny_nonn, x, range(4)).argmax()


def test_bad_configuration_is_refused(tiny_nonn, member_nodes):
    clients = clients_for(member_nodes)
    with pytest.raises(ValueError, match="4 members"):
        EnsembleClient(tiny_nonn, clients[:3])
    with pytest.raises(ValueError, match="deadline"):
        EnsembleClient(tiny_nonn, clients, deadline_s=0)
    with pytest.raises(ValueError, match="fallback member 7"):
        EnsembleClient(tiny_nonn, clients, fallback_member=7)
