"""Offload client: send crossing tensors to a node's Open Inference Protocol service.

It converts encoded tensors (one, or several by input name, each with its own codec
parameters) to a ModelInferRequest (:mod:`.oip`), calls the node with a deadline, and
turns every gRPC failure into an :class:`OffloadError` carrying the status name, so the
device runner never sees gRPC types. It keeps no circuit breaker of its own: that is
:class:`~edgesplit.runtime.device.failover.FailoverClient`'s job, one per node.

Example::

    client = EdgeClient("127.0.0.1:8001")
    result = client.infer("resnet_fm.from.4", encode(h, "int8"), timeout=0.5)
    result.logits.shape          # torch.Size([1, 10])
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import grpc
import torch

from edgesplit.protos import edgesplit_pb2, edgesplit_pb2_grpc, inference_pb2_grpc
from edgesplit.runtime import codec
from edgesplit.runtime.inference import OffloadError, OffloadResult

from .oip import DEFAULT_MAX_MESSAGE_BYTES, PUSHBACK_KEY, build_infer_request, parse_infer_response

__all__ = ["CHANNEL_OPTIONS", "EdgeClient", "OffloadError", "OffloadResult", "PendingOffload", "fetch_graph_profile"]

try:  # the core channel's connectivity codes as grpc's enum
    from grpc._common import CYGRPC_CONNECTIVITY_STATE_TO_CHANNEL_CONNECTIVITY as _CONNECTIVITY
except ImportError:  # pragma: no cover - another grpc layout: states unknown, calls counted warm
    _CONNECTIVITY = {}

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


class EdgeClient:
    """A synchronous client of one node's data plane."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        connect_now: bool = True,
    ) -> None:
        self.target = target
        if credentials is not None:
            self.channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = inference_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        # Connect now rather than on the first request, and know whether a call finds the
        # connection up: one that does not pays the handshakes (a first request measured
        # 180 ms against 13 predicted, and the device read the link as 30 times slower).
        # The channel's state is read when asked, not watched: a subscription keeps a gRPC
        # polling thread, and with it the client, alive until close().
        if connect_now:
            self._connectivity(try_to_connect=True)

    def _connectivity(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity | None:
        try:  # grpc's Channel keeps its core channel here; its own connectivity polling reads it so
            state = self.channel._channel.check_connectivity_state(try_to_connect)
        except (AttributeError, ValueError):  # another grpc, or a closed channel: the state is unknown
            return None
        return _CONNECTIVITY.get(state)

    @property
    def connected(self) -> bool:
        """Whether the connection to the node is up now, so a call pays no handshakes (True
        when this grpc cannot say)."""
        state = self._connectivity()
        return state is None or state is grpc.ChannelConnectivity.READY

    def infer(
        self,
        model_name: str,
        tensors: codec.EncodedTensor | Mapping[str, codec.EncodedTensor],
        timeout: float,
        request_id: str = "",
        wait_for_ready: bool = False,
        expect: tuple[int, ...] | None = None,
    ) -> OffloadResult:
        """Run ``model_name`` on the node; raise OffloadError on any failure.

        ``wait_for_ready`` waits (within ``timeout``) for a connection that is down or in
        reconnect backoff instead of failing at once. ``expect`` is the answer's shape
        (``(rows, classes)``): an answer of another shape is OffloadError(INVALID_ANSWER),
        so a node that answers garbage fails like one that answers nothing.

        ``tensors`` is one encoded tensor (sent as the input named ``input``) or a mapping
        from input name to encoded tensor, for segments that take several crossing tensors.
        """
        request, sent = _request(model_name, tensors, request_id)
        cold = not self.connected
        started = time.perf_counter()
        try:
            try:
                response = self.stub.ModelInfer(request, timeout=timeout, metadata=self.metadata,
                                                wait_for_ready=wait_for_ready)
            except grpc.RpcError as exc:
                raise _offload_error(exc) from None
            result = _offload_result(response, time.perf_counter() - started, sent, expect)
        except OffloadError as exc:
            exc.cold = cold  # a timeout that opened the connection first says nothing of the link
            raise
        result.cold = cold
        return result

    def infer_async(
        self,
        model_name: str,
        tensors: codec.EncodedTensor | Mapping[str, codec.EncodedTensor],
        timeout: float,
        request_id: str = "",
        wait_for_ready: bool = False,
    ) -> PendingOffload:
        """Start ``infer`` without waiting; the :class:`PendingOffload` gives the result or the error."""
        request, sent = _request(model_name, tensors, request_id)
        cold = not self.connected
        future = self.stub.ModelInfer.future(request, timeout=timeout, metadata=self.metadata,
                                             wait_for_ready=wait_for_ready)
        return PendingOffload(future, time.perf_counter(), sent, cold)

    def served(self, timeout: float = 10.0) -> tuple[list[str], list[str]]:
        """What the node serves (NodeInfo): the sha256 of each weights file, and the model names.

        OffloadError if the node cannot say (down, unreachable within ``timeout``).
        """
        stub = edgesplit_pb2_grpc.EdgeSplitControlStub(self.channel)
        try:
            info = stub.NodeInfo(edgesplit_pb2.NodeInfoRequest(), timeout=timeout, metadata=self.metadata,
                                 wait_for_ready=True)
        except grpc.RpcError as exc:
            raise _offload_error(exc) from None
        return [h for h in info.weights_sha256.split(",") if h], list(info.served_models)

    def close(self) -> None:
        self.channel.close()


class PendingOffload:
    """An offload in flight: ``done()``, ``add_done_callback(fn)``, ``result()`` and ``cancel()``."""

    def __init__(self, future: grpc.Future, started: float, sent_bytes: int, cold: bool = False) -> None:
        self._future, self._started, self.sent_bytes, self.cold = future, started, sent_bytes, cold
        self._finished: float | None = None
        future.add_done_callback(self._stamp)

    def _stamp(self, _future: grpc.Future) -> None:
        self._finished = time.perf_counter()

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn) -> None:
        """Call ``fn(self)`` once the offload finishes (at once if it already has)."""
        self._future.add_done_callback(lambda _f: fn(self))

    def cancel(self) -> None:
        self._future.cancel()

    def result(self) -> OffloadResult:
        """The answer (waiting for it if needed); OffloadError on any failure, CANCELLED if cancelled."""
        try:
            response = self._future.result()
        except grpc.FutureCancelledError:
            raise OffloadError("CANCELLED", "the offload was cancelled") from None
        except grpc.RpcError as exc:
            raise _offload_error(exc) from None
        finished = self._finished if self._finished is not None else time.perf_counter()
        result = _offload_result(response, finished - self._started, self.sent_bytes)
        result.cold = self.cold
        return result


