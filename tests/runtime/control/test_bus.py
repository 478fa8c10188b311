"""Telemetry bus: garbage is counted and dropped, a late joiner gets the decision in force at
once, CURVE keeps out a client without the controller's key."""

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


def test_curve_encrypts_and_refuses_a_client_without_the_servers_key(tmp_path):
    server = CurveKeys.generate()
    server.save(tmp_path, "controller")
    assert oct((tmp_path / "controller.key_secret").stat().st_mode & 0o777) == "0o600"
    server = CurveKeys.load(tmp_path, "controller")
    good = CurveKeys.generate().client_of(server)
    bad = CurveKeys.generate().client_of(CurveKeys.generate())  # trusts another server
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*", keys=server)
    hub.publish_decision(decision("d", epoch=1, cut=2, codec="fp16"))
    ok = DecisionSubscriber(ctx, hub.decision_endpoint, "d", keys=good)
    shut_out = DecisionSubscriber(ctx, hub.decision_endpoint, "d", keys=bad)
    plain = DecisionSubscriber(ctx, hub.decision_endpoint, "d")
    try:
        wait_for_subscribers(hub, ok)
        assert ok.receive(timeout_s=5).cut == 2
        for _ in range(5):
            hub.republish()
            hub.poll(0.05)
        assert hub.subscriptions == 1  # the two without the right key never got through the handshake
        assert shut_out.receive(timeout_s=0.2) is None and plain.receive(timeout_s=0.2) is None
    finally:
        for s in (ok, shut_out, plain, hub):
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
        def telemetry(source, mbit, rtt=0.01, battery=None):
            msg = telemetry_pb2.Telemetry(source=source, link=telemetry_pb2.LinkObservation(
                bandwidth_mbit=mbit, rtt_seconds=rtt))
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
    finally:
        hub.close()
        ctx.term()
