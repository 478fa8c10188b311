"""Device runner: local exits, offloading to a real node, local completion on every failure,
and no request lost when the node is killed mid-run."""

from __future__ import annotations

import logging
import socket
import threading

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgesplit.models.datasets import load_sample, to_tensor
from edgesplit.runtime.device.breaker import CircuitBreaker
from edgesplit.runtime.device.failover import FailoverClient
from edgesplit.runtime.device.runner import WHERE_DEVICE, WHERE_EDGE, WHERE_FALLBACK, DeviceRunner
from edgesplit.runtime.node.launcher import NodeProcess
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.transport.client import EdgeClient
from tests.helpers import CheckedThread, start_in_thread, stop_in_thread, wait_until


class ManualClock:
    """A clock the test moves by hand, so a breaker's reset period passes exactly when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
    failover = FailoverClient([client], breakers=[CircuitBreaker(failure_threshold=2, reset_seconds=60)])
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=failover, deadline_s=0.5)
    answers = [runner.infer(x[i]) for i in range(5)]
    assert all(a.where == WHERE_FALLBACK and a.exit == "final" for a in answers)
    assert answers[0].offload_error == "UNAVAILABLE" and answers[-1].offload_error == "CIRCUIT_OPEN"
    assert failover.breakers[0].state == CircuitBreaker.OPEN
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
        client = FailoverClient([EdgeClient(node.address)], reset_seconds=0.2)
        runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=client, codec="fp32", deadline_s=2.0)
        answers = []
        restarter = None
        for i in range(len(x)):
            if i == 40:
                node.kill()
            if i == 60:
                restarter = CheckedThread(node.start, name="restart")
                restarter.start()
            answers.append(runner.infer(x[i]))
        restarter.result(60)
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


def test_a_tensor_the_codec_cannot_carry_completes_locally_and_keeps_the_probe_slot(node, trained_model, sample):
    """Defect: encode ran outside the try, so fp16 overflow or NaN raised out of infer(), and
    in half-open state the breaker's single probe slot was never given back."""
    x, _ = sample
    clock = ManualClock()
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=1.0, clock=clock)
    client = FailoverClient([EdgeClient(node.address)], breakers=[breaker])
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=client, codec="fp16", deadline_s=5)
    breaker.failure()
    clock.now += 1.0  # half-open: one probe may go
    huge = x[0:1] * 1e9  # the crossing tensor overflows fp16
    answer = runner.infer(huge)
    assert answer.where == WHERE_FALLBACK and answer.offload_error.startswith("CODEC")
    with torch.inference_mode():
        assert answer.prediction == int(trained_model(huge).argmax())
    nan = x[0:1].clone()
    nan[0, 0, 0, 0] = float("nan")
    runner.set_plan(runner.plan.with_changes(codec="int8"))
    assert runner.infer(nan).offload_error.startswith("CODEC")
    ok = runner.infer(x[1])  # the probe slot is still free: this one goes to the node and closes the breaker
    assert ok.where == WHERE_EDGE and breaker.state == CircuitBreaker.CLOSED


class BrokenOffloader:
    """A user's offloader with a bug in it (not a network failure)."""

    target = "broken"

    def infer(self, model_name, tensors, timeout, request_id="", wait_for_ready=False, expect=None):
        return None + 1


class WrongShapeOffloader:
    """A user's offloader that does not check answers, handed logits of the wrong shape."""

    target = "wrong-shape"

    def __init__(self, shape):
        self.shape = shape

    def infer(self, model_name, tensors, timeout, request_id="", wait_for_ready=False, expect=None):
        from edgesplit.runtime.inference import OffloadResult

        return OffloadResult(torch.zeros(self.shape), 0.001, 0.002, 100, 1)


@pytest.mark.parametrize("shape", [(1, 5), (10,), (1, 10, 1, 1), (0, 10)])
def test_an_answer_of_the_wrong_shape_is_completed_on_the_device(trained_model, sample, shape):
    """[10] or [0, 10] made runner.infer raise (no answer at all); [1, 5] was taken as the edge's."""
    x, _ = sample
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=WrongShapeOffloader(shape))
    answer = runner.infer(x[0])
    assert answer.where != WHERE_EDGE and answer.offload_error.startswith("INVALID_ANSWER")
    with torch.no_grad():
        assert answer.prediction == int(trained_model(x[:1]).argmax(1))


