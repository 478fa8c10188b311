"""A real `edgesplit controller` process decides for a device over the bus; killed with
SIGKILL mid-run, the device keeps answering on its last plan, then its embedded controller
takes the decisions back."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import torch
import zmq
from prometheus_client import CollectorRegistry

from edgesplit.runtime.control.bus import DecisionSubscriber, TelemetryPublisher
from edgesplit.runtime.control.controller import EmbeddedController
from edgesplit.runtime.control.policy import LeastLatency, PlanSpace
from edgesplit.runtime.control.remote import DeviceLink
from edgesplit.runtime.device.runner import DeviceRunner
from edgesplit.runtime.metrics import DeviceMetrics
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.transport.client import EdgeClient
from tests.helpers import wait_until


def start_controller(tmp_path):
    port_file = tmp_path / "controller.json"
    code = "import sys; from edgesplit.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "controller", "--model", "resnet_fm", "--device", "mcu",
                             "--policy", "latency", "--telemetry", "tcp://127.0.0.1:*",
                             "--decisions", "tcp://127.0.0.1:*", "--heartbeat", "0.2", "--port-file", str(port_file),
                             "--metrics-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: port_file.exists() or proc.poll() is not None, timeout=60, what="controller start")
    if proc.poll() is not None:
        raise AssertionError(f"controller exited {proc.returncode}: {proc.stdout.read()}")
    return proc, json.loads(port_file.read_text())


def test_killed_controller_leaves_the_last_plan_then_the_embedded_controller_decides(node, tmp_path):
    model, running = node
    proc, endpoints = start_controller(tmp_path)
    ctx = zmq.Context()
    client = EdgeClient(running.address)
    registry = CollectorRegistry()
    runner = DeviceRunner(model, plan=Plan(cut=4, codec="fp32"), client=client, deadline_s=5.0,
                          metrics=DeviceMetrics(registry))
    space = PlanSpace.for_model(model, device_quota=0.05, repeats=2)
    embedded = EmbeddedController(runner, space, LeastLatency(), every=10**9)
    link = DeviceLink(embedded, TelemetryPublisher(ctx, endpoints["telemetry"], "device/cam1"),
                      DecisionSubscriber(ctx, endpoints["decisions"], "cam1"), interval_s=0.1, silence_s=1.0)
    x = torch.randn(1, 1, 28, 28)
    try:
        # A hopeless link: 16 s to send the image. (At 0.01 Mbit/s and 2 s, a controller profiling
        # the 0.05-core device on a host busy with other work predicted more than that and chose it.)
        embedded.estimator.bandwidth_mbit, embedded.estimator.rtt_s = 0.001, 10.0
        embedded.estimator.samples = 1  # as if measured: the controller does not decide on a starting guess
        link.start()
        wait_until(lambda: link.applied and runner.plan.cut == model.num_blocks, timeout=30,
                   what="the controller's all-on-device decision applied")
        assert link.following and not embedded.deciding
        # The controller calibrates the model's exits and sends their thresholds: its decisions
        # carried none, which switched off the exits of every device that followed it.
        assert set(link.applied[-1].thresholds) == set(model.exit_cuts)
        # the controller process's own metrics say what it decided for this device
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{endpoints['metrics_port']}/metrics", timeout=10) as r:
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(r.read().decode()) for s in family.samples}
        assert samples[("edgesplit_controller_plan_cut", (("device", "cam1"),))] == model.num_blocks
        assert samples[("edgesplit_controller_decisions_total", ())] >= 1
        assert samples[("edgesplit_controller_device_bandwidth_bits_per_second", (("device", "cam1"),))] == 1000.0
        assert all(runner.plan.thresholds[c] <= 1 for c in model.exit_cuts)
        sent = link.telemetry()  # what the device publishes: its estimate, battery, CPU and memory
        assert sent.link.bandwidth_mbit == 0.001 and sent.resources.memory_bytes > 0 and not sent.battery.simulated
        # the gauges follow the estimate while the cluster controller decides (set only on the
        # embedded controller's plan changes, they went stale), and its decisions are counted
        assert registry.get_sample_value("edgesplit_device_estimated_bandwidth_bits_per_second") == 1000.0
        assert registry.get_sample_value("edgesplit_device_controller_decisions_total") >= 1
        remote_plan = runner.plan
        answers = [runner.infer(x) for _ in range(5)]
        assert all(a.epoch == remote_plan.epoch and a.where == "device" for a in answers)

        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        answers = [runner.infer(x) for _ in range(20)]  # the device does not wait for anyone
        assert len(answers) == 20 and all(a.epoch == remote_plan.epoch for a in answers)
        wait_until(lambda: link.fallbacks == 1, timeout=15, what="fallback to the embedded controller")
        assert runner.plan == remote_plan and embedded.deciding  # last plan kept until the embedded one decides

        embedded.estimator.bandwidth_mbit, embedded.estimator.rtt_s = 1000.0, 0.0005  # a great link now
        plan = embedded.decide()
        assert plan is not None and plan.cut < model.num_blocks and plan.epoch > remote_plan.epoch
        answer = runner.infer(x)
        assert answer.epoch == plan.epoch and answer.where == "edge"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        link.close()
        link.publisher.close()
        link.subscriber.close()
        embedded.close()
        client.close()
        ctx.term()


@contextlib.contextmanager
def device_on_a_bus(node, silence_s: float = 0.5):
    """A device runner whose DeviceLink follows a controller's sockets driven by the test."""
    from edgesplit.runtime.control.bus import ControllerSockets, wait_for_subscribers

    model, running = node
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    client = EdgeClient(running.address)
    runner = DeviceRunner(model, plan=Plan(cut=4, codec="int8"), client=client, deadline_s=5.0)
    embedded = EmbeddedController(runner, PlanSpace.for_model(model, repeats=2), LeastLatency(), every=10**9)
    subscriber = DecisionSubscriber(ctx, hub.decision_endpoint, "cam1")
    link = DeviceLink(embedded, TelemetryPublisher(ctx, hub.telemetry_endpoint, "device/cam1"), subscriber,
                      interval_s=0.1, silence_s=silence_s)
    try:
        link.start()
        wait_for_subscribers(hub, subscriber)
        yield hub, link, runner, embedded
    finally:
        link.close()  # raises what the link's threads raised
        link.publisher.close()
        subscriber.close()
        embedded.close()
        client.close()
        hub.close()
        ctx.term()


