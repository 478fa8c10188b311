"""Embedded controller with a real node: real offloads feed the estimator, plans change
under load with every request answered once under the epoch it ran with, a low simulated
battery moves the plan, and probing sees the link while everything runs on the device."""

import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from edgesplit.runtime.control.battery import SimulatedBattery
from edgesplit.runtime.control.controller import EmbeddedController
from edgesplit.runtime.control.estimators import LinkEstimator
from edgesplit.runtime.control.policy import BatteryAware, LeastEnergy, LeastLatency, PlanSpace, State
from edgesplit.runtime.device.runner import WHERE_DEVICE, WHERE_EDGE, DeviceRunner
from edgesplit.runtime.device.slowed import slowed
from edgesplit.runtime.metrics import DeviceMetrics
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.transport.client import EdgeClient
from tests.helpers import CheckedThread, wait_until


@pytest.fixture(scope="module")
def space(node):
    model, _ = node
    return PlanSpace.for_model(model, device_quota=0.05, repeats=2, codecs=("fp32", "int8"))


def runner_for(model, running, plan=None):
    client = EdgeClient(running.address)
    metrics = DeviceMetrics(CollectorRegistry())
    return DeviceRunner(model, plan=plan or Plan(cut=4, codec="fp32"), client=client, deadline_s=5.0,
                        metrics=metrics), client


def test_plans_change_under_load_and_every_answer_carries_its_plans_epoch(node, space):
    model, running = node
    runner, client = runner_for(model, running)
    # The space plays a 0.05-core device; learning its time from answers run at this host's
    # speed would make it 20x faster than its profile: off here, so each forced decision
    # follows the link set below.
    controller = EmbeddedController(runner, space, LeastLatency(), every=1000, learn_device_time=False)
    controller.deciding = False  # decisions forced below only, not by what the answers measure
    epochs = {0: runner.plan}
    lock = threading.Lock()
    stop = threading.Event()
    x = torch.randn(1, 1, 28, 28)
    answers = []
    sent = [0] * 4

    def load(i):
        # Until the flips are done (a fixed count of requests ran out before the fourth flip
        # in one CI run of three: the answers came faster than the deciding thread got the GIL).
        while not stop.is_set():
            sent[i] += 1
            answer = runner.infer(x)
            with lock:
                answers.append(answer)

    workers = [CheckedThread(lambda i=i: load(i), name=f"load{i}") for i in range(4)]
    try:
        for w in workers:
            w.start()
        # Alternate a hopeless link and a perfect one: the policy must swap device and edge
        # plans while the requests run, each plan answering a few requests before the next.
        for flip in range(8):
            est = controller.estimator
            est.bandwidth_mbit, est.rtt_s = (0.001, 5.0) if flip % 2 == 0 else (1000.0, 0.0001)
            plan = controller.decide()
            assert plan is not None, f"flip {flip}: the link moved, the plan did not"
            epochs[plan.epoch] = plan
            wait_until(lambda epoch=plan.epoch: sum(a.epoch == epoch for a in list(answers)) >= 3, timeout=30,
                       what=f"answers under plan {plan.epoch}")
        stop.set()
        for w in workers:
            w.result(timeout=120)
        assert len(answers) == sum(sent) and len({a.request_id for a in answers}) == len(answers)
        for a in answers:
            plan = epochs[a.epoch]
            assert a.cut == plan.cut
            assert (a.where == WHERE_EDGE) == (plan.cut < model.num_blocks and a.exit == "final"
                                                and a.offload_error is None)
        assert {a.epoch for a in answers} >= set(epochs) - {0}
        assert {a.where for a in answers} >= {WHERE_EDGE, WHERE_DEVICE}
        assert [d.epoch for d in controller.decisions] == sorted(d.epoch for d in controller.decisions)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)  # a failure above is the one reported; the workers only stop here
        controller.close()
        client.close()


def test_the_decision_log_keeps_only_the_latest_history_and_counts_them_all(node, space):
    model, running = node
    runner, client = runner_for(model, running)
    controller = EmbeddedController(runner, space, LeastLatency(), every=1000, history=3)
    try:
        epochs = []
        for flip in range(8):  # a hopeless link, then a perfect one: every decide() changes the plan
            est = controller.estimator
            est.bandwidth_mbit, est.rtt_s = (0.001, 5.0) if flip % 2 == 0 else (1000.0, 0.0001)
            plan = controller.decide()
            if plan is not None:
                epochs.append(plan.epoch)
        assert len(epochs) >= 6, "the plan must have changed on most flips"
        assert controller.decision_count == len(epochs)
        assert [d.epoch for d in controller.decisions] == epochs[-3:]
        assert [d.epoch for d in controller.decisions_since(len(epochs) - 1)] == epochs[-1:]
        assert [d.epoch for d in controller.decisions_since(0)] == epochs[-3:]  # older ones are gone
        assert controller.decisions_since(len(epochs)) == []
        with pytest.raises(ValueError, match="history"):
            EmbeddedController(runner, space, LeastLatency(), history=0)
    finally:
        controller.close()
        client.close()


