"""A real edge-node with --telemetry publishes its queue depth and segment times on the bus;
the cluster controller adds the least loaded node's queue wait to plans that offload, so a
busy edge moves a device back onto itself, and nonsense node telemetry is dropped."""

import pytest
import torch
import zmq

from edgesplit.protos import telemetry_pb2
from edgesplit.runtime import codec
from edgesplit.runtime.control.bus import ControllerSockets
from edgesplit.runtime.control.policy import LeastLatency, PlanSpace
from edgesplit.runtime.control.remote import MAX_NODE_SEGMENTS, Controller
from edgesplit.runtime.node.launcher import NodeProcess
from edgesplit.runtime.node.settings import NodeSettings
from edgesplit.runtime.transport.client import EdgeClient
from tests.helpers import wait_until


def test_a_node_publishes_its_load_on_the_bus():
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    got: list[telemetry_pb2.Telemetry] = []
    try:
        with NodeProcess(model="resnet_fm", extra_args=["--telemetry", hub.telemetry_endpoint,
                                                        "--telemetry-interval", "0.1", "--name", "edge7"]) as node:
            client = EdgeClient(node.address)
            try:
                client.infer("resnet_fm", codec.encode(torch.zeros(1, 1, 28, 28), "fp32"), 5.0, "t1")
            finally:
                client.close()

            def served_one():
                got.extend(m for m in hub.poll(0.1) if m.source == "node/edge7")
                return any("resnet_fm" in m.node.segment_seconds for m in got)

            wait_until(served_one, timeout=30, what="node telemetry with the served segment's time")
        last = got[-1]
        assert last.HasField("node") and last.node.queue_depth == 0 and last.seq >= 1
        assert 0 < last.node.segment_seconds["resnet_fm"] < 5
    finally:
        hub.close()
        ctx.term()


