"""edge-node --nonn serves NoNN members as a real process: the chosen members only, answers
equal to the in-process student, clear errors for bad flags and bundles."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
import torch

from edgesplit.protos import inference_pb2_grpc
from edgesplit.runtime import codec
from edgesplit.runtime.node.launcher import NodeProcess
from edgesplit.runtime.node.settings import NodeSettings
from edgesplit.runtime.transport.client import EdgeClient, OffloadError
from tests.helpers import infer_request


def test_a_node_serves_only_the_members_it_is_given(tiny_nonn):
    args = ["--nonn", str(tiny_nonn.manifest_path), "--member", "1", "--member", "2"]
    with NodeProcess(model=None, extra_args=args) as node:
        client = EdgeClient(node.address)
        try:
            x = torch.randn(2, 1, 28, 28)
            for i in (1, 2):
                got = client.infer(tiny_nonn.member_model_name(i), codec.encode(x, "fp32"), timeout=30).logits
                with torch.no_grad():
                    torch.testing.assert_close(got, tiny_nonn.students[i](x), atol=1e-5, rtol=1e-5)
            for name in (tiny_nonn.member_model_name(0), "resnet_fm"):
                with pytest.raises(OffloadError) as err:
                    client.infer(name, codec.encode(x, "fp32"), timeout=30)
                assert err.value.reason == "NOT_FOUND" and tiny_nonn.member_model_name(1) in err.value.message
            with grpc.insecure_channel(node.address) as channel:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.RpcError) as bad:  # wrong input shape: a clear INVALID_ARGUMENT
                    stub.ModelInfer(infer_request(tiny_nonn.member_model_name(1), torch.randn(1, 1, 14, 14)),
                                    timeout=30)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            hashes, models = client.served()
            assert hashes == [tiny_nonn.manifest["sha256"]]
            assert sorted(models) == [tiny_nonn.member_model_name(1), tiny_nonn.member_model_name(2)]
        finally:
            client.close()


def test_the_device_notices_members_serving_other_weights(tiny_nonn):
    from edgesplit.runtime.device.ensemble import EnsembleClient

    args = ["--nonn", str(tiny_nonn.manifest_path), "--member", "0"]
    with NodeProcess(model=None, extra_args=args) as right, NodeProcess(model="resnet_fm") as wrong:
        clients = [EdgeClient(right.address), EdgeClient(wrong.address), EdgeClient(right.address),
                   EdgeClient("127.0.0.1:1")]
        try:
            problems = EnsembleClient(tiny_nonn, clients).check_members(timeout=5)
        finally:
            for c in clients:
                c.close()
    assert set(problems) == {1, 2, 3}
    assert "serves other weights" in problems[1] and "cannot tell" in problems[3]
    assert problems[2] == f"does not serve {tiny_nonn.member_model_name(2)}"  # member 0's node wired as member 2


def test_bad_nonn_flags_fail_fast_with_a_reason(tiny_nonn):
    with pytest.raises(ValueError, match="give --nonn too"):
        NodeSettings(members=(1,))
    cmd = [sys.executable, "-m", "edgesplit.runtime.node", "--port", "0", "--metrics-port", "-1"]
    for extra, message in ((["--nonn", "no_such_ensemble"], "no NoNN bundle"),
                           (["--nonn", str(tiny_nonn.manifest_path), "--member", "9"], "members 0..3")):
        done = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-500:]