def test_a_low_battery_moves_the_plan_to_less_device_energy(node, space):
    model, running = node
    runner, client = runner_for(model, running, Plan(cut=model.num_blocks, codec="fp32"))
    battery = SimulatedBattery(capacity_j=2.0, level=0.35)
    # A link on which the 784-byte image (and its answer) takes twice as long to send as the
    # device needs to run everything (about 60 ms at 0.05 of a core, by this host's profile):
    # slower than staying, but sending costs the device far less energy.
    mbit = 8 * (784 + 40) / (2 * space.device_seconds(model.num_blocks)) / 1e6
    estimator = LinkEstimator(initial_mbit=mbit, initial_rtt_s=0.02)
    policy = BatteryAware(mains=LeastLatency(), saving=LeastEnergy(slo_s=1.0), low_level=0.3)
    # The space plays a 0.05-core device; the runner runs at this host's speed, so learning
    # the device's time from its answers would undo the simulation: off here.
    controller = EmbeddedController(runner, space, policy, estimator=estimator, battery=battery, every=1,
                                    clock=iter(range(10_000)).__next__, learn_device_time=False)
    try:
        first = controller.decide() or runner.plan
        mains_option = controller.current
        assert first.cut == model.num_blocks  # on mains: the fastest plan, all on the device
        x = torch.randn(1, 1, 28, 28)
        for _ in range(200):
            runner.infer(x)
            if battery.reading(controller.clock()).level < 0.3:
                break
        controller.estimator.bandwidth_mbit, controller.estimator.rtt_s = mbit, 0.02  # same link as before
        controller.decide()
        saving = controller.current
        assert battery.reading(controller.clock()).level < 0.3
        assert saving.energy_j < mains_option.energy_j, (saving, mains_option)
        assert runner.plan.cut != first.cut or runner.plan.codec != first.codec
        metrics = runner.metrics.registry
        assert metrics.get_sample_value("edgesplit_device_battery_ratio") < 0.3
        assert metrics.get_sample_value("edgesplit_device_controller_decisions_total") >= 1
    finally:
        controller.close()
        client.close()


def test_probing_measures_the_link_while_everything_runs_on_the_device(node, space):
    model, running = node
    runner, client = runner_for(model, running, Plan(cut=model.num_blocks))
    controller = EmbeddedController(runner, space, LeastLatency(), estimator=LinkEstimator(initial_mbit=0.001))
    try:
        assert controller.estimator.samples == 0
        assert controller.probe(timeout=10)
        assert controller.estimator.samples == 1  # far above the guess: not taken alone
        assert controller.probe(timeout=10) and controller.probe(timeout=10)
        assert controller.estimator.samples == 3 and controller.estimator.bandwidth_mbit > 0.001
    finally:
        controller.close()
        client.close()


class LateReader(EdgeClient):
    """A node client on a device too busy to read the second answer of a probe on time (its
    round trip reads ``late_s`` longer). ``stamps``: "keep" the node's arrival stamps, "drop"
    them (as from a server that sends none), "lie" (the second stamped 1000 s late), "two
    clocks" (the second stamped by another clock, as by another node behind one address), or
    "half" (the second's clock named but its stamp missing)."""

    def __init__(self, target, late_s, stamps="keep"):
        super().__init__(target)
        self.late_s, self.stamps, self.calls = late_s, stamps, 0

    def infer_async(self, *args, **kwargs):
        pending = super().infer_async(*args, **kwargs)
        self.calls += 1
        second = self.calls % 2 == 0
        answer = pending.result

        def result():
            r = answer()
            if second:
                r.round_trip_seconds += self.late_s
                if self.stamps == "lie":
                    r.edge_arrival_s += 1000.0
                if self.stamps == "two clocks":
                    r.edge_clock = "another"
                if self.stamps == "half":
                    r.edge_arrival_s = None
            if self.stamps == "drop":
                r.edge_arrival_s = None
            return r

        pending.result = result
        return pending


def test_a_probe_times_the_link_by_the_nodes_arrival_stamps_not_when_the_device_reads_the_answers(node, space):
    """Under a CPU quota a device reads an answer late when its own request is computing:
    probes timed from the answers read 0.5-0.75 of a 2-6 Mbit/s link and held the controller
    on the device. Timed from when the node saw the two requests arrive, they read the link;
    a node's stamps cannot make it look slower than the device's own round trips show."""
    from edgesplit.linksim import LinkEmulatorThread, LinkSettings

    model, running = node
    host, port = running.address.rsplit(":", 1)
    readings = {}
    with LinkEmulatorThread(host, int(port), settings=LinkSettings(rate_mbps=4.0)) as link:
        for stamps, late_s in (("keep", 0.15), ("drop", 0.15), ("two clocks", 0.15), ("half", 0.15),
                               ("lie", 0.0)):
            client = LateReader(f"127.0.0.1:{link.port}", late_s=late_s, stamps=stamps)
            runner = DeviceRunner(model, plan=Plan(cut=model.num_blocks), client=client, deadline_s=5.0)
            controller = EmbeddedController(runner, space, LeastLatency(),
                                            estimator=LinkEstimator(initial_mbit=4.0, initial_rtt_s=0.001))
            try:
                # the connection up first: a probe that opened it is sent again
                wait_until(lambda c=client: c.connected, timeout=30, what="the connection through the link")
                for _ in range(3):
                    assert controller.probe(timeout=10)
                assert client.calls == 6 and controller.estimator.samples == 3
                readings[stamps] = controller.estimator.bandwidth_mbit
            finally:
                controller.close()
                client.close()
    # the fp32 probe is 25 kB: 50 ms at 4 Mbit/s (read about 3.8), 200 ms when read 150 ms
    # late (about 1.0)
    assert 2.6 < readings["keep"] < 4.6, readings
    for unusable in ("drop", "two clocks", "half"):  # the answers' own timing, read late
        assert readings[unusable] < 0.6 * readings["keep"], readings
    # a gap no longer than the second's round trip (both probes, about 65 ms): about 3, where
    # the lie taken whole would read 0.0002
    assert readings["lie"] > 0.25 * readings["keep"], readings


def test_offloads_that_miss_their_deadline_on_a_collapsed_link_move_the_plan_to_the_device(node, space):
    from edgesplit.linksim import LinkEmulatorThread, LinkSettings

    model, running = node
    host, port = running.address.rsplit(":", 1)
    with LinkEmulatorThread(host, int(port), settings=LinkSettings(rate_mbps=0.02)) as link:
        client = EdgeClient(f"127.0.0.1:{link.port}")
        runner = DeviceRunner(model, plan=Plan(cut=4, codec="int8"), client=client, deadline_s=0.3)
        # believes in a fast link, so it starts offloading 12.5 kB per request
        controller = EmbeddedController(runner, space, LeastLatency(), every=1000, learn_device_time=False,
                                        estimator=LinkEstimator(initial_mbit=50.0, initial_rtt_s=0.001))
        try:
            # the connection up first: a timeout on a call that had to open it teaches nothing
            wait_until(lambda: client.connected, timeout=30, what="the connection through the slow link")
            assert controller.decide() is None or runner.plan.cut < model.num_blocks
            x = torch.randn(1, 1, 28, 28)
            offloading = runner.plan
            answer = runner.infer(x)
            assert answer.where == "device-fallback" and answer.offload_error.startswith("DEADLINE_EXCEEDED")
            assert answer.attempted_bytes >= model.cut_points()[0].numel  # the image, a byte a pixel or more
            assert controller.estimator.bandwidth_mbit < 1.0  # 0.3 s without getting the image through
            # the drop made it decide at once, not after `every` answers: nothing crosses the dead link
            assert runner.plan.cut == model.num_blocks and runner.plan.epoch > offloading.epoch
            assert controller.decisions[-1].bandwidth_mbit < 1.0
            assert runner.infer(x).where == "device"
        finally:
            controller.close()
            client.close()


