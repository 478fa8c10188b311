"""Offload client: send crossing tensors to a node's Open Inference Protocol service.

It converts an :class:`~edgesplit.runtime.codec.EncodedTensor` to a ModelInferRequest,
calls the node with a deadline, and turns every gRPC failure into an :class:`OffloadError`
carrying the status name, so the device runner never sees gRPC types.

Example::

    client = EdgeClient("127.0.0.1:8001")
    result = client.infer("resnet_fm.from.4", encode(h, "int8"), timeout=0.5)
    result.logits.shape          # torch.Size([1, 10])
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import torch

from edgesplit.protos import inference_pb2, inference_pb2_grpc

from . import codec
from .grpc_server import DEFAULT_MAX_MESSAGE_BYTES, parameter_value, set_parameter

# Reconnect quickly after a node comes back: gRPC's default backoff grows to 120 s.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    # Notice a dead connection (link down, peer gone) within about two seconds.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


class OffloadError(Exception):
    """An offload that did not produce an answer; ``reason`` is the gRPC status name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class OffloadResult:
    logits: torch.Tensor
    edge_seconds: float
    round_trip_seconds: float
    sent_bytes: int


class EdgeClient:
    """A synchronous client of one node's data plane."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def infer(
        self, model_name: str, tensor: codec.EncodedTensor, timeout: float, request_id: str = ""
    ) -> OffloadResult:
        """Run ``model_name`` on the node; raise OffloadError on any failure."""
        request = inference_pb2.ModelInferRequest(model_name=model_name, id=request_id)
        inp = request.inputs.add(name="input", datatype=tensor.datatype, shape=list(tensor.shape))
        for key, value in tensor.params.items():
            set_parameter(inp.parameters[key], value)
        request.raw_input_contents.append(tensor.data)
        started = time.perf_counter()
        try:
            response = self.stub.ModelInfer(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise OffloadError(exc.code().name, exc.details() or "") from None
        round_trip = time.perf_counter() - started
        if len(response.outputs) != 1 or len(response.raw_output_contents) != 1:
            raise OffloadError("INTERNAL", "node answered without exactly one raw output")
        out = response.outputs[0]
        try:
            logits = codec.decode(response.raw_output_contents[0], out.datatype, tuple(out.shape))
        except codec.CodecError as exc:
            raise OffloadError("INTERNAL", f"node answered a malformed tensor: {exc}") from None
        edge = (
            parameter_value(response.parameters["edge_compute_seconds"])
            if "edge_compute_seconds" in response.parameters
            else 0.0
        )
        return OffloadResult(logits, float(edge or 0.0), round_trip, len(tensor.data))

    def close(self) -> None:
        self.channel.close()
