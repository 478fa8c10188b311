"""A real node server on an ephemeral port: the Open Inference Protocol, health, reflection,
control plane and metrics; every kind of malformed request gets its status and the node
keeps serving."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from edgesplit.protos import edgesplit_pb2, edgesplit_pb2_grpc, inference_pb2, inference_pb2_grpc
from edgesplit.runtime import codec
from edgesplit.runtime.inference import OffloadError
from edgesplit.runtime.transport.client import EdgeClient
from tests.helpers import gated_model, infer_request, start_in_thread, stop_in_thread, wait_until

SC = grpc.StatusCode


@pytest.fixture
def stub(node):
    channel = grpc.insecure_channel(node.address)
    yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def valid_call_works(stub, model):
    h = model.run(torch.ones(1, 1, 28, 28), 0, 4)
    resp = stub.ModelInfer(infer_request("resnet_fm.from.4", h), timeout=10)
    out = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(1, 10)
    with torch.inference_mode():
        expected = model(torch.ones(1, 1, 28, 28)).numpy()
    assert np.abs(out - expected).max() <= 1e-5


def test_tail_from_every_cut_matches_the_full_model(stub, trained_model):
    x = torch.randn(2, 1, 28, 28)
    last_arrival, clocks = 0.0, set()
    with torch.inference_mode():
        full = trained_model(x).numpy()
        for cut in range(trained_model.num_blocks):
            name = "resnet_fm" if cut == 0 else f"resnet_fm.from.{cut}"
            resp = stub.ModelInfer(infer_request(name, trained_model.run(x, 0, cut)), timeout=10)
            assert resp.id == "r1" and resp.model_name == name
            assert list(resp.outputs[0].shape) == [2, 10] and resp.outputs[0].datatype == "FP32"
            out = np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(2, 10)
            assert np.abs(out - full).max() <= 1e-5, cut
            assert resp.parameters["edge_compute_seconds"].double_param > 0
            arrived = resp.parameters["edge_arrival_seconds"].double_param  # the node's clock, rising
            assert arrived > last_arrival
            last_arrival = arrived
            clocks.add(resp.parameters["edge_clock"].string_param)
    assert len(clocks) == 1 and "" not in clocks  # one clock, named


def test_typed_contents_are_answered_with_typed_contents(stub, trained_model):
    x = torch.randn(1, 1, 28, 28)
    req = inference_pb2.ModelInferRequest(model_name="resnet_fm")
    inp = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    inp.contents.fp32_contents.extend(x.flatten().tolist())
    resp = stub.ModelInfer(req, timeout=10)
    assert not resp.raw_output_contents
    with torch.inference_mode():
        assert np.allclose(resp.outputs[0].contents.fp32_contents, trained_model(x).flatten().numpy(), atol=1e-5)


def test_int8_codec_parameters_travel_in_parameters(stub, trained_model):
    x = torch.randn(1, 1, 28, 28)
    with torch.inference_mode():
        h = trained_model.run(x, 0, 7)
        resp = stub.ModelInfer(infer_request("resnet_fm.from.7", h, codec="int8-channel"), timeout=10)
        out = torch.from_numpy(np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(1, 10).copy())
        assert out.argmax() == trained_model(x).argmax()


def _nan_tensor():
    t = torch.zeros(1, 16, 28, 28)
    t[0, 0, 0, 0] = float("nan")
    return t


MALFORMED = {
    "unknown model": (lambda: infer_request("vgg", torch.zeros(1, 16, 28, 28)), SC.NOT_FOUND),
    "unknown cut": (lambda: infer_request("resnet_fm.from.99", torch.zeros(1, 16, 28, 28)), SC.NOT_FOUND),
    "wrong shape": (lambda: infer_request("resnet_fm.from.4", torch.zeros(1, 32, 14, 14)), SC.INVALID_ARGUMENT),
    "wrong byte count": (
        lambda: infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), data=b"\0" * 100),
        SC.INVALID_ARGUMENT,
    ),
    "unknown datatype": (
        lambda: infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), datatype="BF17"),
        SC.INVALID_ARGUMENT,
    ),
    "wrong dtype for codec": (
        lambda: infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), datatype="INT8"),
        SC.INVALID_ARGUMENT,
    ),
    "NaN values": (lambda: infer_request("resnet_fm.from.4", _nan_tensor()), SC.INVALID_ARGUMENT),
    "absurd shape": (
        lambda: infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), shape=[1 << 40, 1 << 40, 28, 28]),
        SC.INVALID_ARGUMENT,
    ),
    "negative dim": (
        lambda: infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), shape=[-1, 16, 28, 28]),
        SC.INVALID_ARGUMENT,
    ),
    "batch too large": (lambda: infer_request("resnet_fm.from.8", torch.zeros(65, 64, 7, 7)), SC.INVALID_ARGUMENT),
    "oversized message": (lambda: infer_request("resnet_fm", torch.zeros(11000, 1, 28, 28)), SC.RESOURCE_EXHAUSTED),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_request_gets_its_status_and_node_keeps_serving(stub, trained_model, kind):
    make, code = MALFORMED[kind]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(make(), timeout=10)
    assert err.value.code() == code, err.value.details()
    assert err.value.details(), "the status says what was wrong"
    valid_call_works(stub, trained_model)


def test_structural_mistakes_are_invalid_argument(stub, trained_model):
    two_inputs = infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28))
    two_inputs.inputs.add(name="extra", datatype="FP32", shape=[1])
    no_data = inference_pb2.ModelInferRequest(model_name="resnet_fm")
    no_data.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    int8_without_scale = infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), codec="int8")
    del int8_without_scale.inputs[0].parameters["scale"]
    raw_and_typed = infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28))
    raw_and_typed.inputs[0].contents.fp32_contents.extend([0.0] * (16 * 28 * 28))
    for req in (two_inputs, no_data, int8_without_scale, raw_and_typed):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=10)
        assert err.value.code() == SC.INVALID_ARGUMENT, err.value.details()
    valid_call_works(stub, trained_model)


def test_liveness_readiness_metadata(stub):
    assert stub.ServerLive(inference_pb2.ServerLiveRequest()).live
    assert stub.ServerReady(inference_pb2.ServerReadyRequest()).ready
    assert stub.ModelReady(inference_pb2.ModelReadyRequest(name="resnet_fm.from.4")).ready
    assert not stub.ModelReady(inference_pb2.ModelReadyRequest(name="nope")).ready
    meta = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="resnet_fm.from.7"))
    assert list(meta.inputs[0].shape) == [-1, 32, 14, 14] and list(meta.outputs[0].shape) == [-1, 10]
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="nope"))
    assert err.value.code() == SC.NOT_FOUND


def test_health_reflection_and_control_plane(node):
    with grpc.insecure_channel(node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"inference.GRPCInferenceService", "edgesplit.v1.EdgeSplitControl", "grpc.health.v1.Health"} <= names
        info = edgesplit_pb2_grpc.EdgeSplitControlStub(channel).NodeInfo(edgesplit_pb2.NodeInfoRequest())
        assert info.model_name == "resnet_fm" and len(info.cuts) == 12
        assert list(info.cuts[4].shape) == [16, 28, 28] and "int8" in info.codecs
        assert "resnet_fm.from.4" in info.served_models


def test_metrics_count_requests_by_status(stub, node, trained_model):
    valid_call_works(stub, trained_model)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request("nope", torch.zeros(1, 16, 28, 28)), timeout=10)
    reg = node.registry
    expected = [
        ("edgesplit_node_requests_total", {"model": "resnet_fm.from.4", "code": "OK"}, 1),
        ("edgesplit_node_requests_total", {"model": "unknown", "code": "NOT_FOUND"}, 1),
        ("edgesplit_node_received_bytes_total", {"model": "resnet_fm.from.4"}, 16 * 28 * 28 * 4),
        ("edgesplit_node_sent_bytes_total", {"model": "resnet_fm.from.4"}, 40),
        ("edgesplit_node_request_duration_seconds_count", {"model": "resnet_fm.from.4"}, 1),
        ("edgesplit_node_inflight_requests", {}, 0),
    ]
    # Metrics are recorded as the handler finishes, which may be just after the client has
    # its answer; give the server thread a moment.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        actual = [reg.get_sample_value(name, labels) for name, labels, _ in expected]
        if actual == [value for _, _, value in expected]:
            break
        time.sleep(0.02)
    assert actual == [value for _, _, value in expected]


def test_full_node_answers_resource_exhausted_and_recovers():
    model, gate = gated_model("slow")  # holds the first request until the refusal is seen
    running, thread = start_in_thread(model, max_inflight=1)
    try:
        channel = grpc.insecure_channel(running.address)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        results = []
        first = threading.Thread(
            target=lambda: results.append(stub.ModelInfer(infer_request("slow", torch.ones(1, 4))))
        )
        first.start()
        wait_until(lambda: running.plane.inflight == 1, 5, "the first request in flight")
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(infer_request("slow", torch.ones(1, 4)), timeout=5)
        assert err.value.code() == SC.RESOURCE_EXHAUSTED and "limit" in err.value.details()
        pushback = dict(err.value.trailing_metadata())["grpc-retry-pushback-ms"]
        assert 1 <= int(pushback) <= 3000
        client = EdgeClient(running.address)  # the device's client reads the pushback too
        try:
            with pytest.raises(OffloadError) as refused:
                client.infer("slow", codec.encode(torch.ones(1, 4), "fp32"), timeout=5)
        finally:
            client.close()
        assert refused.value.reason == "RESOURCE_EXHAUSTED" and refused.value.node_alive
        assert 0.001 <= refused.value.retry_after_s <= 3.0
        gate.release.set()
        first.join(10)
        assert len(results) == 1
        stub.ModelInfer(infer_request("slow", torch.ones(1, 4)), timeout=5)
        channel.close()
    finally:
        gate.release.set()
        stop_in_thread(running, thread)


def test_protocol_conformance_versions_names_and_requested_outputs(stub, trained_model):
    h = torch.zeros(1, 16, 28, 28)
    for version in ("", "1"):
        req = infer_request("resnet_fm.from.4", h)
        req.model_version = version
        assert stub.ModelInfer(req, timeout=10).model_version == "1"
    cases = []
    req = infer_request("resnet_fm.from.4", h)
    req.model_version = "7"
    cases.append((req, SC.NOT_FOUND, "no version"))
    cases.append((infer_request("resnet_fm.from.4", h, name="x"), SC.INVALID_ARGUMENT, "unexpected input 'x'"))
    req = infer_request("resnet_fm.from.4", h)
    req.outputs.add(name="probabilities")
    cases.append((req, SC.INVALID_ARGUMENT, "unexpected output 'probabilities'"))
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, timeout=10)
        assert err.value.code() == code and text in err.value.details(), err.value.details()
    req = infer_request("resnet_fm.from.4", h)
    req.outputs.add(name="logits")
    assert [o.name for o in stub.ModelInfer(req, timeout=10).outputs] == ["logits"]
    assert not stub.ModelReady(inference_pb2.ModelReadyRequest(name="resnet_fm", version="7")).ready
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="resnet_fm", version="7"))
    assert err.value.code() == SC.NOT_FOUND


def test_metadata_says_eager_pytorch_and_node_info_lists_every_accepted_datatype(node, stub):
    meta = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="resnet_fm.from.4"))
    assert meta.platform == "pytorch" and list(meta.versions) == ["1"] and meta.inputs[0].name == "input"
    server = stub.ServerMetadata(inference_pb2.ServerMetadataRequest())
    assert "edgesplit_codec" in server.extensions
    with grpc.insecure_channel(node.address) as channel:
        info = edgesplit_pb2_grpc.EdgeSplitControlStub(channel).NodeInfo(edgesplit_pb2.NodeInfoRequest())
    model = {m.name: m for m in info.models}["resnet_fm.from.4"]
    assert list(model.inputs[0].datatypes) == ["FP32", "FP16", "INT8"] and "int8-channel" in model.inputs[0].codecs
    assert model.batching and model.preferred_batch >= 1 and info.workers >= 1


def test_segment_profile_reports_the_real_mean_batch(node, stub):
    h = torch.zeros(3, 16, 28, 28)
    for _ in range(2):
        stub.ModelInfer(infer_request("resnet_fm.from.4", h), timeout=10)
    with grpc.insecure_channel(node.address) as channel:
        control = edgesplit_pb2_grpc.EdgeSplitControlStub(channel)
        profile = control.SegmentProfile(edgesplit_pb2.SegmentProfileRequest(model_name="resnet_fm.from.4"))
        with pytest.raises(grpc.RpcError) as err:
            control.SegmentProfile(edgesplit_pb2.SegmentProfileRequest(model_name="nope"))
    p = profile.profiles[0]
    assert p.requests == 2 and p.batches == 2 and p.mean_batch == 3.0 and p.mean_seconds > 0
    assert err.value.code() == SC.NOT_FOUND


def test_received_bytes_count_typed_contents_and_long_names_are_not_echoed(stub, node):
    req = inference_pb2.ModelInferRequest(model_name="resnet_fm")
    inp = req.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    inp.contents.fp32_contents.extend([0.0] * 784)
    stub.ModelInfer(req, timeout=10)
    wait_until(lambda: node.registry.get_sample_value("edgesplit_node_received_bytes_total",
                                                      {"model": "resnet_fm"}) == 784 * 4, 5, "the byte count")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(infer_request("m" * (8 << 20), torch.zeros(1, 4)), timeout=30)
    assert err.value.code() == SC.NOT_FOUND and len(err.value.details()) < 300


def test_a_draining_node_refuses_new_work_with_unavailable(trained_model):
    running, thread = start_in_thread(trained_model)
    try:
        running.server.inference.draining = True
        with grpc.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28)), timeout=10)
        assert err.value.code() == SC.UNAVAILABLE and "shutting down" in err.value.details()
    finally:
        stop_in_thread(running, thread)
