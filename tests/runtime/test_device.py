"""Device runner: local exits, offloading to a real node, local completion on every failure,
and no request lost when the node is killed mid-run."""

from __future__ import annotations

import socket
import threading

import pytest
import torch

from edgesplit.models.datasets import load_sample, to_tensor
from edgesplit.runtime.client import EdgeClient
from edgesplit.runtime.device import WHERE_DEVICE, WHERE_EDGE, WHERE_FALLBACK, DeviceRunner
from edgesplit.runtime.launcher import NodeProcess
from edgesplit.runtime.resilience import CircuitBreaker


@pytest.fixture(scope="module")
def sample():
    images, labels = load_sample()
    return to_tensor(images[:60]), labels[:60]


def local_logits(model, x):
    with torch.inference_mode():
        return model(x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("codec,tol", [("fp32", 1e-5), ("fp16", 2e-2), ("int8", 0.5), ("int8-channel", 0.5)])
def test_offloaded_answers_match_local_computation(node, trained_model, sample, codec, tol):
    x, _ = sample
    client = EdgeClient(node.address)
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=client, codec=codec, deadline_s=5)
    agree = 0
    for i in range(20):
        answer = runner.infer(x[i])
        assert answer.where == WHERE_EDGE and answer.exit == "final" and answer.offload_error is None
        expected = local_logits(trained_model, x[i : i + 1])
        assert (answer.logits - expected).abs().max().item() <= tol
        agree += answer.prediction == int(expected.argmax())
        assert answer.latency.edge > 0 and answer.latency.device > 0 and answer.latency.transfer >= 0
    assert agree >= 19
    client.close()


def test_confident_exit_answers_on_the_device(trained_model, sample):
    x, _ = sample
    runner = DeviceRunner(trained_model, cut=7, thresholds=0.0, client=None)
    answers = [runner.infer(x[i]) for i in range(10)]
    assert {a.exit for a in answers} == {"exit@4"} and {a.where for a in answers} == {WHERE_DEVICE}
    assert all(a.latency.transfer == 0 and a.latency.edge == 0 for a in answers)
    per_exit = DeviceRunner(trained_model, cut=7, thresholds={4: 1.01, 7: 0.0}, client=None)
    assert {per_exit.infer(x[i]).exit for i in range(5)} == {"exit@7"}


def test_everything_local_when_cut_is_the_end(trained_model, sample):
    x, _ = sample
    runner = DeviceRunner(trained_model, cut=trained_model.num_blocks, thresholds=1.01, client=None)
    answer = runner.infer(x[0])
    assert answer.where == WHERE_DEVICE and answer.exit == "final"
    assert answer.prediction == int(local_logits(trained_model, x[:1]).argmax())


def test_unreachable_node_completes_locally_and_opens_the_circuit(trained_model, sample):
    x, _ = sample
    client = EdgeClient(f"127.0.0.1:{free_port()}")
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=client, deadline_s=0.5,
                          breaker=CircuitBreaker(failure_threshold=2, reset_seconds=60))
    answers = [runner.infer(x[i]) for i in range(5)]
    assert all(a.where == WHERE_FALLBACK and a.exit == "final" for a in answers)
    assert answers[0].offload_error == "UNAVAILABLE" and answers[-1].offload_error == "circuit open"
    for i, a in enumerate(answers):
        assert a.prediction == int(local_logits(trained_model, x[i : i + 1]).argmax())
    client.close()


def test_best_exit_fallback_uses_an_exit_already_computed(trained_model, sample):
    x, _ = sample
    runner = DeviceRunner(trained_model, cut=7, thresholds=1.01, client=None, fallback="best_exit")
    answer = runner.infer(x[0])
    assert answer.where == WHERE_FALLBACK and answer.exit in {"exit@4", "exit@7"}


def test_bad_configuration_is_refused(trained_model):
    with pytest.raises(ValueError, match="codec"):
        DeviceRunner(trained_model, cut=4, codec="jpeg")
    with pytest.raises(ValueError, match="no exits at cuts"):
        DeviceRunner(trained_model, cut=4, thresholds={5: 0.5})
    with pytest.raises(ValueError, match="cut"):
        DeviceRunner(trained_model, cut=40)


def test_node_killed_mid_run_loses_no_request(trained_model):
    images, _ = load_sample()
    x = to_tensor(images[:150])
    with NodeProcess(model="resnet_fm") as node:
        client = EdgeClient(node.address)
        runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=client, codec="fp32", deadline_s=2.0,
                              breaker=CircuitBreaker(failure_threshold=2, reset_seconds=0.2))
        answers = []
        restarter = None
        for i in range(len(x)):
            if i == 40:
                node.kill()
            if i == 60:
                restarter = threading.Thread(target=node.start)
                restarter.start()
            answers.append(runner.infer(x[i]))
        restarter.join()
        # Keep going until the restarted node answers again (it needs a few seconds to load).
        extra = 0
        while answers[-1].where != WHERE_EDGE and extra < 400:
            answers.append(runner.infer(x[extra % len(x)]))
            extra += 1
        client.close()
    ids = [a.request_id for a in answers]
    assert len(answers) == len(x) + extra and ids == list(range(len(ids))), "exactly one answer per request"
    where = [a.where for a in answers]
    assert set(where[:40]) == {WHERE_EDGE}
    assert WHERE_FALLBACK in where[40:60] and where[-1] == WHERE_EDGE
    expected = local_logits(trained_model, x).argmax(1)
    for i, a in enumerate(answers[: len(x)]):
        assert a.prediction == int(expected[i]), f"request {i} ({a.where}) differs from local computation"
