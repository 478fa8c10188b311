"""Telemetry bus: garbage is counted and dropped, a late joiner gets the decision in force at
once, CURVE admits only listed clients that trust the controller, a device hears only its own
topic, and a flood is read in bounded batches."""

import time

import pytest
import zmq

from edgesplit.protos import telemetry_pb2
from edgesplit.runtime.control.bus import (
    ControllerSockets,
    CurveKeys,
    DecisionSubscriber,
    TelemetryPublisher,
    decision,
    wait_for_subscribers,
)
from tests.helpers import wait_until


def test_malformed_telemetry_is_counted_and_dropped_and_good_telemetry_still_arrives():
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    raw = ctx.socket(zmq.PUB)
    raw.connect(hub.telemetry_endpoint)
    pub = TelemetryPublisher(ctx, hub.telemetry_endpoint, "device/a")
    got = []
    try:
        def delivered():
            raw.send_multipart([b"telemetry", b"\xff\xff\xff not a protobuf"])
            raw.send_multipart([b"telemetry", b"x", b"three frames"])
            pub.publish(telemetry_pb2.Telemetry(link=telemetry_pb2.LinkObservation(bandwidth_mbit=3.0)))
            got.extend(hub.poll(0.1))
            return got and hub.malformed >= 2

        wait_until(delivered, timeout=10, what="telemetry through the bus")
        assert got[0].source == "device/a" and got[0].link.bandwidth_mbit == 3.0 and got[0].seq >= 1
    finally:
        for s in (raw, pub, hub):
            s.close()
        ctx.term()


def test_a_late_joiner_gets_the_decision_in_force_at_once():
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    hub.publish_decision(decision("cam1", epoch=7, cut=4, codec="int8", thresholds={4: 0.9}))
    late = DecisionSubscriber(ctx, hub.decision_endpoint, "cam1")
    other = DecisionSubscriber(ctx, hub.decision_endpoint, "cam2")
    try:
        wait_for_subscribers(hub, late, other)
        msg = late.receive(timeout_s=5)
        assert (msg.epoch, msg.cut, msg.codec, dict(msg.thresholds)) == (7, 4, "int8", {4: 0.9})
        assert other.receive(timeout_s=0.3) is None  # only its own topic
    finally:
        for s in (late, other, hub):
            s.close()
        ctx.term()


def test_curve_admits_only_listed_clients_that_trust_the_controller(tmp_path):
    server = CurveKeys.generate()
    server.save(tmp_path, "controller")
    assert oct((tmp_path / "controller.key_secret").stat().st_mode & 0o777) == "0o600"
    server = CurveKeys.load(tmp_path, "controller")
    good = CurveKeys.generate().client_of(server)
    good.save(tmp_path, "cam1")
    bad = CurveKeys.generate().client_of(CurveKeys.generate())  # trusts another server
    # Holds the controller's public key (every process is given it) but is not on the list:
    # CURVE alone let it in, and it received decisions and could send telemetry.
    stranger = CurveKeys.generate().client_of(server)
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", keys=server,
                            clients=CurveKeys.public_keys(tmp_path))
    hub.publish_decision(decision("d", epoch=1, cut=2, codec="fp16"))
    ok = DecisionSubscriber(ctx, hub.decision_endpoint, "d", keys=good)
    shut_out = DecisionSubscriber(ctx, hub.decision_endpoint, "d", keys=bad)
    plain = DecisionSubscriber(ctx, hub.decision_endpoint, "d")
    unlisted = DecisionSubscriber(ctx, hub.decision_endpoint, "d", keys=stranger)
    forger = TelemetryPublisher(ctx, hub.telemetry_endpoint, "device/d", keys=stranger)
    member = TelemetryPublisher(ctx, hub.telemetry_endpoint, "device/cam1", keys=good)
    try:
        wait_for_subscribers(hub, ok)
        assert ok.receive(timeout_s=5).cut == 2
        heard: set[str] = set()
        deadline = time.monotonic() + 10
        while "device/cam1" not in heard and time.monotonic() < deadline:
            for pub in (forger, member):
                pub.publish(telemetry_pb2.Telemetry(link=telemetry_pb2.LinkObservation(bandwidth_mbit=3.0)))
            heard |= {m.source for m in hub.poll(0.05)}
            hub.republish()
        assert heard == {"device/cam1"}  # the listed client got through; the forger never did
        assert hub.subscriptions == 1  # the three without an admitted key never got through the handshake
        for sub in (shut_out, plain, unlisted):
            assert sub.receive(timeout_s=0.2) is None
    finally:
        for s in (ok, shut_out, plain, unlisted, forger, member, hub):
            s.close()
        ctx.term()