def _request(model_name: str, tensors: codec.EncodedTensor | Mapping[str, codec.EncodedTensor],
             request_id: str) -> tuple[object, int]:
    """The ModelInferRequest for ``tensors`` (one tensor is the input named ``input``), and its payload bytes."""
    if isinstance(tensors, codec.EncodedTensor):
        tensors = {"input": tensors}
    return build_infer_request(model_name, tensors, request_id), sum(len(t.data) for t in tensors.values())


def _offload_error(exc: grpc.RpcError) -> OffloadError:
    retry_after = None
    trailing = getattr(exc, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == PUSHBACK_KEY:
            try:
                retry_after = max(0.0, int(value)) / 1000
            except (TypeError, ValueError):
                pass  # a malformed pushback is no pushback
    return OffloadError(exc.code().name, exc.details() or "", retry_after)


def _offload_result(response, round_trip: float, sent: int, expect: tuple[int, ...] | None = None) -> OffloadResult:
    """An OffloadResult from a node's response; OffloadError(INTERNAL) if the response is
    malformed, INVALID_ANSWER if its values are not finite or its shape is not ``expect``.

    The node's own ``edge_compute_seconds`` is capped at the measured round trip (a node
    claiming more made the device's latency absurd and its transfer time negative). A node
    can still say it computed longer than it did, and so make the link look faster; and its
    arrival stamps (``edge_arrival_seconds``), which a probe's gap is taken from, can too:
    the probe caps a gap at the round trip it measured, so they cannot make it look slower."""
    try:
        outputs, params = parse_infer_response(response)
        if len(outputs) != 1:
            raise ValueError(f"expected one output, got {len(outputs)}")
        out = outputs[0]
        logits = codec.decode(out.data, out.datatype, out.shape)
        edge = float(params.get("edge_compute_seconds") or 0.0)
        batch = int(params.get("edge_batch_size") or 1)
        if not (math.isfinite(edge) and edge >= 0 and batch >= 1):
            raise ValueError(f"implausible parameters edge_compute_seconds={edge}, edge_batch_size={batch}")
        arrival = params.get("edge_arrival_seconds")
        arrival = (float(arrival) if isinstance(arrival, (int, float)) and not isinstance(arrival, bool)
                   and math.isfinite(arrival) else None)
        clock = params.get("edge_clock")
        clock = clock if isinstance(clock, str) and clock else None
    except (TypeError, ValueError, OverflowError, codec.CodecError) as exc:
        raise OffloadError("INTERNAL", f"node answered a malformed response: {exc}") from None
    if expect is not None and tuple(logits.shape) != tuple(expect):
        raise OffloadError("INVALID_ANSWER", f"node answered a {list(logits.shape)} tensor, expected {list(expect)}")
    if not bool(torch.isfinite(logits).all()):  # e.g. an input that overflowed inside the model
        raise OffloadError("INVALID_ANSWER", "node answered NaN or infinite values")
    return OffloadResult(logits, min(edge, round_trip), round_trip, sent, batch, edge_arrival_s=arrival,
                         edge_clock=clock)


def fetch_graph_profile(target: str, graph_name: str, repeats: int = 9, batch: int = 1, timeout: float = 600.0,
                        credentials: grpc.ChannelCredentials | None = None, token: str | None = None) -> str:
    """Ask the node at ``target`` to profile a graph it serves; the Profile JSON it measured.

    The edge side of the partitioner's cost model comes from here: the node times every
    graph node on its own hardware (``edgesplit.v1`` ``GraphProfile``). Raises
    OffloadError with the status name if the node refuses or cannot be reached.
    """
    channel = (grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS) if credentials is not None
               else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        stub = edgesplit_pb2_grpc.EdgeSplitControlStub(channel)
        answer = stub.GraphProfile(
            edgesplit_pb2.GraphProfileRequest(graph_name=graph_name, repeats=repeats, batch=batch),
            timeout=timeout, metadata=metadata, wait_for_ready=True)
        return answer.profile_json
    except grpc.RpcError as exc:
        raise OffloadError(exc.code().name, exc.details() or "") from None
    finally:
        channel.close()