def test_a_bug_in_the_offloader_is_logged_and_still_answered_once(trained_model, sample, caplog):
    x, _ = sample
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=BrokenOffloader())
    with caplog.at_level(logging.ERROR, logger="edgesplit.device"):
        answer = runner.infer(x[0])
    assert answer.where == WHERE_FALLBACK and answer.offload_error == "INTERNAL_ERROR: TypeError"
    assert any("TypeError" in (r.exc_text or "") for r in caplog.records), "the traceback is logged"


def test_exits_that_cannot_fire_are_not_computed(trained_model, sample):
    x, _ = sample
    calls = {4: 0, 7: 0}
    hooks = [trained_model.exits[str(c)].register_forward_hook(lambda *_, c=c: calls.__setitem__(c, calls[c] + 1))
             for c in calls]
    try:
        runner = DeviceRunner(trained_model, cut=trained_model.num_blocks, thresholds=1.01, client=None)
        runner.infer(x[0])
        assert calls == {4: 0, 7: 0}
        runner.set_plan(runner.plan.with_changes(thresholds={4: 1.01, 7: 1.0}))
        runner.infer(x[0])
        assert calls == {4: 0, 7: 1}
    finally:
        for h in hooks:
            h.remove()


def test_answers_carry_the_epoch_of_the_plan_they_ran_under(trained_model, sample):
    x, _ = sample
    runner = DeviceRunner(trained_model, plan=Plan(cut=trained_model.num_blocks, epoch=3), client=None)
    assert runner.infer(x[0]).epoch == 3
    runner.set_plan(Plan(cut=4, thresholds={4: 0.0}, epoch=4))
    answer = runner.infer(x[0])
    assert answer.epoch == 4 and answer.exit == "exit@4"
    with pytest.raises(ValueError, match="no exits at cuts"):
        runner.set_plan(Plan(cut=4, thresholds={5: 0.5}, epoch=5))
    assert runner.plan.epoch == 4, "a refused plan leaves the old one in force"


def _serving(channel) -> bool:
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def test_one_breaker_layer_a_restarted_node_is_used_after_one_reset_period(trained_model, sample):
    """Defect: the runner's own breaker sat over the failover client's per-node ones, so
    requests fell back locally while a restarted node was healthy."""
    x, _ = sample
    port = free_port()
    running, thread = start_in_thread(trained_model, server_kwargs={"port": port})
    clock = ManualClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_seconds=1.0, clock=clock)
    client = FailoverClient([EdgeClient(f"127.0.0.1:{port}")], breakers=[breaker])
    runner = DeviceRunner(trained_model, cut=4, thresholds=1.01, client=client, deadline_s=2)
    assert runner.infer(x[0]).where == WHERE_EDGE
    stop_in_thread(running, thread)
    failed = [runner.infer(x[i]) for i in range(4)]
    assert all(a.where == WHERE_FALLBACK for a in failed) and breaker.state == CircuitBreaker.OPEN
    running, thread = start_in_thread(trained_model, server_kwargs={"port": port})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_until(lambda: _serving(channel), 10, "the restarted node to serve")
        clock.now += 1.0
        answers = [runner.infer(x[i]) for i in range(5)]
        assert [a.where for a in answers] == [WHERE_EDGE] * 5, [a.offload_error for a in answers]
    finally:
        client.close()
        stop_in_thread(running, thread)


class Plus(torch.nn.Module):
    """A block that adds a constant, so the edge's answer tells itself apart from the device's."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return x + self.value


class Watched:
    """A real EdgeClient whose ``answered`` is set once a node's answer has come back."""

    def __init__(self, client: EdgeClient) -> None:
        self.client = client
        self.target = client.target
        self.answered = threading.Event()

    def infer(self, *args, **kwargs):
        result = self.client.infer(*args, **kwargs)
        self.answered.set()
        return result


def race_models():
    """A node model whose tail after cut 1 is held by a gate and adds 1, and the gate."""
    from edgesplit.models.split_model import SplitModel
    from tests.helpers import Gate

    gate = Gate()
    node_model = SplitModel("race", [("head", torch.nn.Identity()), ("gate", gate), ("plus", Plus(1.0))], {},
                            (4,), 4)
    gate.release.set()
    node_model.cut_points()
    gate.release.clear()
    gate.entered.clear()
    return node_model, gate