def test_a_loaded_edge_moves_the_device_back_onto_itself_and_nonsense_load_is_dropped():
    ctx = zmq.Context()
    hub = ControllerSockets(ctx, "tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    shapes = [(3, 64, 64), (32, 16, 16), (64, 8, 8), (128, 4, 4), (10,)]
    now = [0.0]
    controller = Controller(hub, lambda name: PlanSpace.uniform(4, 0.02, 0.002, shapes),
                            lambda name: LeastLatency(), heartbeat_s=1.0, clock=lambda: now[0])

    def device_says(mbit: float) -> None:
        controller.handle(telemetry_pb2.Telemetry(source="device/cam1", link=telemetry_pb2.LinkObservation(
            bandwidth_mbit=mbit, rtt_seconds=0.001, samples=3)))

    def node_says(name: str, depth: int, seconds: float) -> None:
        msg = telemetry_pb2.Telemetry(source=f"node/{name}")
        msg.node.queue_depth = depth
        msg.node.segment_seconds["m.from.0"] = seconds
        controller.handle(msg)

    try:
        device_says(200.0)
        assert controller.devices["cam1"].current.cut == 0  # a fast link and an idle edge: offload all
        node_says("busy", 40, 0.01)  # 400 ms of queue
        assert controller.edge_wait_s() == 0.4
        for _ in range(3):  # hysteresis holds a new choice for a few decisions
            device_says(200.0)
        assert controller.devices["cam1"].current.cut == 4
        assert "edge queue 400 ms" in controller.devices["cam1"].decisions[-1]["reason"]
        node_says("idle", 0, 0.01)  # another node with room: the least loaded one counts
        assert controller.edge_wait_s() == 0.0
        bad = controller.sockets.malformed
        node_says("liar", -1, 0.01)
        node_says("liar", 1, float("nan"))
        huge = telemetry_pb2.Telemetry(source="node/liar")  # a map this size made every decision 56x dearer
        for i in range(MAX_NODE_SEGMENTS + 1):
            huge.node.segment_seconds[f"m.from.{i}"] = 0.01
        controller.handle(huge)
        assert controller.sockets.malformed == bad + 3 and "liar" not in controller.nodes
        now[0] = 10.0  # node telemetry older than 3 heartbeats is forgotten
        assert controller.edge_wait_s() == 0.0
        controller.max_devices = 2  # at the cap, stale nodes make room for a new one
        node_says("fresh", 1, 0.01)
        assert set(controller.nodes) == {"fresh"} and controller.edge_wait_s() == pytest.approx(0.01)
    finally:
        hub.close()
        ctx.term()


def test_telemetry_flags_are_checked_before_anything_starts():
    for endpoint in ("controller:5555", "tcp://no-port-given"):
        with pytest.raises(ValueError, match="ZeroMQ endpoint"):
            NodeSettings(telemetry=endpoint)
    with pytest.raises(ValueError, match="give --telemetry"):
        NodeSettings(curve_dir="/keys")
    with pytest.raises(ValueError, match="telemetry-interval"):
        NodeSettings(telemetry="tcp://127.0.0.1:5555", telemetry_interval=0)
    assert NodeSettings(telemetry="tcp://127.0.0.1:5555").telemetry_interval == 1.0
    with pytest.raises(ValueError, match="port 99999 .* must be 1..65535"):  # ZeroMQ took it modulo 65536
        NodeSettings(telemetry="tcp://127.0.0.1:99999")


@pytest.mark.parametrize("field, value, flag", [
    ("port", 70000, "--port"), ("port", -5, "--port"), ("metrics_port", 70000, "--metrics-port"),
    ("health_port", 99999, "--health-port"), ("health_port", -2, "--health-port"),
])
def test_ports_out_of_range_are_refused_not_wrapped(field, value, flag):
    # the OS took 70000 modulo 65536: the node served on 4464 and wrote that to its port file
    with pytest.raises(ValueError, match=f"{flag} must be 0..65535"):
        NodeSettings(**{field: value})


def test_an_unwritable_port_file_is_refused_before_serving(tmp_path):
    with pytest.raises(ValueError, match="--port-file"):
        NodeSettings(port_file=str(tmp_path / "no-such-folder" / "p.json"))
    with pytest.raises(ValueError, match="--port-file"):
        NodeSettings(port_file=str(tmp_path))
    assert NodeSettings(port_file=str(tmp_path / "p.json")).port_file


def test_controller_endpoints_are_checked_before_the_model_loads():
    from edgesplit.runtime.control.endpoint import check_endpoint
    from edgesplit.runtime.control.remote import serve

    with pytest.raises(ValueError, match="--telemetry: port 99999"):
        serve("resnet_fm", 0.05, "tcp://127.0.0.1:99999", "tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match="--decisions must be a ZeroMQ endpoint"):
        serve("resnet_fm", 0.05, "tcp://127.0.0.1:*", "garbage")
    assert check_endpoint("tcp://*:*", "--x", bind=True) == "tcp://*:*"
    assert check_endpoint("ipc:///tmp/bus", "--x") == "ipc:///tmp/bus"
    with pytest.raises(ValueError, match="port \\* .* must be 1..65535"):
        check_endpoint("tcp://10.0.0.1:*", "--telemetry")  # a device connects: no wildcard


def test_a_telemetry_endpoint_zeromq_cannot_use_leaves_the_node_serving(tmp_path):
    log = tmp_path / "node.log"
    # well formed (a missing port is refused at start), but ZeroMQ refuses the host
    with NodeProcess(model="resnet_fm", extra_args=["--telemetry", "tcp://%:5555"], log_path=log) as node:
        client = EdgeClient(node.address)
        try:
            result = client.infer("resnet_fm", codec.encode(torch.zeros(1, 1, 28, 28), "fp32"), 5.0, "t2")
            assert result.logits.shape == (1, 10)
        finally:
            client.close()
    assert "telemetry to tcp://%:5555 disabled" in log.read_text()