@pytest.fixture(scope="module")
def host_space(node):
    """A space whose device profile is this host at full speed (a profile that flatters a slow device)."""
    model, _ = node
    return PlanSpace.for_model(model, device_quota=1.0, repeats=3, codecs=("int8",))


@pytest.mark.parametrize("learn", [True, False])
def test_a_device_slower_than_its_profile_is_learned_from_its_answers_and_the_plan_moves(node, host_space, learn):
    model, running = node
    last = model.num_blocks
    runner, client = runner_for(slowed(model, 0.1), running, Plan(cut=last, codec="int8"))
    # 2 Mbit/s, 2 ms: by the profile all on the device wins (no transfer, same speed as the
    # edge); at a tenth of the speed sending the 784-byte image wins.
    controller = EmbeddedController(runner, host_space, LeastLatency(), every=1, learn_device_time=learn,
                                    estimator=LinkEstimator(initial_mbit=2.0, initial_rtt_s=0.002))
    try:
        assert controller.decide() is None and runner.plan.cut == last
        x = torch.randn(1, 1, 28, 28)
        answers = [runner.infer(x) for _ in range(6)]
        assert answers[0].where == WHERE_DEVICE
        if learn:
            assert controller.device_times.scale(last) > 4  # about 10, clamped at 8
            assert runner.plan.cut < last and controller.decisions
            assert any(a.where == WHERE_EDGE for a in answers)
            scale = runner.metrics.registry.get_sample_value("edgesplit_device_time_scale_ratio")
            assert scale is not None and scale > 0
        else:
            assert runner.plan.cut == last and not controller.decisions
            assert all(a.where == WHERE_DEVICE for a in answers)
    finally:
        controller.close()
        client.close()


def test_probes_that_change_nothing_come_less_and_less_often(node, host_space):
    model, running = node
    runner, client = runner_for(model, running, Plan(cut=model.num_blocks, codec="int8"))
    # Device and edge profiled alike: offloading only adds the link, so no probe can move the plan.
    controller = EmbeddedController(runner, host_space, LeastLatency(), probe_interval_s=0.04,
                                    max_probe_interval_s=0.32, learn_device_time=False)
    try:
        controller.decide()
        waits = []
        controller.start_probing()
        for n in range(1, 5):
            wait_until(lambda n=n: controller.probes >= n, timeout=20)
            waits.append(controller.probe_wait_s)
        assert not controller.decisions or all(d.cut == model.num_blocks for d in controller.decisions)
        assert controller.estimator.samples >= 3  # the probes measured the link
        assert waits[-1] == 0.32 and waits == sorted(waits), waits
        # A plan made elsewhere (a cluster controller) resets the interval, and while this
        # device follows one it keeps probing at the base interval: its telemetry is what
        # that controller decides on.
        controller.deciding = False
        runner.set_plan(runner.plan.with_changes(codec="fp32"))
        seen = controller.probes
        wait_until(lambda: controller.probes >= seen + 3, timeout=20)
        assert controller.probe_wait_s == 0.04
    finally:
        controller.close()
        client.close()


def test_a_probe_that_reads_the_link_far_from_the_estimate_is_confirmed_at_the_base_interval(node, host_space):
    model, running = node
    runner, client = runner_for(model, running, Plan(cut=model.num_blocks, codec="int8"))
    now = [1000.0]  # the controller's clock, moved by hand: the probe loop decides on it
    # An estimate of 0.01 Mbit/s: loopback reads thousands of times faster, a rise the
    # estimator takes only when a second reading agrees.
    controller = EmbeddedController(runner, host_space, LeastLatency(), probe_interval_s=1.0,
                                    max_probe_interval_s=8.0, learn_device_time=False, clock=lambda: now[0],
                                    estimator=LinkEstimator(initial_mbit=0.01, initial_rtt_s=0.01))
    try:
        controller.probe_wait_s = 8.0  # backed off: probes changed nothing for a while
        controller.start_probing(at_once=False)
        now[0] += 8.5
        wait_until(lambda: controller.probes >= 1, timeout=20)
        wait_until(lambda: controller.estimator.samples >= 1, timeout=20)
        assert controller.estimator.unconfirmed and controller.estimator.rises == 0
        now[0] += 1.5  # past the base interval, far short of the 8 s back-off
        wait_until(lambda: controller.probes >= 2, timeout=20)
        wait_until(lambda: controller.estimator.rises == 1, timeout=20)  # the second reading confirmed it
        assert controller.estimator.bandwidth_mbit > 1.0 and not controller.estimator.unconfirmed
    finally:
        controller.close()
        client.close()


