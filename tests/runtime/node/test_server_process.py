"""edge-node as a real process: /metrics over HTTP, graceful SIGTERM drain, prompt exit."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request

import grpc
import pytest
import torch

from edgesplit.protos import inference_pb2, inference_pb2_grpc
from edgesplit.runtime.node.launcher import NodeProcess
from tests.helpers import CheckedThread, infer_request, wait_until


def scrape(node: NodeProcess) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()


def gauge(body: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", body, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed ``sock`` (a read returns end of file without blocking)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(30)


@pytest.fixture(scope="module")
def slow_node_args():
    # ResNet-18 on 8 images at 224x224 takes seconds on one thread: long enough to be in flight.
    return ["--random-weights", "--workers", "1", "--threads", "1", "--no-batching"]


def test_metrics_endpoint_serves_only_metrics_and_drops_idle_connections(slow_node_args):
    with NodeProcess(model="resnet_fm", extra_args=["--max-inflight", "8"]) as node:
        channel = grpc.insecure_channel(node.address)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(infer_request("resnet_fm.from.9", torch.randn(1, 64, 7, 7)), timeout=30)
        body = scrape(node)
        assert 'edgesplit_node_requests_total{code="OK",model="resnet_fm.from.9"} 1.0' in body
        for name in ("edgesplit_node_request_duration_seconds_bucket", "edgesplit_node_batch_size_bucket",
                     "edgesplit_node_queue_wait_seconds_bucket", "edgesplit_node_inflight_requests"):
            assert name in body
        for path in ("/v2/health/live", "/", "/metricsx"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}{path}", timeout=10)
            assert err.value.code == 404, path
        # Connections beyond the limit (16) are closed at once; the others are served, then
        # dropped after the idle timeout (5 s), so idle clients cannot pile up threads.
        idle = [socket.create_connection(("127.0.0.1", node.metrics_port), timeout=30) for _ in range(20)]
        wait_until(lambda: all(closed_by_peer(s) for s in idle[16:]), 10, "the connections over the limit to close")
        assert not any(closed_by_peer(s) for s in idle[:16]), "connections within the limit stay open"
        for sock in idle[:16]:  # each is closed by the server after its idle timeout
            assert sock.recv(1) == b""
        for sock in idle:
            sock.close()
        assert "edgesplit_node_requests_total" in scrape(node)  # served again
        channel.close()


def test_sigterm_drains_every_request_in_flight(slow_node_args):
    node = NodeProcess(model="resnet18", extra_args=[*slow_node_args, "--grace", "60"])
    with node:
        channel = grpc.insecure_channel(node.address)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = torch.randn(4, 3, 224, 224)
        callers = [CheckedThread(lambda: stub.ModelInfer(infer_request("resnet18", x), timeout=120), name=f"c{i}")
                   for i in range(3)]
        for c in callers:
            c.start()
        wait_until(lambda: gauge(scrape(node), "edgesplit_node_inflight_requests") == 3, 30, "3 requests in flight")
        code = node.terminate(timeout=120)
        results = [c.result(120) for c in callers]  # raises if any was dropped
        assert code == 0, node.log_path.read_text()
        assert [list(r.outputs[0].shape) for r in results] == [[4, 1000]] * 3
        log = node.log_path.read_text()
        assert "draining 3 in-flight requests" in log and "stopped" in log
        channel.close()


def test_an_idle_connection_does_not_hold_the_exit_for_the_grace_period():
    node = NodeProcess(model="resnet_fm", extra_args=["--grace", "300"])
    with node:
        channel = grpc.insecure_channel(node.address)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=10).live  # connected, then idle
        started = time.monotonic()
        code = node.terminate(timeout=60)  # past 60 s it is killed and the code is -9
        assert code == 0, f"exit code {code} after {time.monotonic() - started:.1f} s"
        channel.close()


def test_short_grace_cancels_in_flight_work_without_tracebacks(slow_node_args):
    node = NodeProcess(model="resnet18", extra_args=[*slow_node_args, "--grace", "0.05"])
    with node:
        channel = grpc.insecure_channel(node.address)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = torch.randn(8, 3, 224, 224)
        caller = CheckedThread(lambda: stub.ModelInfer(infer_request("resnet18", x), timeout=120), name="caller")
        caller.start()
        wait_until(lambda: gauge(scrape(node), "edgesplit_node_inflight_requests") == 1, 30, "a request in flight")
        assert node.terminate(timeout=120) == 0
        with pytest.raises(grpc.RpcError) as err:
            caller.result(60)
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        log = node.log_path.read_text()
        assert "Traceback" not in log and "CancelledError" not in log, log
        channel.close()


@pytest.mark.parametrize("flag", ["--metrics-port", "--port", "--health-port"])
def test_a_port_already_taken_is_a_one_line_error_not_a_traceback(flag, capsys):
    """A taken metrics port raised OSError after gRPC had started (a traceback, then another
    from the gRPC server never stopped); a taken gRPC port raised RuntimeError."""
    from edgesplit.runtime.node.server import main as node_main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = {"--port": "0", "--metrics-port": "0", flag: str(port)}  # a taken health port: after gRPC started
        code = node_main([a for k, v in args.items() for a in (k, v)] + ["--worker-threads"])
    err = capsys.readouterr().err
    assert code == 2 and str(port) in err and "Traceback" not in err
