"""The data plane without any transport: resolution, validation, admission, multi-input models."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from edgesplit.models import load_trained
from edgesplit.runtime.codec import encode
from edgesplit.runtime.inference import InferError, InferInput, InferRequest
from edgesplit.runtime.node.dataplane import DataPlane
from edgesplit.runtime.node.registry import ModelRegistry, ServedModel, TensorSpec
from edgesplit.runtime.node.settings import NodeSettings
from tests.helpers import gated_model, registry_of, wait_for


def request(model: str, tensor: torch.Tensor, codec: str = "fp32", name: str = "input", **kw) -> InferRequest:
    enc = encode(tensor, codec)
    return InferRequest(model, [InferInput(name, enc.datatype, enc.shape, enc.data, enc.params)], **kw)


def run(plane_factory, coro_fn):
    async def main():
        plane = plane_factory()
        try:
            return await coro_fn(plane)
        finally:
            await plane.aclose()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def registry():
    return registry_of(load_trained("resnet_fm"))


def error_of(registry, req: InferRequest, **plane_kw) -> InferError:
    async def go(plane):
        with pytest.raises(InferError) as err:
            await plane.infer(req)
        return err.value

    return run(lambda: DataPlane(registry, **plane_kw), go)


def test_tail_matches_the_model_and_reports_its_batch(registry, trained_model):
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        h = trained_model.run(x, 0, 4)
        expected = trained_model(x).numpy()
    result = run(lambda: DataPlane(registry, workers=1), lambda p: p.infer(request("resnet_fm.from.4", h)))
    out = np.frombuffer(result.outputs[0].data, dtype="<f4").reshape(3, 10)
    assert np.abs(out - expected).max() < 1e-5
    assert result.batch_size == 3 and result.model_version == "1" and result.compute_seconds > 0


def test_unknown_model_and_version_are_not_found_and_names_are_not_echoed_whole(registry):
    err = error_of(registry, request("x" * (31 << 20), torch.zeros(1, 16, 28, 28)))
    assert err.code == InferError.NOT_FOUND and len(err.message) < 300 and "characters" in err.message
    assert error_of(registry, request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), model_version="2")).code \
        == InferError.NOT_FOUND
    ok = run(lambda: DataPlane(registry), lambda p: p.infer(request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28),
                                                                   model_version="1")))
    assert ok.outputs[0].shape == (1, 10)


@pytest.mark.parametrize("mistake,expected", [
    ("wrong name", "unexpected input 'x'"),
    ("extra input", "expects 1 input"),
    ("unknown output", "unexpected output 'probs'"),
    ("datatype", "UINT8"),
    ("typed count", "values for shape"),
    ("mixed batch", "same batch size"),
])
def test_structural_mistakes_are_invalid_argument(registry, mistake, expected):
    req = request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28))
    if mistake == "wrong name":
        req.inputs[0].name = "x"
    elif mistake == "extra input":
        req.inputs.append(InferInput("input", "FP32", (1, 16, 28, 28), b""))
    elif mistake == "unknown output":
        req.requested_outputs = ["probs"]
    elif mistake == "datatype":
        req.inputs[0].datatype = "UINT8"
    elif mistake == "typed count":
        req.inputs[0].data, req.inputs[0].values = b"", [0.0] * 10
    elif mistake == "mixed batch":
        two = ServedModel("two", (TensorSpec("a", (2,)), TensorSpec("b", (2,))), (TensorSpec("y", (2,)),),
                          run=lambda xs: [xs[0] + xs[1]])
        reg = ModelRegistry()
        reg.add(two)
        enc1, enc2 = encode(torch.zeros(1, 2)), encode(torch.zeros(2, 2))
        req = InferRequest("two", [InferInput("a", "FP32", enc1.shape, enc1.data, enc1.params),
                                   InferInput("b", "FP32", enc2.shape, enc2.data, enc2.params)])
        registry = reg
    err = error_of(registry, req)
    assert err.code == InferError.INVALID_ARGUMENT and expected in err.message, err.message


def test_a_payload_that_does_not_fit_its_shape_is_refused_before_queueing(registry):
    """Review finding: a 32 MiB payload on a [1,16,28,28] input was admitted, queued and piped."""
    for data in (b"\0" * 100, b"\0" * (16 * 28 * 28 * 4 + 1), b"\0" * (32 << 20)):
        bad = request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28))
        bad.inputs[0].data = data
        err = error_of(registry, bad)
        assert err.code == InferError.INVALID_ARGUMENT and "needs exactly 50176" in err.message
    zipped = request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28))
    zipped.inputs[0].params = {"codec": "fp32", "compression": "zlib"}
    zipped.inputs[0].data = b"\0" * (1 << 20)
    assert "more than zlib ever makes" in error_of(registry, zipped).message


def test_a_bad_payload_is_invalid_argument_from_the_worker(registry):
    bad = request("resnet_fm.from.4", torch.zeros(1, 16, 28, 28), codec="int8")
    del bad.inputs[0].params["scale"]
    assert error_of(registry, bad).code == InferError.INVALID_ARGUMENT
    nan = torch.zeros(1, 16, 28, 28)
    nan[0, 0, 0, 0] = float("nan")
    assert "NaN" in error_of(registry, request("resnet_fm.from.4", nan)).message


def test_a_full_node_refuses_before_looking_at_the_payload():
    model, gate = gated_model()
    registry = registry_of(model)

    async def go(plane):
        first = asyncio.ensure_future(plane.infer(request("echo", torch.ones(1, 4))))
        await wait_for(gate.entered.is_set, 10, "the first request to run")
        garbage = request("echo", torch.ones(1, 4))
        garbage.inputs[0].data = b"not a tensor"
        with pytest.raises(InferError) as err:
            await plane.infer(garbage)
        gate.release.set()
        await first
        return err.value

    err = run(lambda: DataPlane(registry, max_inflight=1, workers=1), go)
    assert err.code == InferError.RESOURCE_EXHAUSTED and "limit of 1" in err.message
    assert err.retry_after_s is not None and 0 < err.retry_after_s <= 1.0


def test_a_model_with_several_inputs_gets_each_with_its_own_codec():
    weights = torch.tensor([[1.0, 2.0, 3.0]])
    model = ServedModel(
        "mix", (TensorSpec("a", (3,)), TensorSpec("b", (3,))), (TensorSpec("y", (3,), ("FP32",)),),
        run=lambda xs: [xs[0] * weights + xs[1]],
    )
    registry = ModelRegistry()
    registry.add(model)
    a, b = torch.tensor([[1.0, -1.0, 0.5]]), torch.tensor([[0.25, 0.5, -2.0]])
    ea, eb = encode(a, "fp16"), encode(b, "int8")
    req = InferRequest("mix", [InferInput("b", eb.datatype, eb.shape, eb.data, eb.params),
                               InferInput("a", ea.datatype, ea.shape, ea.data, ea.params)])
    result = run(lambda: DataPlane(registry), lambda p: p.infer(req))
    y = np.frombuffer(result.outputs[0].data, dtype="<f4")
    assert np.allclose(y, (a * weights + b).numpy().ravel(), atol=0.02)


def test_default_threads_never_oversubscribe():
    """Defect: --threads 0 (torch's default) x --workers 2 ran up to 2.3x slower on 2 cores."""
    default = NodeSettings(port=0)
    assert (default.worker_count(cores=2), default.thread_count(cores=2)) == (2, 1)
    assert not default.oversubscribed(cores=2)
    for threads in (0, 1, 2, 3):
        for cores in (1, 2, 4, 16):
            s = NodeSettings(port=0, threads=threads)
            assert s.worker_count(cores) * s.thread_count(cores) <= max(cores, threads)
    assert NodeSettings(port=0, workers=2, threads=2).oversubscribed(cores=2)