def test_the_first_probe_comes_at_once_and_the_first_plan_rests_on_it(node, space):
    from edgesplit.linksim import LinkEmulatorThread, LinkSettings

    model, running = node
    host, port = running.address.rsplit(":", 1)
    now = [1000.0]  # the controller's clock, never moved: no probe interval ever passes
    with LinkEmulatorThread(host, int(port), settings=LinkSettings(rate_mbps=2.0)) as link:
        client = EdgeClient(f"127.0.0.1:{link.port}")
        runner = DeviceRunner(model, plan=Plan(cut=model.num_blocks, codec="int8"), client=client, deadline_s=5.0)
        # A guess of 1.5 Mbit/s on a 2 Mbit/s link: a reading within twice the guess replaces it.
        controller = EmbeddedController(runner, space, LeastLatency(), probe_interval_s=2.0,
                                        learn_device_time=False, clock=lambda: now[0],
                                        estimator=LinkEstimator(initial_mbit=1.5, initial_rtt_s=0.01))
        try:
            controller.start_probing()
            wait_until(lambda: controller.estimator.samples >= 1, timeout=30, what="a probe at once")
            assert controller.probes == 1
            assert controller.estimator.bandwidth_mbit == pytest.approx(2.0, rel=0.25)
            checks = controller.probe_checks
            wait_until(lambda: controller.probe_checks >= checks + 2, timeout=60)
            assert controller.probes == 1  # then only after the (never reached) interval
            if controller.decisions:  # the plan made after the probe rests on its reading
                assert controller.decisions[-1].bandwidth_mbit == pytest.approx(2.0, rel=0.25)
        finally:
            controller.close()
            client.close()


def test_no_probes_while_every_request_offloads_however_sparse(node, host_space):
    model, running = node
    runner, client = runner_for(model, running, Plan(cut=4, codec="int8"))
    now = [1000.0]  # the controller's clock, moved by hand: the probe loop decides on it
    controller = EmbeddedController(runner, host_space, LeastLatency(), probe_interval_s=0.04, every=10**9,
                                    learn_device_time=False, clock=lambda: now[0])
    controller.deciding = False  # the plan stays at cut 4: this test is about probing only
    try:
        controller.start_probing()  # at the start nothing was offloaded yet: a probe may come
        wait_until(lambda: controller.probe_checks >= 1, timeout=20)
        assert runner.infer(torch.randn(1, 1, 28, 28)).where == WHERE_EDGE
        probes = controller.probes
        now[0] += 60.0  # a minute without a request: sparse requests, each of them offloaded
        checks = controller.probe_checks
        wait_until(lambda: controller.probe_checks >= checks + 5, timeout=20)
        assert controller.probes == probes  # the next request measures the link itself
        # One answer given on the device (the plan moved there): now the link goes unobserved.
        runner.set_plan(Plan(cut=model.num_blocks, codec="int8", epoch=runner.plan.epoch + 1))
        assert runner.infer(torch.randn(1, 1, 28, 28)).where == WHERE_DEVICE
        now[0] += 60.0
        wait_until(lambda: controller.probes > probes, timeout=20, what="a probe once nothing is offloaded")
    finally:
        controller.close()
        client.close()


def test_a_due_probe_waits_for_the_runners_next_answer_and_goes_right_after_it(node, host_space):
    model, running = node
    runner, client = runner_for(model, running, Plan(cut=model.num_blocks, codec="int8"))
    now = [1000.0]  # the controller's clock, moved by hand: the probe loop decides on it
    # An 8 s interval: the loop looks every 2 s, and a due probe waits up to 8 s for an answer.
    controller = EmbeddedController(runner, host_space, LeastLatency(), probe_interval_s=8.0, every=10**9,
                                    learn_device_time=False, clock=lambda: now[0])
    controller.deciding = False  # this test is about probing only
    x = torch.randn(1, 1, 28, 28)
    try:
        controller.start_probing(at_once=False)
        assert runner.infer(x).where == WHERE_DEVICE  # the link goes unobserved
        now[0] += 60.0  # a probe is due
        wait_until(lambda: controller.awaiting_answer, timeout=20, what="the due probe waiting for an answer")
        assert controller.probes == 0  # not sent in the middle of whatever the device is doing
        assert runner.infer(x).where == WHERE_DEVICE
        wait_until(lambda: controller.probes == 1, timeout=20, what="the probe right after the answer")
        wait_until(lambda: controller.estimator.samples >= 1, timeout=20, what="the probe's reading")
        assert controller.last_wait_answered is True  # it went on the answer, not on the 8 s bound
        # An answer that offloaded measured the link itself: the due probe is not sent.
        now[0] += 60.0
        wait_until(lambda: controller.awaiting_answer, timeout=20, what="the next due probe waiting")
        runner.set_plan(Plan(cut=4, codec="int8", epoch=runner.plan.epoch + 1))
        assert runner.infer(x).where == WHERE_EDGE
        checks = controller.probe_checks
        wait_until(lambda: controller.probe_checks >= checks + 2, timeout=20)
        assert controller.probes == 1
    finally:
        controller.close()
        client.close()


def test_local_completions_after_failed_offloads_teach_nothing_about_the_device(node, host_space):
    import socket

    model, _ = node
    with socket.socket() as s:  # a port nobody listens on: every offload is refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = EdgeClient(dead)
    runner = DeviceRunner(model, plan=Plan(cut=4, codec="int8"), client=client, deadline_s=2.0)
    controller = EmbeddedController(runner, host_space, LeastLatency(), every=1000)
    controller.deciding = False
    try:
        answers = [runner.infer(torch.randn(1, 1, 28, 28)) for _ in range(4)]
        assert all(a.where == "device-fallback" for a in answers)  # answered, each once
        assert controller.device_times.samples == 0  # the head plus a local tail is not the plan's path
        runner.set_plan(Plan(cut=model.num_blocks, codec="int8", epoch=runner.plan.epoch + 1))
        runner.infer(torch.randn(1, 1, 28, 28))
        assert controller.device_times.samples == 1
    finally:
        controller.close()
        client.close()


def stretched_model(model, head_extra_s: float, tail_extra_s: float, cut: int):
    """``model`` without exits whose blocks before ``cut`` sleep ``head_extra_s`` each and
    whose blocks from ``cut`` on sleep ``tail_extra_s`` each (a device slow in its tail only)."""
    from edgesplit.models.split_model import SplitModel
    from edgesplit.runtime.device.slowed import Stretched

    blocks = [(name, Stretched(block, head_extra_s if i < cut else tail_extra_s))
              for i, (name, block) in enumerate(zip(model.block_names, model.blocks))]
    return SplitModel(model.name, blocks, {}, model.input_shape, model.num_classes).eval()