def test_a_curve_controller_needs_its_client_list_and_bad_key_files_are_named(tmp_path):
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="public keys of the clients"):
            ControllerSockets(ctx, "inproc://t", "inproc://d", keys=CurveKeys.generate())
    finally:
        ctx.term()
    one, other = CurveKeys.generate(), CurveKeys.generate()
    (tmp_path / "controller.key").write_bytes(one.public)
    (tmp_path / "controller.key_secret").write_bytes(other.secret)  # another pair's secret
    with pytest.raises(ValueError, match="are not one pair"):
        CurveKeys.load(tmp_path, "controller")
    for content, message in ((b"not a key", "is not a key"), (b"", "is not a key"), (b"x" * 2000, "not a key")):
        (tmp_path / "controller.key_secret").write_bytes(content)
        with pytest.raises(ValueError, match=message):
            CurveKeys.load(tmp_path, "controller")
    (tmp_path / "controller.key_secret").unlink()
    (tmp_path / "controller.key_secret").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        CurveKeys.load(tmp_path, "controller")
    with pytest.raises(ValueError, match="not a directory"):
        CurveKeys.load(tmp_path / "controller.key", "controller")


def test_a_device_gets_only_its_own_decisions_not_those_of_names_it_prefixes():
    """ZeroMQ matches topics by prefix: device cam1 received the decisions of cam10..cam1999."""
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "inproc://t", "inproc://d")
    cam1 = DecisionSubscriber(ctx, "inproc://d", "cam1")
    try:
        wait_for_subscribers(hub, cam1)
        for i in range(20):
            hub.publish_decision(decision(f"cam1{i}", epoch=1, cut=3, codec="int8"))
        hub.publish_decision(decision("cam1", epoch=1, cut=5, codec="fp16"))
        assert cam1.receive(timeout_s=5).cut == 5
        assert cam1.receive(timeout_s=0.2) is None and cam1.malformed == 0
    finally:
        for s in (cam1, hub):
            s.close()
        ctx.term()


def test_a_telemetry_flood_is_read_in_bounded_batches_keeping_each_sources_latest():
    """20,000 messages sent at once kept the controller in one poll for 3.8 s, past the
    devices' silence limit, and ran the policy for every one of them."""
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "inproc://t", "inproc://d")
    pub = TelemetryPublisher(ctx, "inproc://t", source="device/flood")
    quiet = TelemetryPublisher(ctx, "inproc://t", source="device/quiet")
    try:
        pub.publish(telemetry_pb2.Telemetry(link=telemetry_pb2.LinkObservation(bandwidth_mbit=1.0)))
        deadline = time.monotonic() + 5
        while not hub.poll(0.05):  # the slow joiner: wait until the subscription is in place
            assert time.monotonic() < deadline, "telemetry never arrived"
            pub.publish(telemetry_pb2.Telemetry(link=telemetry_pb2.LinkObservation(bandwidth_mbit=1.0)))
        for i in range(1, 901):
            pub.publish(telemetry_pb2.Telemetry(link=telemetry_pb2.LinkObservation(bandwidth_mbit=float(i))))
        quiet.publish(telemetry_pb2.Telemetry(link=telemetry_pb2.LinkObservation(bandwidth_mbit=2.0)))
        batches = []
        while len(batches) < 20:
            got = hub.poll(0.2, max_batch=100)
            if not got:
                break
            batches.append(got)
        # each poll read at most 100 and returned one message per source: the latest it read
        assert all(len({m.source for m in b}) == len(b) <= 2 for b in batches)
        flood = [m.link.bandwidth_mbit for b in batches for m in b if m.source == "device/flood"]
        assert len(batches) >= 9 and flood == sorted(flood) and flood[-1] == 900.0
        assert any(m.source == "device/quiet" for b in batches for m in b)
    finally:
        for s in (pub, quiet, hub):
            s.close()
        ctx.term()


