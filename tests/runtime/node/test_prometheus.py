"""A real Prometheus server scrapes a real edge-node and can query its metrics."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import torch

from edgesplit.protos import inference_pb2_grpc
from edgesplit.runtime.node.launcher import NodeProcess
from tests.helpers import infer_request

pytestmark = pytest.mark.skipif(not shutil.which("prometheus"), reason="needs Debian's prometheus package")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert body["status"] == "success"
    return body["data"]["result"]


def test_prometheus_scrapes_node_metrics(tmp_path):
    with NodeProcess(model="resnet_fm") as node:
        with grpc.insecure_channel(node.address) as channel:
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(3):
                stub.ModelInfer(infer_request("resnet_fm.from.7", torch.zeros(1, 32, 14, 14)), timeout=10)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: edgesplit\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{node.metrics_port}']\n"
        )
        port = free_port()
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            result = []
            while time.monotonic() < deadline and not result:
                time.sleep(1)
                try:
                    result = query(port, 'edgesplit_node_requests_total{model="resnet_fm.from.7",code="OK"}')
                except OSError:
                    continue
            assert result, "Prometheus never scraped the node"
            assert float(result[0]["value"][1]) == 3
            up = query(port, "up")
            assert up and up[0]["value"][1] == "1"
            buckets = query(port, "edgesplit_node_request_duration_seconds_bucket")
            assert len(buckets) > 5
        finally:
            prom.terminate()
            prom.wait(10)