def slow_tail_device(node):
    """A runner all on the device of a model slow only in its last block (10x its 2 ms
    profile), a space choosing between cut 10 (the block before) and all on the device, and
    its client: (runner, client, space, cut, last)."""
    from edgesplit.partitioner.profile import Profile

    model, running = node
    last, cut = model.num_blocks, model.num_blocks - 1
    block_s = 0.002
    device = stretched_model(model, block_s, 10 * block_s, cut)
    names = list(model.block_names)
    profile = Profile(model.name, "device", torch.__version__, 1, 1, names, {1: [block_s] * len(names)})
    edge = Profile(model.name, "edge", torch.__version__, 1, 1, names, {1: [0.0001] * len(names)})
    shapes = [c.shape for c in model.cut_points()[:-1]] + [(model.num_classes,)]
    space = PlanSpace(profile, edge, shapes, codecs=("int8",), allowed_cuts=[cut, last])
    runner, client = runner_for(device, running, Plan(cut=last, codec="int8"))
    return runner, client, space, cut, last


@pytest.mark.parametrize("margin, probe_decides", [(0.25, False), (0.0, False), (0.25, True)])
def test_a_cut_the_profile_gets_wrong_is_explored_and_the_plan_moves_to_it(node, margin, probe_decides):
    """The device is slow only in its last block, so the ratio learned all on the device
    (about 1.8) wrongly inflates the head of cut 10, which then looks a little worse than
    staying; two trial requests at cut 10 learn its own ratio (about 1) and the plan moves.

    ``probe_decides``: a decision from outside the answers (the probe thread decides after
    each probe) while the trial runs leaves the trial plan in force. It used to put the
    policy's plan back before the trial had an answer: in a benchmark run 9 of 17 trials
    got 0 or 1 of their 2 answers, and taught nothing."""
    runner, client, space, cut, last = slow_tail_device(node)
    # 4 Mbit/s and 2 ms: cut 10's 3,136 bytes cost about 8 ms, so with the head scaled by
    # the ratio learned all on the device cut 10 is predicted about 10 % slower than staying.
    controller = EmbeddedController(runner, space, LeastLatency(), every=1, explore_margin=margin,
                                    explore_every=4, estimator=LinkEstimator(initial_mbit=4.0, initial_rtt_s=0.002))
    try:
        x = torch.randn(1, 1, 28, 28)
        answers, interrupted = [], 0
        for _ in range(12):
            answers.append(runner.infer(x))
            if probe_decides and controller._trial is not None:
                epoch = runner.plan.epoch
                assert controller.decide() is None and runner.plan.epoch == epoch
                interrupted += 1
        assert interrupted or not probe_decides, "no trial was running to interrupt"
        staying = controller.device_times.scale(last)
        assert 1.3 < staying < 3, staying  # the last block sleeps 10x its profile
        if margin:
            trials = [d for d in controller.decisions if d.explore]
            assert trials and trials[0].cut == cut and controller.explorations >= 1
            assert controller.device_times.scale(cut) < 0.75 * staying  # its own ratio, learned
            assert runner.plan.cut == cut  # and the policy then chose it
            assert answers[-1].where == WHERE_EDGE and answers[-1].cut == cut
            # the trial's answers carried the trial plan's epoch
            assert any(a.epoch == trials[0].epoch and a.cut == cut for a in answers)
        else:
            assert runner.plan.cut == last and not controller.decisions and controller.explorations == 0
            assert all(a.where == WHERE_DEVICE for a in answers)
    finally:
        controller.close()
        client.close()


def test_the_policy_sees_a_short_heads_slowdown_carried_to_longer_runs_as_the_time_it_added(node):
    """Cut 10 (the short head) ran 1.65x its profile; all on the device, not run, is predicted
    with that time added rather than 1.65x over, as is the local tail a non-racing offload
    deadline allows for; a speed-up at the short head carries nothing to the longer run, one
    of the whole model carries to the head."""
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    runner, client, space, cut, last = slow_tail_device(node)
    head_s, whole_s = space.device_seconds(cut), space.device_seconds(last)
    slow = DeviceTimeEstimator()
    for _ in range(4):
        slow.observe(cut, 1.65 * head_s, head_s)
    controller = EmbeddedController(runner, space, LeastLatency(), device_times=slow, explore_margin=0)
    try:
        state = controller.state()
        assert state.device_scales == {cut: pytest.approx(1.65)} and cut not in state.unseen_scales
        assert state.device_scale == pytest.approx(1.65)
        assert state.device_scale_at(last) == pytest.approx(1 + 0.65 * head_s / whole_s)
        assert state.device_scale_at(last) < 1.6
        (device_only,) = [o for o in space.options(state) if o.cut == last]
        assert device_only.latency_s == pytest.approx(whole_s + 0.65 * head_s)
        fast = DeviceTimeEstimator()
        for _ in range(4):
            fast.observe(cut, 0.5 * head_s, head_s)
        controller.device_times = fast
        state = controller.state()
        assert state.device_scale_at(last) == 1.0 == state.device_scale
        assert all(scale == 1.0 for c, scale in state.unseen_scales.items() if space.device_seconds(c) >= head_s)
        whole_fast = DeviceTimeEstimator()  # the whole model at 0.8: the shorter head is predicted so too
        for _ in range(4):
            whole_fast.observe(last, 0.8 * whole_s, whole_s)
        controller.device_times = whole_fast
        assert controller.state().device_scale_at(cut) == pytest.approx(0.8)
    finally:
        controller.close()
        client.close()