def delivered(hub, condition):
    """A wait_until condition that repeats the decisions in force, as the controller's heartbeat does."""
    def check():
        hub.republish()
        return condition()

    return check


def test_a_controller_heard_again_after_a_silence_has_its_decision_applied_again(node):
    """While the cluster controller was silent the embedded one moved the plan (a decision or
    a trial); when the controller is heard again with the same decision, that decision is
    what the device runs, not whatever the embedded controller left."""
    from edgesplit.runtime.control.bus import decision

    last = node[0].num_blocks
    with device_on_a_bus(node, silence_s=0.5) as (hub, link, runner, embedded):
        hub.publish_decision(decision("cam1", 1, last, "int8"))
        wait_until(delivered(hub, lambda: link.following and runner.plan.cut == last), timeout=15,
                   what="the decision applied")
        wait_until(lambda: link.fallbacks == 1, timeout=15, what="the embedded controller deciding after 0.5 s")
        # what the embedded controller chose meanwhile, with an offload deadline of its own
        runner.set_plan(runner.plan.with_changes(cut=4, offload_deadline_s=0.3))
        hub.publish_decision(decision("cam1", 1, last, "int8"))  # the same decision, heard again
        # (repeated as the heartbeat repeats it: the link may have replaced its socket in the silence)
        wait_until(delivered(hub, lambda: link.following and runner.plan.cut == last), timeout=15,
                   what="the controller's decision applied again")
        assert not embedded.deciding and len(link.applied) == 2
        assert runner.plan.offload_deadline_s is None  # the decision carries none: the runner's own applies


def test_a_decision_the_device_cannot_run_changes_nothing_and_leaves_the_embedded_controller_deciding(node):
    """A NaN threshold once killed the thread that follows decisions (no decision and no
    fallback ever again), and decisions the device refused still silenced its embedded
    controller: refused ones are now counted and ignored, as if nothing had been heard."""
    from edgesplit.runtime.control.bus import decision

    model = node[0]
    with device_on_a_bus(node) as (hub, link, runner, embedded):
        before = runner.plan
        bad = [decision("cam1", 1, model.num_blocks, "int8", {4: float("nan")}),
               decision("cam1", 2, model.num_blocks, "int8", {7: -0.5}),
               decision("cam1", 3, 999, "int8"), decision("cam1", 4, model.num_blocks, "bogus")]
        for i, msg in enumerate(bad, start=1):
            hub.publish_decision(msg)
            wait_until(delivered(hub, lambda i=i: link.rejected >= i), timeout=15, what=f"bad decision {i} refused")
            assert not link.following and embedded.deciding and link.applied_count == 0
            assert runner.plan == before and not link.errors
        hub.publish_decision(decision("cam1", 5, model.num_blocks, "int8", {4: 0.5}))  # one it can run
        wait_until(delivered(hub, lambda: link.following and runner.plan.cut == model.num_blocks), timeout=15,
                   what="the runnable decision applied")
        assert not embedded.deciding and runner.plan.thresholds[4] == 0.5 and link.applied_count == 1


