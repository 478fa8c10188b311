"""What a node answers is checked before the device uses it: malformed parameters or tensors
become OffloadError(INTERNAL), never another exception; a cancelled offload says CANCELLED."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgesplit.protos import inference_pb2
from edgesplit.runtime.inference import OffloadError
from edgesplit.runtime.transport.client import EdgeClient, _offload_result
from edgesplit.runtime.transport.oip import set_parameter


def response(compute=0.001, batch=1, data=None, shape=(1, 3)):
    r = inference_pb2.ModelInferResponse(model_name="m", id="x")
    set_parameter(r.parameters["edge_compute_seconds"], compute)
    set_parameter(r.parameters["edge_batch_size"], batch)
    r.outputs.add(name="logits", datatype="FP32", shape=list(shape))
    r.raw_output_contents.append(np.zeros(shape, np.float32).tobytes() if data is None else data)
    return r


def test_a_well_formed_response_is_read():
    result = _offload_result(response(), 0.01, 10)
    assert result.logits.shape == (1, 3) and result.edge_seconds == pytest.approx(0.001) and result.batch_size == 1


@pytest.mark.parametrize("bad", [
    {"compute": "soon"}, {"compute": float("nan")}, {"compute": -1.0}, {"batch": -2}, {"batch": "many"},
    {"data": b"\x00" * 5}, {"shape": (1, -3), "data": b""},
])
def test_malformed_responses_become_internal_offload_errors(bad):
    with pytest.raises(OffloadError) as err:
        _offload_result(response(**bad), 0.01, 10)
    assert err.value.reason == "INTERNAL"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_an_answer_that_is_not_finite_is_refused(value):
    """An input that overflowed inside the model (an INT8 scale of 3e38) was answered OK with
    NaN logits, and the device used them."""
    with pytest.raises(OffloadError) as err:
        _offload_result(response(data=np.array([[0.0, value, 1.0]], np.float32).tobytes()), 0.01, 10)
    assert err.value.reason == "INVALID_ANSWER"


@pytest.mark.parametrize("shape", [(1, 5), (2, 3), (3,), (1, 3, 1, 1), (0, 3), (1, 0)])
def test_an_answer_of_another_shape_than_expected_is_refused(shape):
    """The shape was never checked: a [1, 5] answer was taken as the model's prediction and
    a [3] answer made the device runner raise instead of answering."""
    with pytest.raises(OffloadError) as err:
        _offload_result(response(shape=shape), 0.01, 10, expect=(1, 3))
    assert err.value.reason == "INVALID_ANSWER" and "expected [1, 3]" in str(err.value)
    assert _offload_result(response(), 0.01, 10, expect=(1, 3)).logits.shape == (1, 3)


def test_an_answer_in_typed_contents_from_another_server_is_read():
    """Another Open Inference Protocol server may answer in typed contents: it was refused
    (INTERNAL) and every request completed on the device."""
    r = inference_pb2.ModelInferResponse(model_name="m", id="x")
    out = r.outputs.add(name="logits", datatype="FP32", shape=[1, 3])
    out.contents.fp32_contents.extend([0.5, -1.0, 2.0])
    result = _offload_result(r, 0.01, 10, expect=(1, 3))
    assert result.logits.tolist() == [[0.5, -1.0, 2.0]] and result.edge_seconds == 0.0
    del out.contents.fp32_contents[:]
    out.contents.fp32_contents.extend([0.5, -1.0])  # two values for a [1, 3] tensor
    with pytest.raises(OffloadError) as err:
        _offload_result(r, 0.01, 10)
    assert err.value.reason == "INTERNAL"
    bad = inference_pb2.ModelInferResponse(model_name="m", id="x")
    bad.outputs.add(name="logits", datatype="FP32", shape=[1, 3])  # no data at all
    with pytest.raises(OffloadError) as err:
        _offload_result(bad, 0.01, 10)
    assert err.value.reason == "INTERNAL" and "no data" in str(err.value)


def test_the_nodes_compute_time_is_capped_by_the_measured_round_trip():
    """A node claiming 1e300 s of compute on a 10 ms call made the device's latency 1e300 s
    and its probes' transfer time negative."""
    assert _offload_result(response(compute=1e300), 0.01, 10).edge_seconds == 0.01


@pytest.mark.parametrize(("value", "read"), [(12.5, 12.5), (3, 3.0), (float("nan"), None), (float("inf"), None),
                                             ("soon", None), (True, None), (None, None)])
def test_the_nodes_arrival_stamp_is_read_when_it_is_a_finite_number(value, read):
    """A probe times the link by the gap between two arrival stamps: one that is not a
    finite number is no stamp (the probe then falls back to the answers' own timing)."""
    r = response()
    if value is not None:
        set_parameter(r.parameters["edge_arrival_seconds"], value)
        set_parameter(r.parameters["edge_clock"], "c1")
    result = _offload_result(r, 0.01, 10)
    assert result.edge_arrival_s == read and result.edge_clock == (None if value is None else "c1")
    for clock in ("", 7):  # no clock named: nothing to compare stamps by
        set_parameter(r.parameters["edge_clock"], clock)
        assert _offload_result(r, 0.01, 10).edge_clock is None


def test_a_cancelled_offload_reports_cancelled():
    from edgesplit.runtime import codec
    from tests.helpers import gated_model, start_in_thread, stop_in_thread

    model, gate = gated_model()
    running, thread = start_in_thread(model)
    client = EdgeClient(running.address)
    try:
        call = client.infer_async("echo", codec.encode(torch.zeros(1, 4), "fp32"), timeout=30)
        assert gate.entered.wait(20), "the request never reached the model"
        assert not call.done()
        call.cancel()
        with pytest.raises(OffloadError) as err:
            call.result()
        assert err.value.reason == "CANCELLED"
    finally:
        gate.release.set()
        client.close()
        stop_in_thread(running, thread)