def test_a_move_of_the_link_already_decided_on_does_not_end_the_trial_it_started(node):
    """The probe thread saw the link move and decided, starting a trial; the next answer (a
    request of the plan before, in flight meanwhile) must not count that move again and put
    the policy's plan back before the trial had an answer."""
    runner, client, space, cut, last = slow_tail_device(node)
    controller = EmbeddedController(runner, space, LeastLatency(), every=1000, explore_every=1,
                                    estimator=LinkEstimator(initial_mbit=4.0, initial_rtt_s=0.002))
    try:
        x = torch.randn(1, 1, 28, 28)
        answers = [runner.infer(x) for _ in range(3)]  # all on the device: its ratio learned, no decision
        assert not controller.decisions and last in controller.device_times.scales()
        controller.estimator.rises += 1  # what a probe's reading of a risen link counts
        controller.decide()  # the probe thread's decision: a trial of cut 10
        (trial,) = controller.decisions
        assert trial.explore and trial.cut == cut and runner.plan.epoch == trial.epoch
        controller.observe(answers[-1])  # an answer of the plan before, in flight meanwhile
        assert runner.plan.epoch == trial.epoch and len(controller.decisions) == 1  # the trial goes on
        trial_answers = [runner.infer(x) for _ in range(controller.device_times.min_samples)]
        assert all(a.epoch == trial.epoch and a.cut == cut for a in trial_answers)
        assert controller._trial is None and cut in controller.device_times.scales()  # ended by its answers
    finally:
        controller.close()
        client.close()


def test_a_trial_that_teaches_nothing_is_not_repeated_at_that_cut(node):
    """The device sleeps a fixed time per block (2 ms each up to cut 8, 0.5 ms after) and its
    profile says so, so the plans compare the same whatever this host's speed: on a link
    whose round trip puts the best offload (cut 8) 20 % behind staying at the profile's
    speed, staying wins while the device runs 1-3x its profile (here about 1.4x: the sleeps
    overshoot and the blocks compute too), and cut 8 at least is within the 25 % a trial
    needs. Every trial's offload falls back at once (nobody listens), teaching nothing."""
    import socket

    from edgesplit.models.split_model import SplitModel
    from edgesplit.partitioner.profile import Profile
    from edgesplit.runtime.device.slowed import Stretched

    model, _ = node
    last = model.num_blocks
    block_s = [0.002 if i < 8 else 0.0005 for i in range(last)]
    device = SplitModel(model.name, [(name, Stretched(block, extra)) for name, block, extra in
                                     zip(model.block_names, model.blocks, block_s)],
                        {}, model.input_shape, model.num_classes).eval()
    names = list(model.block_names)
    space = PlanSpace(Profile(model.name, "device", torch.__version__, 1, 1, names, {1: block_s}),
                      Profile(model.name, "edge", torch.__version__, 1, 1, names, {1: [0.0001] * last}),
                      [c.shape for c in model.cut_points()[:-1]] + [(model.num_classes,)],
                      codecs=("int8",), allowed_cuts=[8, 9, 10, last])
    with socket.socket() as s:  # a port nobody listens on: every trial's offload falls back at once
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    client = EdgeClient(dead)
    runner = DeviceRunner(device, plan=Plan(cut=last, codec="int8"), client=client, deadline_s=2.0)
    x = torch.randn(1, 1, 28, 28)
    stay = min(o.latency_s for o in space.options(State(100.0, 0.0)) if o.cut == last)
    nearest = min(o.latency_s for o in space.options(State(100.0, 0.0)) if o.cut != last)
    rtt = 1.2 * stay - nearest
    assert rtt > 0.001
    controller = EmbeddedController(runner, space, LeastLatency(), every=1, explore_every=2,
                                    estimator=LinkEstimator(initial_mbit=100.0, initial_rtt_s=rtt))
    try:
        answers = [runner.infer(x) for _ in range(30)]  # a barren cut may be tried again after 32 (max_stale_after)
        assert len(answers) == 30 and all(a.prediction is not None for a in answers)  # each answered once
        assert runner.plan.cut == model.num_blocks  # the policy never chose to offload
        trials = [d.cut for d in controller.decisions if d.explore]
        assert trials, "no cut was close enough to try"
        assert len(trials) == len(set(trials)), trials  # none tried twice: each taught nothing
        assert set(trials) <= set(controller._barren)
        assert all(c not in controller.device_times.scales() for c in trials)
    finally:
        controller.close()
        client.close()


def test_a_plan_the_controller_makes_gives_up_on_a_collapsed_link_at_its_own_deadline(node, space):
    """The runner's deadline is 30 s; the controller's plans carry one from their prediction
    (patience x the predicted offload + the local tail), so after the link collapses each
    request completes on the device once that deadline has passed, and within three such
    requests the plan moves off the link (the estimator's window held good offloads first)."""
    from edgesplit.linksim import LinkEmulatorThread, LinkSettings

    model, running = node
    host, port = running.address.rsplit(":", 1)
    with LinkEmulatorThread(host, int(port), settings=LinkSettings(rate_mbps=5.0)) as link:
        client = EdgeClient(f"127.0.0.1:{link.port}")
        runner = DeviceRunner(model, plan=Plan(cut=model.num_blocks, codec="int8"), client=client, deadline_s=30.0)
        controller = EmbeddedController(runner, space, LeastLatency(), every=1000, learn_device_time=False,
                                        estimator=LinkEstimator(initial_mbit=5.0, initial_rtt_s=0.001),
                                        offload_patience=2.0)
        x = torch.randn(1, 1, 28, 28)
        try:
            plan = controller.decide()
            assert plan is not None and plan.cut < model.num_blocks  # a 5 Mbit/s link: offload
            option = controller.current
            wanted = 2.0 * option.remote_s  # the runner races a late offload: no tail added
            expected = max(controller.min_offload_deadline_s, wanted)
            assert plan.offload_deadline_s == pytest.approx(expected) and plan.offload_deadline_s < 1.0
            assert controller.decisions[-1].offload_deadline_s == plan.offload_deadline_s
            for _ in range(4):
                assert runner.infer(x).where == "edge"
            assert controller.estimator.samples >= 3 and runner.plan.cut < model.num_blocks
            link.update(rate_mbps=0.005)  # 784 bytes now take 1.25 s
            missed, refused = 0, 0
            started = time.monotonic()
            while runner.plan.cut < model.num_blocks and missed < 5 and time.monotonic() - started < 15:
                deadline = runner.plan.offload_deadline_s
                answer = runner.infer(x)
                assert answer.where == "device-fallback"
                if answer.offload_error.startswith("CIRCUIT_OPEN"):  # two misses in a row open the breaker
                    refused += 1
                    continue
                assert answer.offload_error.startswith("DEADLINE_EXCEEDED")
                missed += 1
                # it gave up at the plan's deadline, not the runner's 30 s, nor the 1.25 s the bytes need
                assert deadline * 0.9 <= answer.latency.transfer < 1.2
            # each miss bounds the rate far below the estimate: the third is a sharp drop
            assert 1 <= missed <= 3 and runner.plan.cut == model.num_blocks
            assert runner.plan.offload_deadline_s is None  # all on the device offloads nothing
        finally:
            controller.close()
            client.close()


