"""Open Inference Protocol message conversion, shared by the node's servicer and the client.

Requests are checked cheaply and in order of cost before anything is copied: counts of
inputs, outputs and parameters, name lengths, shape ranks and sizes. So a request's
work on the event loop is bounded by a small constant per input, whatever it holds
(a 300 KB request with 14,000 inputs is refused at once). Request-level parameters are
not copied into each input: an input sees them behind its own through a ``ChainMap``.

Example::

    >>> import torch
    >>> from edgesplit.runtime.codec import encode
    >>> msg = build_infer_request("resnet_fm.from.4", {"input": encode(torch.zeros(1, 2), "int8")}, "7")
    >>> req = parse_infer_request(msg)
    >>> req.inputs[0].datatype, req.inputs[0].params["codec"], req.id
    ('INT8', 'int8', '7')
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edgesplit.protos import inference_pb2
from edgesplit.runtime.codec import EncodedTensor
from edgesplit.runtime.inference import TYPED_NUMPY, InferError, InferInput, InferOutput, InferRequest, InferResult

_TYPED_FIELD = {
    "FP32": "fp32_contents", "FP64": "fp64_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "UINT8": "uint_contents",
}

PUSHBACK_KEY = "grpc-retry-pushback-ms"  # trailing metadata of a refusal: milliseconds before a retry is worth it


DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # gRPC message limit of nodes and clients


@dataclass(frozen=True)
class RequestLimits:
    """Bounds a request must respect before any of it is converted."""

    max_inputs: int = 16
    max_outputs: int = 16
    max_parameters: int = 32  # per parameter map
    max_name_length: int = 256
    max_ndim: int = 8
    max_dim: int = 1 << 31


DEFAULT_LIMITS = RequestLimits()


def parameter_value(p: inference_pb2.InferParameter) -> object:
    """The Python value held by an InferParameter (None when unset)."""
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def set_parameter(p: inference_pb2.InferParameter, value: object) -> None:
    """Store ``value`` in the InferParameter field of its type (bool, int64, double or string)."""
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _invalid(message: str) -> InferError:
    return InferError(InferError.INVALID_ARGUMENT, message)


def _parameters(params, limits: RequestLimits, where: str) -> dict[str, object]:
    if len(params) > limits.max_parameters:
        raise _invalid(f"{where} has {len(params)} parameters; at most {limits.max_parameters} are accepted")
    out = {}
    for key, value in params.items():
        if len(key) > limits.max_name_length:
            raise _invalid(f"{where} has a parameter name of {len(key)} characters (limit {limits.max_name_length})")
        out[key] = parameter_value(value)
    return out


def parse_infer_request(
    request: inference_pb2.ModelInferRequest,
    limits: RequestLimits = DEFAULT_LIMITS,
    timeout_s: float | None = None,
) -> InferRequest:
    """Convert a ModelInferRequest to an :class:`InferRequest`, refusing malformed ones cheaply."""
    n_inputs, n_raw = len(request.inputs), len(request.raw_input_contents)
    if n_inputs > limits.max_inputs:
        raise _invalid(f"request has {n_inputs} inputs; at most {limits.max_inputs} are accepted")
    if n_raw and n_raw != n_inputs:
        raise _invalid(f"{n_raw} raw_input_contents for {n_inputs} inputs; give one per input")
    if len(request.outputs) > limits.max_outputs:
        raise _invalid(f"request asks for {len(request.outputs)} outputs; at most {limits.max_outputs}")
    for text, what in ((request.model_version, "model_version"), (request.id, "id")):
        if len(text) > limits.max_name_length:
            raise _invalid(f"{what} has {len(text)} characters (limit {limits.max_name_length})")
    shared = _parameters(request.parameters, limits, "request")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if len(name) > limits.max_name_length:
            raise _invalid(f"input {i} has a name of {len(name)} characters (limit {limits.max_name_length})")
        if len(tensor.shape) > limits.max_ndim:
            raise _invalid(f"input {name!r} has {len(tensor.shape)} dimensions (limit {limits.max_ndim})")
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 or d >= limits.max_dim for d in shape):
            raise _invalid(f"input {name!r}: invalid shape {list(shape)}")
        own = _parameters(tensor.parameters, limits, f"input {name!r}")
        params: Mapping[str, object] = ChainMap(own, shared) if shared else own
        if n_raw:
            if tensor.HasField("contents"):  # the protocol allows one or the other (Triton refuses both too)
                raise _invalid(f"input {name!r} has typed contents while the request uses raw_input_contents; "
                               "send its data one way")
            inputs.append(InferInput(name, tensor.datatype, shape, request.raw_input_contents[i], params))
            continue
        field = _TYPED_FIELD.get(tensor.datatype)
        if field is None or not tensor.HasField("contents"):
            typed = ", ".join(sorted(TYPED_NUMPY))
            raise _invalid(f"input {name!r} has no data: send raw_input_contents, or typed contents for {typed}")
        values = getattr(tensor.contents, field)
        inputs.append(InferInput(name, tensor.datatype, shape, b"", params, values=values))
    requested = []
    for out in request.outputs:
        if len(out.name) > limits.max_name_length:
            raise _invalid(f"a requested output name has {len(out.name)} characters (limit {limits.max_name_length})")
        requested.append(out.name)
    return InferRequest(
        model_name=request.model_name, inputs=inputs, model_version=request.model_version, id=request.id,
        requested_outputs=requested, timeout_s=timeout_s,
    )


def build_infer_response(result: InferResult, request_id: str, raw: bool = True, arrived_s: float | None = None,
                         clock_id: str = "") -> inference_pb2.ModelInferResponse:
    """An answer in raw contents (when the request used them) or typed contents.

    ``arrived_s``: when the request reached the node, in seconds on a monotonic clock named
    by ``clock_id`` (sent as ``edge_arrival_seconds`` and ``edge_clock``; only the difference
    between two answers stamped by the same clock means anything)."""
    response = inference_pb2.ModelInferResponse(
        model_name=result.model_name, model_version=result.model_version, id=request_id
    )
    if arrived_s is not None:
        set_parameter(response.parameters["edge_arrival_seconds"], float(arrived_s))
        set_parameter(response.parameters["edge_clock"], clock_id)
    set_parameter(response.parameters["edge_compute_seconds"], float(result.compute_seconds))
    set_parameter(response.parameters["edge_queue_seconds"], float(result.queue_seconds))
    set_parameter(response.parameters["edge_batch_size"], int(result.batch_size))
    for out in result.outputs:
        tensor = response.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        if raw:
            response.raw_output_contents.append(out.data)
        else:
            values = np.frombuffer(out.data, dtype=TYPED_NUMPY[out.datatype])
            getattr(tensor.contents, _TYPED_FIELD[out.datatype]).extend(values.tolist())
    return response


def build_infer_request(
    model_name: str, tensors: Mapping[str, EncodedTensor], request_id: str = "", version: str = ""
) -> inference_pb2.ModelInferRequest:
    """A ModelInferRequest carrying ``tensors`` (input name -> encoded tensor) as raw contents,
    each with its own codec parameters."""
    request = inference_pb2.ModelInferRequest(model_name=model_name, id=request_id, model_version=version)
    for name, tensor in tensors.items():
        inp = request.inputs.add(name=name, datatype=tensor.datatype, shape=list(tensor.shape))
        for key, value in tensor.params.items():
            set_parameter(inp.parameters[key], value)
        request.raw_input_contents.append(tensor.data)
    return request


def parse_infer_response(response: inference_pb2.ModelInferResponse) -> tuple[list[InferOutput], dict[str, object]]:
    """The outputs and parameters of a ModelInferResponse, each output's data as raw bytes.

    Outputs come in raw contents (as this project's nodes send them to a raw request) or,
    from another server of the protocol, in typed contents (``fp32_contents``...), which
    are packed into raw bytes here; ValueError for anything else."""
    if not response.raw_output_contents and response.outputs:
        return [_typed_output(t) for t in response.outputs], _response_parameters(response)
    if len(response.raw_output_contents) != len(response.outputs):
        raise ValueError(
            f"answer has {len(response.raw_output_contents)} raw outputs for {len(response.outputs)} output tensors"
        )
    outputs = [
        InferOutput(t.name, t.datatype, tuple(t.shape), response.raw_output_contents[i])
        for i, t in enumerate(response.outputs)
    ]
    return outputs, _response_parameters(response)


def _typed_output(tensor) -> InferOutput:
    field = _TYPED_FIELD.get(tensor.datatype)
    if field is None or not tensor.HasField("contents"):
        raise ValueError(f"output {tensor.name!r} has no data: neither raw nor typed {tensor.datatype} contents")
    dtype = np.dtype(TYPED_NUMPY[tensor.datatype])
    values = np.asarray(getattr(tensor.contents, field), dtype=np.float64 if dtype.kind == "f" else np.int64)
    if dtype.kind in "iu" and values.size and not (
            np.iinfo(dtype).min <= values.min() and values.max() <= np.iinfo(dtype).max):
        raise ValueError(f"output {tensor.name!r}: typed contents out of the {tensor.datatype} range")
    return InferOutput(tensor.name, tensor.datatype, tuple(tensor.shape), values.astype(dtype).tobytes())


def _response_parameters(response: inference_pb2.ModelInferResponse) -> dict[str, object]:
    return {k: parameter_value(v) for k, v in response.parameters.items()}