def device_model(tail: torch.nn.Module | None = None):
    """The device's model of the same name: its tail after cut 1 is ``tail`` then an identity."""
    from edgesplit.models.split_model import SplitModel

    return SplitModel("race", [("head", torch.nn.Identity()), ("a", tail or torch.nn.Identity()),
                               ("b", torch.nn.Identity())], {}, (4,), 4)


@pytest.fixture
def race_node():
    """A node serving the gated model in a thread, its gate and a client of it; cleaned up after."""
    node_model, gate = race_models()
    running, thread = start_in_thread(node_model)
    client = EdgeClient(running.address)
    try:
        yield running, gate, client
    finally:
        gate.release.set()
        client.close()
        stop_in_thread(running, thread)


def test_a_late_offload_races_the_device_and_the_device_answer_is_taken_when_it_ends_first(race_node):
    running, gate, client = race_node
    # one failure would open this breaker; the late offload may go on for 30 s, so only the
    # gate decides when the node answers
    from prometheus_client import CollectorRegistry

    from edgesplit.runtime.metrics import DeviceMetrics

    metrics = DeviceMetrics(CollectorRegistry())
    runner = DeviceRunner(device_model(), plan=Plan(cut=1, offload_deadline_s=0.05),
                          client=FailoverClient([client], failure_threshold=1), race_limit_s=30, metrics=metrics)
    x = torch.arange(4.0).reshape(1, 4)
    answer = runner.infer(x)  # the node holds the request past the deadline
    assert answer.where == WHERE_FALLBACK and answer.raced
    assert answer.offload_error.startswith("DEADLINE_EXCEEDED") and answer.attempted_bytes > 0
    assert torch.equal(answer.logits, x)  # the device's tail, not the node's (+1)
    assert answer.latency.transfer >= 0.05
    races = metrics.registry.get_sample_value("edgesplit_device_offload_races_total", {"winner": "device"})
    assert races == 1
    wait_until(gate.entered.is_set, 10, "the late request to reach the node")
    assert runner.offloads_racing == 1  # still out, not abandoned
    gate.release.set()
    wait_until(lambda: runner.offloads_racing == 0, 10, "the late offload to end")
    assert running.plane.registry.get("race.from.1").stats.requests == 1  # answered once, late
    assert runner.client.breakers[0].state == CircuitBreaker.CLOSED  # a late answer is not a failure
    runner.close()


def test_a_late_edge_answer_is_taken_when_it_beats_the_device(race_node):
    running, gate, client = race_node
    watched = Watched(client)
    holding = threading.Event()

    class UntilAnswered(torch.nn.Module):
        """The device's slow tail: it ends only once the node's answer is in."""

        def forward(self, x):
            holding.set()
            assert watched.answered.wait(10), "the node never answered"
            wait_until(lambda: runner.offloads_racing == 0, 10, "the offload's result to be handed over")
            return x

    runner = DeviceRunner(device_model(UntilAnswered()), plan=Plan(cut=1, offload_deadline_s=0.05), client=watched,
                          race_limit_s=30)
    x = torch.arange(4.0).reshape(1, 4)
    request = CheckedThread(lambda: runner.infer(x), "device request")
    request.start()
    assert holding.wait(10), "the device never started its tail"
    wait_until(gate.entered.is_set, 10, "the request to reach the node")  # held there past its deadline
    gate.release.set()
    answer = request.result(20)
    assert answer.where == WHERE_EDGE and answer.raced and answer.offload_error is None
    assert torch.equal(answer.logits, x + 1)  # the node's answer
    assert answer.sent_bytes > 0 and answer.latency.transfer + answer.latency.edge >= 0.05
    runner.close()


def test_without_a_plan_deadline_a_late_offload_is_abandoned_as_before(race_node):
    _, _, client = race_node
    runner = DeviceRunner(device_model(), plan=Plan(cut=1), client=client, deadline_s=0.05)
    answer = runner.infer(torch.ones(1, 4))
    assert answer.where == WHERE_FALLBACK and not answer.raced and runner.offloads_racing == 0
    assert answer.offload_error.startswith("DEADLINE_EXCEEDED")
    off = DeviceRunner(device_model(), plan=Plan(cut=1, offload_deadline_s=0.05), client=client, race=False)
    assert not off.infer(torch.ones(1, 4)).raced