def test_a_plan_whose_option_stays_is_remade_when_the_deadline_it_wants_moves(trained_model):
    """Only the image can be sent here, so the option never changes; a hand-set plan has no
    deadline of its own and gets one, and a link 5,000x slower gets a longer one."""
    space = PlanSpace.for_model(trained_model, device_quota=0.05, repeats=2, codecs=("int8",), allowed_cuts=[0])
    runner = DeviceRunner(trained_model, plan=Plan(cut=0, codec="int8"), client=None)
    controller = EmbeddedController(runner, space, LeastLatency(), every=1000, learn_device_time=False,
                                    estimator=LinkEstimator(initial_mbit=50.0, initial_rtt_s=0.001))
    try:
        first = controller.decide()
        assert first is not None and first.cut == 0 and first.epoch == 1
        assert first.offload_deadline_s == pytest.approx(controller.min_offload_deadline_s)  # a fast link: the floor
        assert controller.decide() is None  # nothing moved
        controller.estimator = LinkEstimator(initial_mbit=0.01, initial_rtt_s=0.001)
        second = controller.decide()
        assert second is not None and (second.cut, second.codec) == (0, "int8") and second.epoch == 2
        sent = trained_model.cut_points()[0].numel  # the image, a byte a pixel
        assert second.offload_deadline_s > 2 * sent * 8 / 0.01e6  # twice the bytes' time at 0.01 Mbit/s
        assert controller.decisions[-1].offload_deadline_s == second.offload_deadline_s
        assert controller.decide() is None
    finally:
        controller.close()


def send_image_space(model) -> PlanSpace:
    """A space whose only offloading plan sends the image (cut 0)."""
    return PlanSpace.for_model(model, device_quota=0.05, repeats=2, codecs=("int8",), allowed_cuts=[0])


def send_image_plan(model, space: PlanSpace, race: bool, **controller_kwargs) -> tuple[float, float]:
    """The plan a controller makes in ``space`` over a 0.05 Mbit/s link: (its offload
    deadline, the predicted offload)."""
    runner = DeviceRunner(model, plan=Plan(cut=0, codec="int8"), client=None, race=race)
    controller = EmbeddedController(runner, space, LeastLatency(), every=1000,
                                    estimator=LinkEstimator(initial_mbit=0.05, initial_rtt_s=0.001),
                                    **controller_kwargs)
    try:
        plan = controller.decide()
        assert plan is not None and plan.cut == 0
        return plan.offload_deadline_s, controller.current.remote_s
    finally:
        controller.close()


def test_a_runner_that_does_not_race_gets_the_tail_added_to_its_deadline(trained_model):
    """Past the deadline a racing runner starts the tail and keeps the offload; one that does
    not race forfeits the offload, so it is given the tail's time on top."""
    space = send_image_space(trained_model)
    racing, remote = send_image_plan(trained_model, space, race=True, learn_device_time=False)
    abandoning, _ = send_image_plan(trained_model, space, race=False, learn_device_time=False)
    assert racing == pytest.approx(2.0 * remote)  # above the floor at 0.05 Mbit/s
    assert abandoning == pytest.approx(racing + space.local_tail_seconds(0))
    assert abandoning > racing


def test_a_fast_head_does_not_shorten_the_tail_a_non_racing_runners_deadline_allows(trained_model):
    """The head at the cut ran at 0.4 of its profile (under a quota: it fit one scheduler
    period); the tail after it is a different, longer run, timed by the scale of cuts not run."""
    from edgesplit.runtime.control.estimators import DeviceTimeEstimator

    space = send_image_space(trained_model)
    head_s = space.local_tail_seconds(0) / 4  # a head shorter than the tail
    learned = DeviceTimeEstimator(min_predicted_s=0.0)
    for _ in range(3):
        learned.observe(cut=0, observed_s=0.4 * head_s, predicted_s=head_s)
    assert learned.scales() == {0: pytest.approx(0.4)} and learned.unseen_scale() == 1.0
    deadline, remote = send_image_plan(trained_model, space, race=False, device_times=learned)
    assert deadline == pytest.approx(2.0 * remote + space.local_tail_seconds(0))


def test_without_patience_plans_carry_no_deadline_of_their_own(node, space):
    model, running = node
    runner, client = runner_for(model, running, Plan(cut=model.num_blocks, codec="int8"))
    controller = EmbeddedController(runner, space, LeastLatency(), every=1000, learn_device_time=False,
                                    estimator=LinkEstimator(initial_mbit=50.0, initial_rtt_s=0.001),
                                    offload_patience=None)
    try:
        plan = controller.decide()
        assert plan is not None and plan.cut < model.num_blocks and plan.offload_deadline_s is None
        assert runner.offload_deadline(0.0, plan.cut, plan) == runner.deadline_s
    finally:
        controller.close()
        client.close()
    with pytest.raises(ValueError, match="offload_patience"):
        EmbeddedController(runner, space, LeastLatency(), offload_patience=0.5)
    with pytest.raises(ValueError, match="min_offload_deadline_s"):
        EmbeddedController(runner, space, LeastLatency(), min_offload_deadline_s=0.0)


