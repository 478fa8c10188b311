"""edge-node as a real process: Prometheus /metrics over HTTP, and graceful SIGTERM drain."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import torch

from edgesplit.protos import inference_pb2_grpc
from edgesplit.runtime.launcher import NodeProcess

from .test_grpc_server import infer_request


def test_metrics_endpoint_and_graceful_shutdown_with_request_in_flight():
    node = NodeProcess(model="resnet18", extra_args=["--random-weights", "--grace", "20"])
    with node:
        channel = grpc.insecure_channel(node.address)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        x = torch.randn(8, 3, 224, 224)
        stub.ModelInfer(infer_request("resnet18.from.9", torch.randn(1, 512, 7, 7)), timeout=30)
        body = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10).read().decode()
        assert 'edgesplit_node_requests_total{code="OK",model="resnet18.from.9"} 1.0' in body
        assert "edgesplit_node_request_duration_seconds_bucket" in body
        assert "edgesplit_node_inflight_requests" in body

        results, errors = [], []

        def slow_call():
            try:
                results.append(stub.ModelInfer(infer_request("resnet18", x), timeout=60))
            except grpc.RpcError as exc:
                errors.append(exc)

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)  # the full ResNet-18 on 8 images takes seconds on one thread
        code = node.terminate(timeout=60)
        caller.join(60)
        assert code == 0, node.log_path.read_text()
        assert not errors and len(results) == 1, "the in-flight request was drained, not dropped"
        assert list(results[0].outputs[0].shape) == [8, 1000]
        log = node.log_path.read_text()
        assert "draining" in log and "stopped" in log
        channel.close()
