"""Reference servers: real gRPC servers in child processes that answer the node's protocol
with the shipped model's own outputs, and refuse what they cannot serve."""

import grpc
import numpy as np
import pytest
import torch

from edgesplit.bench.reference_server import KINDS, ReferenceServer
from edgesplit.models import load_trained
from edgesplit.protos import inference_pb2, inference_pb2_grpc


@pytest.fixture(scope="module")
def model():
    return load_trained("resnet_fm").eval()


@pytest.mark.parametrize("kind", KINDS)
def test_reference_server_answers_like_the_model_in_process(kind, model):
    x = np.random.default_rng(3).standard_normal((2, 16, 28, 28)).astype("<f4")
    with torch.inference_mode():
        expected = model.run(torch.from_numpy(x), 4).numpy()
    with ReferenceServer(kind) as server, grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=30).live
        meta = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="resnet_fm.from.4"), timeout=30)
        assert list(meta.inputs[0].shape) == [-1, 16, 28, 28]
        request = inference_pb2.ModelInferRequest(model_name="resnet_fm.from.4", id="r1")
        request.inputs.add(name=meta.inputs[0].name, datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        response = stub.ModelInfer(request, timeout=30)
        got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(response.outputs[0].shape))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert response.id == "r1" and response.parameters["edge_compute_seconds"].double_param > 0
        request.raw_input_contents[0] = x.tobytes()[:100]  # a payload too short for its shape
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(request, timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="nope"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert server.process.poll() is not None  # stopped with the context


def test_unknown_kind_is_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="unknown reference server"):
        ReferenceServer("uvloop")