def test_the_machines_battery_is_read_at_most_once_per_read_interval(node, space, monkeypatch):
    from edgesplit.runtime.control import controller as controller_module
    from edgesplit.runtime.control.battery import BatteryReading

    model, _ = node
    reads = []

    def system_battery():
        reads.append(1)
        return BatteryReading(0.5 - 0.1 * len(reads), True)

    monkeypatch.setattr(controller_module, "system_battery", system_battery)
    now = [100.0]
    runner = DeviceRunner(model, plan=Plan(cut=model.num_blocks), client=None)
    controller = EmbeddedController(runner, space, LeastLatency(), clock=lambda: now[0])
    try:
        assert controller.state().battery_level == pytest.approx(0.4)
        for _ in range(20):
            controller.decide()
        now[0] += controller_module.SYSTEM_BATTERY_READ_S - 0.01
        assert controller.state().battery_level == pytest.approx(0.4) and len(reads) == 1
        now[0] += 0.02
        assert controller.state().battery_level == pytest.approx(0.3) and len(reads) == 2
        now[0] -= 60  # a clock that went back reads again rather than keeping a reading from the future
        controller.state()
        assert len(reads) == 3
    finally:
        controller.close()


def test_an_offload_that_opened_the_connection_does_not_time_the_link(node, space):
    """The demo's first offload took 180 ms against 13 predicted (the TCP and HTTP/2
    handshakes) and the device read its link as 30 times slower than it was."""
    model, running = node
    client = EdgeClient(running.address, connect_now=False)  # idle until the first call: it must connect
    runner = DeviceRunner(model, plan=Plan(cut=4, codec="int8"), client=client, deadline_s=10.0)
    controller = EmbeddedController(runner, space, LeastLatency(), every=10**9)
    x = torch.zeros(1, 1, 28, 28)
    try:
        assert not client.connected
        first = runner.infer(x)
        assert first.where == WHERE_EDGE and first.cold  # it opened the connection
        assert controller.estimator.samples == 0  # and taught the estimator nothing
        second = runner.infer(x)
        assert second.where == WHERE_EDGE and not second.cold
        assert controller.estimator.samples == 1
        eager = EdgeClient(running.address)  # the default: connecting from the start
        try:
            wait_until(lambda: eager.connected, timeout=30, what="the eager connection")
        finally:
            eager.close()
    finally:
        controller.close()
        client.close()


def test_an_attempt_that_opened_the_connection_and_timed_out_does_not_bound_the_link(node, space):
    from edgesplit.runtime.device.runner import WHERE_FALLBACK, Answer, Latency

    model, running = node
    runner, client = runner_for(model, running)
    controller = EmbeddedController(runner, space, LeastLatency(), every=10**9)
    try:
        def timed_out(cold: bool) -> Answer:
            return Answer(1, 0, 0.5, "final", WHERE_FALLBACK, Latency(device=0.001, transfer=0.2),
                          offload_error="DEADLINE_EXCEEDED", attempted_bytes=12544, cold=cold, cut=4)

        controller.observe(timed_out(cold=True))
        assert controller.estimator.samples == 0 and controller.estimator.bandwidth_mbit == 10.0
        controller.observe(timed_out(cold=False))
        assert controller.estimator.samples == 1 and controller.estimator.bandwidth_mbit < 1.0
    finally:
        controller.close()
        client.close()


def test_time_the_edge_takes_beyond_its_profile_is_learned_and_the_plan_moves_back_to_the_device(node, space):
    """In the controller benchmark a whole resnet_fm offload was predicted at 3.2 ms by the
    edge's in-process profile and took 5.9: the controller kept sending the image for a whole
    trace against a 4 ms device. Offloads' edge time beyond the profile now counts."""
    from edgesplit.runtime.control.controller import EDGE_EXTRA_MAX_AGE_S
    from edgesplit.runtime.device.runner import Answer, Latency

    model, running = node
    runner, client = runner_for(model, running, Plan(cut=0, codec="int8"))
    # a fast link: by the profiles alone sending the image beats the 0.05-core device
    now = [0.0]
    controller = EmbeddedController(runner, space, LeastLatency(), every=10**9, clock=lambda: now[0],
                                    estimator=LinkEstimator(initial_mbit=100.0, initial_rtt_s=0.001))
    try:
        def offloaded(edge_s: float, cold: bool = False) -> Answer:
            return Answer(1, 0, 0.9, "final", WHERE_EDGE, Latency(device=0.0002, transfer=0.0005, edge=edge_s),
                          sent_bytes=784, cut=0, epoch=runner.plan.epoch, cold=cold)

        def choice():
            state = controller.state()
            return controller.policy.choose(space.options(state), state)

        device_s = next(o.latency_s for o in space.options(controller.state())
                                          if o.cut == space.last)
        assert choice().cut == 0 and controller.edge_extra_s() == 0.0
        profiled = space.edge.segment_seconds(0, space.last)
        controller.observe(offloaded(profiled + 50.0, cold=True))  # opened the connection: not counted
        assert controller.edge_extra_s() == 0.0
        for extra in (0.0, 50.0, 2 * device_s):  # the median, not the mean nor the last
            controller.observe(offloaded(profiled + extra))
        assert controller.edge_extra_s() == pytest.approx(2 * device_s)
        controller.observe(offloaded(profiled / 2))  # faster than profiled counts as 0
        assert controller.edge_extra_s() == pytest.approx(device_s)  # median of 0, 0, 2d, 50
        for _ in range(16):  # the last 16 only
            controller.observe(offloaded(profiled + 2 * device_s))
        assert controller.edge_extra_s() == pytest.approx(2 * device_s)
        option = next(o for o in space.options(controller.state()) if o.cut == 0)
        assert option.remote_s >= 2 * device_s  # the offload's deadline is made from it
        assert controller.state().edge_wait_s == pytest.approx(2 * device_s)
        assert choice().cut == space.last  # waiting that long at the edge, the device is faster
        assert controller.decide() is not None and runner.plan.cut == space.last
        now[0] += EDGE_EXTRA_MAX_AGE_S + 1  # on the device nothing refreshes it: it is forgotten,
        assert controller.edge_extra_s() == 0.0 and choice().cut == 0  # and the edge is tried again
    finally:
        controller.close()
        client.close()