def test_the_controller_drops_nonsense_telemetry_and_bounds_the_devices_it_keeps():
    from edgesplit.runtime.control.policy import LeastLatency, PlanSpace
    from edgesplit.runtime.control.remote import FORGET_AFTER_HEARTBEATS, HISTORY, Controller

    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "inproc://tel", "inproc://dec")
    space = PlanSpace.uniform(blocks=2, device_block_s=0.01, edge_block_s=0.001, shapes=[(8,), (8,), (2,)])
    now = [0.0]
    controller = Controller(hub, lambda _: space, lambda _: LeastLatency(), max_devices=2, clock=lambda: now[0])
    try:
        def telemetry(source, mbit, rtt=0.01, battery=None, samples=3):
            msg = telemetry_pb2.Telemetry(source=source, link=telemetry_pb2.LinkObservation(
                bandwidth_mbit=mbit, rtt_seconds=rtt, samples=samples))
            if battery is not None:
                msg.battery.level, msg.battery.on_battery = battery, True
            return msg

        nonsense = (telemetry("device/a", float("nan")), telemetry("device/a", 1.0, float("nan")),
                    telemetry("device/a", -1.0), telemetry("device/" + "x" * 500, 1.0),
                    # an infinite link made every option's energy NaN and the choice arbitrary
                    telemetry("device/a", float("inf"), 0.0, battery=0.1), telemetry("device/a", 1e308),
                    telemetry("device/a", 1.0, float("inf")), telemetry("device/a", 1.0, battery=float("nan")),
                    telemetry("device/a", 1.0, battery=-7.0), telemetry("device/a", 1.0, battery=float("inf")))
        for msg in nonsense:
            controller.handle(msg)
        assert controller.devices == {} and hub.malformed == len(nonsense) and hub.current == {}
        hub.malformed = 0
        for name in ("a", "b", "c", "d"):
            controller.handle(telemetry(f"device/{name}", 5.0))
        assert sorted(controller.devices) == ["a", "b"] and hub.malformed == 2
        assert set(hub.current) == {"a", "b"}  # each known device got its decision

        # A flood of invented names once filled the table for good: silent devices now make room.
        now[0] = FORGET_AFTER_HEARTBEATS * controller.heartbeat_s - 0.5
        controller.handle(telemetry("device/b", 5.0))  # b is still talking
        now[0] = FORGET_AFTER_HEARTBEATS * controller.heartbeat_s + 0.5  # a is silent for longer than that
        controller.handle(telemetry("device/real", 5.0))
        assert sorted(controller.devices) == ["b", "real"] and set(hub.current) == {"b", "real"}
        assert hub.malformed == 2

        # A device whose link flaps keeps a bounded history of decisions, not one per change.
        for flap in range(HISTORY + 20):  # each way long enough for the hysteresis to let it through
            for _ in range(6):
                controller.handle(telemetry("device/real", 1000.0 if flap % 2 else 0.001,
                                            0.0001 if flap % 2 else 5.0))
        view = controller.devices["real"]
        assert view.epoch > HISTORY and len(view.decisions) == HISTORY
        assert view.decisions[-1]["epoch"] == view.epoch

        # A device that has measured nothing yet sends its starting guess: it was decided on
        # (offload everything, on a link never seen); now its own controller keeps deciding.
        fresh = Controller(hub, lambda _: space, lambda _: LeastLatency(), clock=lambda: now[0])
        fresh.handle(telemetry("device/fresh", 5.0, samples=0))
        assert "fresh" in fresh.devices and "fresh" not in hub.current
        fresh.handle(telemetry("device/fresh", 5.0, samples=1))
        assert hub.current["fresh"].epoch == 1
        # restarted, it measures afresh: its old decision is no longer replayed or repeated,
        # and once measured again it gets a new one
        fresh.handle(telemetry("device/fresh", 1000.0, samples=0))
        assert "fresh" not in hub.current
        fresh.handle(telemetry("device/fresh", 5.0, samples=2))
        assert hub.current["fresh"].epoch == 2
    finally:
        hub.close()
        ctx.term()