def test_a_restarted_controller_is_followed_though_it_counts_its_epochs_from_one_again(node):
    from edgesplit.runtime.control.bus import decision

    model = node[0]
    with device_on_a_bus(node, silence_s=5.0) as (hub, link, runner, _embedded):
        hub.publish_decision(decision("cam1", 1, model.num_blocks, "int8"))
        wait_until(delivered(hub, lambda: runner.plan.cut == model.num_blocks), timeout=15, what="first decision")
        hub.publish_decision(decision("cam1", 1, 7, "fp16"))  # the new controller's first decision
        wait_until(delivered(hub, lambda: (runner.plan.cut, runner.plan.codec) == (7, "fp16")), timeout=15,
                   what="the restarted controller's decision applied")
        assert link.applied_count == 2  # its heartbeats (the same decision again) are not applied again


def test_an_oversized_message_does_not_cut_the_device_off_from_its_controller(node):
    """ZeroMQ closes a connection that carries a frame over the size limit and does not
    reconnect it; the link now replaces its socket after a silence."""
    from edgesplit.runtime.control.bus import MAX_MESSAGE_BYTES, decision, decision_topic

    model = node[0]
    with device_on_a_bus(node, silence_s=0.5) as (hub, link, runner, _embedded):
        hub.publish_decision(decision("cam1", 1, model.num_blocks, "int8"))
        wait_until(delivered(hub, lambda: runner.plan.cut == model.num_blocks), timeout=15, what="first decision")
        hub.decisions.send_multipart([decision_topic("cam1"), b"\0" * (MAX_MESSAGE_BYTES + 1)])
        hub.publish_decision(decision("cam1", 2, 7, "fp16"))
        wait_until(delivered(hub, lambda: (runner.plan.cut, runner.plan.codec) == (7, "fp16")), timeout=30,
                   what="a decision after the oversized message")
        assert link.reconnects >= 1


def test_the_link_keeps_a_bounded_history_of_applied_decisions(node):
    from edgesplit.runtime.control.bus import decision
    from edgesplit.runtime.control.remote import HISTORY

    model = node[0]
    with device_on_a_bus(node, silence_s=5.0) as (hub, link, _runner, _embedded):
        n = HISTORY + 30
        for epoch in range(1, n + 1):
            hub.publish_decision(decision("cam1", epoch, model.num_blocks if epoch % 2 else 7, "int8"))
            wait_until(delivered(hub, lambda epoch=epoch: link.applied_count >= epoch), timeout=15,
                       what=f"decision {epoch} applied")
        assert link.applied_count == n and len(link.applied) == HISTORY and link.applied[-1].epoch == n


def test_thresholds_calibrated_for_another_confidence_or_other_exits_are_not_applied(node):
    """The cluster controller calibrates the zoo model's exits on max-softmax; a device running
    a bundle's own heads on entropy applied those thresholds unchecked (exiting 0.36 of its
    inputs where 0.74 were predicted). It follows the cut and codec and keeps its thresholds."""
    from edgesplit.runtime.control.bus import decision

    # a long silence limit: a stall of the test must not make the link resume (and count again)
    with device_on_a_bus(node, silence_s=30) as (hub, link, runner, _embedded):
        runner.set_plan(runner.plan.with_changes(thresholds={4: 0.95, 7: 0.95}))
        own = dict(runner.plan.thresholds)
        hub.publish_decision(decision("cam1", 1, 7, "int8", {4: 0.5, 7: 0.5}, confidence="entropy"))
        wait_until(delivered(hub, lambda: runner.plan.cut == 7), timeout=15, what="the first decision applied")
        assert dict(runner.plan.thresholds) == own and link.kept_thresholds == 1
        hub.publish_decision(decision("cam1", 2, 8, "int8", {4: 0.5, 5: 0.5}))  # an exit this model lacks
        wait_until(delivered(hub, lambda: runner.plan.cut == 8), timeout=15, what="the second decision applied")
        assert dict(runner.plan.thresholds) == own and link.kept_thresholds == 2
        hub.publish_decision(decision("cam1", 3, 4, "int8", {4: 0.6, 7: 0.7}))  # its own kind and exits
        wait_until(delivered(hub, lambda: runner.plan.cut == 4), timeout=15, what="the third decision applied")
        assert dict(runner.plan.thresholds) == {4: 0.6, 7: 0.7} and link.kept_thresholds == 2
