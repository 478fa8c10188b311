"""Property-based fuzzing of a real node process's data plane (bounded in time).

Random and malformed requests — unknown models and cuts, wrong datatypes, byte counts and
shapes, NaN and Inf, enormous dimensions, garbage parameters, undecodable bytes — each get
a proper status; the node stays up, keeps answering valid requests, and its memory stays
bounded (resident set size measured before and after)."""

from __future__ import annotations

import math
import time

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesplit.protos import inference_pb2, inference_pb2_grpc
from edgesplit.runtime.node.launcher import NodeProcess
from tests.helpers import infer_request

ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MODEL_NAMES = ["resnet_fm", "resnet_fm.from.4", "resnet_fm.from.7", "resnet_fm.from.10", "resnet_fm.from.11",
               "resnet_fm.from.-1", "resnet_fm.from.99999", "", "x" * 300, "resnet_fm.from.4\x00", "../etc"]
SHAPES = {
    "resnet_fm": [1, 1, 28, 28], "resnet_fm.from.4": [1, 16, 28, 28], "resnet_fm.from.7": [1, 32, 14, 14],
    "resnet_fm.from.10": [1, 64, 7, 7],
}


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def fuzz_node():
    with NodeProcess(model="resnet_fm", extra_args=["--max-batch", "16", "--preferred-batch", "8"]) as node:
        channel = grpc.insecure_channel(node.address)
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        yield node, stub, channel
        channel.close()


def status_of(stub, request) -> grpc.StatusCode:
    try:
        stub.ModelInfer(request, timeout=20)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        assert exc.details(), "every refusal says why"
        return exc.code()


dims = st.one_of(st.integers(-3, 70), st.sampled_from([0, 1 << 20, 1 << 31, (1 << 62), (1 << 63) - 1]))
values = st.sampled_from([0.0, 1.0, -1e30, 1e30, math.nan, math.inf, -math.inf, 65504.0, 1e-40])


@st.composite
def requests(draw):
    name = draw(st.sampled_from(MODEL_NAMES))
    shape = SHAPES.get(name, [1, 16, 28, 28])
    if draw(st.booleans()):
        shape = draw(st.lists(dims, min_size=0, max_size=6))
    datatype = draw(st.sampled_from(["FP32", "FP16", "INT8", "UINT8", "BYTES", "BF16", "FP64", "", "fp32"]))
    req = inference_pb2.ModelInferRequest(model_name=name, id=draw(st.text(max_size=20)))
    n_inputs = draw(st.sampled_from([0, 1, 1, 1, 2, 20, 300]))
    for i in range(n_inputs):
        name = "input" if i == 0 and draw(st.booleans()) else draw(st.sampled_from(["input", f"in{i}", ""]))
        inp = req.inputs.add(name=name, datatype=datatype, shape=shape)
        for j in range(draw(st.sampled_from([0, 0, 40, 500])) if i < 3 else 0):
            inp.parameters[f"p{j}"].int64_param = j
        for key in draw(st.lists(st.sampled_from(["codec", "scale", "zero_point", "scales", "compression", "x"]),
                                 max_size=3)):
            kind = draw(st.integers(0, 3))
            p = inp.parameters[key]
            if kind == 0:
                p.string_param = draw(st.sampled_from(["fp32", "int8", "int8-channel", "zlib", "???", "AAAA"]))
            elif kind == 1:
                p.double_param = draw(st.sampled_from([0.0, -1.0, 1e-3, math.nan, math.inf, 1e300]))
            elif kind == 2:
                p.int64_param = draw(st.sampled_from([0, -129, 127, 1 << 62]))
            else:
                p.bool_param = True
    for j in range(draw(st.sampled_from([0, 0, 0, 40, 2000]))):
        req.parameters[f"shared{j}"].string_param = "v"
    for _ in range(draw(st.sampled_from([0, 0, 1, 30]))):
        req.outputs.add(name=draw(st.sampled_from(["logits", "nope", ""])))
    raw_mode = draw(st.integers(0, 3))
    if raw_mode == 0:
        numel = int(np.prod([max(d, 0) for d in shape])) if shape else 1
        if 0 < numel <= 64 * 784:
            fill = draw(values)
            req.raw_input_contents.append(np.full(numel, fill, dtype="<f4").tobytes())
        else:
            req.raw_input_contents.append(b"\0" * draw(st.integers(0, 4096)))
    elif raw_mode == 1:
        for _ in range(draw(st.integers(0, 3))):
            req.raw_input_contents.append(draw(st.binary(max_size=2048)))
    elif raw_mode == 2 and n_inputs:
        req.inputs[0].contents.fp32_contents.extend(draw(st.lists(values, max_size=50)))
    return req


def test_fuzzed_requests_get_proper_statuses_and_memory_stays_bounded(fuzz_node):
    node, stub, _ = fuzz_node
    valid = infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28))
    assert status_of(stub, valid) == grpc.StatusCode.OK
    for _ in range(30):  # warm up allocator and caches before measuring
        status_of(stub, valid)
    before = rss_kib(node.proc.pid)
    seen = set()

    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests())
    def check(request):
        code = status_of(stub, request)
        assert code in ALLOWED, code
        seen.add(code)

    check()
    assert node.running, "the node survived"
    assert status_of(stub, valid) == grpc.StatusCode.OK
    after = rss_kib(node.proc.pid)
    growth_mib = (after - before) / 1024
    print(f"node RSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB after fuzzing (+{growth_mib:.1f} MiB)")
    assert growth_mib < 64, f"node memory grew by {growth_mib:.1f} MiB"
    assert {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND} <= seen


def many_inputs_and_parameters(n: int = 14_000) -> inference_pb2.ModelInferRequest:
    """The review's request: ~300 KB, n empty inputs and n shared parameters (once 13 s and 5.5 GiB)."""
    req = inference_pb2.ModelInferRequest(model_name="resnet_fm.from.4")
    for i in range(n):
        req.inputs.add()
        req.parameters[f"p{i}"].string_param = "x"
    return req


def test_many_inputs_and_parameters_are_refused_at_once_without_memory_growth(fuzz_node):
    node, stub, _ = fuzz_node
    request = many_inputs_and_parameters()
    assert 200_000 < request.ByteSize() < 600_000
    for _ in range(5):  # warm up
        status_of(stub, infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28)))
    before = rss_kib(node.proc.pid)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=20)
        times.append(time.perf_counter() - started)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs" in err.value.details() and len(err.value.details()) < 200
    growth_mib = (rss_kib(node.proc.pid) - before) / 1024
    print(f"refused in {[round(1000 * t, 1) for t in times]} ms; RSS +{growth_mib:.1f} MiB")
    assert min(times) < 0.1, f"refusal took {min(times):.3f} s"
    assert growth_mib < 64
    # With a valid model and 14,000 parameters on one input, the refusal is as cheap.
    one = infer_request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28))
    for i in range(14_000):
        one.inputs[0].parameters[f"p{i}"].string_param = "x"
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(one, timeout=20)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "parameters" in err.value.details()


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.binary(max_size=512))
def test_undecodable_request_bytes_are_refused(fuzz_node, payload):
    node, _, channel = fuzz_node
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(payload, timeout=20)
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code = exc.code()
    assert code in ALLOWED, code
    assert node.running