def test_an_observer_that_fails_does_not_lose_the_answer(trained_model, sample, caplog):
    """A battery schedule the controller could not read made every runner.infer raise."""
    x, _ = sample
    runner = DeviceRunner(trained_model, cut=trained_model.num_blocks, client=None)
    seen = []

    def broken(answer):
        seen.append(answer)
        raise IndexError("tuple index out of range")

    runner.observers.append(broken)
    with caplog.at_level(logging.ERROR, logger="edgesplit.device"):
        answers = [runner.infer(x[i : i + 1]) for i in range(3)]
    assert all(a.where == WHERE_DEVICE for a in answers) and len(seen) == 3
    assert runner.observer_errors == 3
    assert sum("an observer of the runner failed" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_a_runner_whose_client_was_closed_still_answers_locally(node, trained_model, sample):
    """Reading the closed channel's state before the call raised out of infer()."""
    x, _ = sample
    client = EdgeClient(node.address)
    client.close()
    runner = DeviceRunner(trained_model, cut=4, client=client, deadline_s=5.0)
    answer = runner.infer(x[0])
    assert answer.where == WHERE_FALLBACK


def test_an_attempt_that_opened_the_connection_says_so_on_its_error(node, trained_model, sample):
    """A timeout on a call that had to connect first says nothing of the link's rate: the
    error says it was cold (the client that made the attempt, not another node's state)."""
    from edgesplit.runtime.codec import encode
    from edgesplit.runtime.transport.client import OffloadError

    x, _ = sample
    client = EdgeClient(node.address, connect_now=False)
    try:
        h = torch.zeros(1, *trained_model.cut_points()[4].shape)
        with pytest.raises(OffloadError) as late:
            client.infer(DeviceRunner.tail_model_name_for(trained_model, 4), encode(h, "fp32"), timeout=1e-4)
        assert late.value.reason == "DEADLINE_EXCEEDED" and late.value.cold
    finally:
        client.close()


def test_inputs_other_than_one_float_row_are_refused_before_any_work(trained_model, sample):
    """Defect: a batch of two was answered as one, every row exiting on row 0's confidence;
    an empty batch, integer images and numpy arrays raised torch's or numpy's errors."""
    x, _ = sample
    runner = DeviceRunner(trained_model, cut=4, thresholds=0.5)
    with pytest.raises(ValueError, match="one input"):
        runner.infer(x[:2])
    with pytest.raises(ValueError, match="one input"):
        runner.infer(x[:0])
    with pytest.raises(ValueError, match="floating-point"):
        runner.infer((x[:1] * 100).to(torch.uint8))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        runner.infer(x[:1].numpy())
    twin = runner.infer(x[0].double())  # float64 (and [C, H, W]) is taken as float32
    same = runner.infer(x[:1])
    assert (twin.prediction, twin.exit) == (same.prediction, same.exit)


@pytest.mark.parametrize("settings", [{"deadline_s": float("inf")}, {"deadline_s": float("nan")},
                                      {"deadline_s": -1}, {"deadline_s": "0.5"}, {"deadline_s": 0},
                                      {"latency_target_s": -1.0}, {"latency_target_s": float("nan")},
                                      {"race_limit_s": float("inf")}, {"race_limit_s": False}])
def test_deadlines_that_are_not_positive_finite_seconds_are_refused(trained_model, settings):
    """Defect: an infinite deadline failed every offload at once and opened the breaker of a
    healthy node; NaN or negative ones silently never offloaded; a string failed each request."""
    with pytest.raises(ValueError, match=next(iter(settings))):
        DeviceRunner(trained_model, cut=4, **settings)


def test_deadlines_take_any_real_number_and_a_race_limit_of_zero(trained_model):
    import numpy as np

    runner = DeviceRunner(trained_model, cut=4, deadline_s=np.float32(0.25), race_limit_s=0)
    assert runner.deadline_s == 0.25 and runner.race_limit_s == 0.0
