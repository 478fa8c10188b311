"""Transport-neutral inference messages: what a request carries, what an answer holds, what fails.

The node's data plane speaks these types; the gRPC servicer and the client convert Open
Inference Protocol messages to and from them (:mod:`edgesplit.runtime.transport.oip`), so
the engine never sees protobuf or gRPC. :class:`InferError` carries a status class name
that transports map to their own codes at one boundary.

Example::

    >>> req = InferRequest("resnet_fm.from.4", [InferInput("input", "FP32", (1, 16, 28, 28), b"")])
    >>> req.inputs[0].nbytes
    0
    >>> InferError(InferError.NOT_FOUND, "no such model").code
    'NOT_FOUND'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


class InferError(Exception):
    """A request that cannot be answered with a result; ``code`` names the status class."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"

    def __init__(self, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # with RESOURCE_EXHAUSTED: when trying again is worth it


@dataclass
class InferInput:
    """One input tensor as it arrived: its bytes (or typed values) plus how to read them.

    ``data`` holds raw little-endian bytes; a request that used the protocol's typed
    contents instead leaves ``data`` empty and puts the values in ``values`` (converted
    to bytes by the worker that decodes them, never on the event loop).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes = b""
    params: Mapping[str, object] = field(default_factory=dict)
    values: Sequence | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of payload this input carried (typed values counted at their wire size)."""
        if self.values is not None:
            return len(self.values) * TYPED_ITEMSIZE.get(self.datatype, 4)
        return len(self.data)

    def raw_bytes(self) -> bytes:
        """The payload as raw bytes (typed values converted here; call off the event loop)."""
        if self.values is None:
            return self.data
        wire = np.dtype(TYPED_NUMPY[self.datatype])
        if wire.kind in "iu":  # refuse values that would wrap around instead of converting them
            wide = np.asarray(self.values, dtype=np.int64)
            info = np.iinfo(wire)
            if wide.size and (wide.min() < info.min or wide.max() > info.max):
                raise ValueError(f"{self.datatype} values must lie in {info.min}..{info.max}")
            return wide.astype(wire).tobytes()
        return np.asarray(self.values, dtype=wire).tobytes()


# Datatypes whose typed contents we accept, with their numpy wire type.
TYPED_NUMPY = {"FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "UINT8": "u1"}
TYPED_ITEMSIZE = {k: np.dtype(v).itemsize for k, v in TYPED_NUMPY.items()}


@dataclass
class InferRequest:
    """One inference request: the model it names, its inputs and the outputs it wants."""

    model_name: str
    inputs: list[InferInput]
    model_version: str = ""
    id: str = ""
    requested_outputs: list[str] = field(default_factory=list)
    timeout_s: float | None = None  # what the caller's deadline leaves, when it set one


@dataclass
class InferOutput:
    """One output tensor as raw little-endian bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass
class InferResult:
    """The answer to one request, with where its time went on the node."""

    model_name: str
    model_version: str
    outputs: list[InferOutput]
    compute_seconds: float
    queue_seconds: float
    batch_size: int = 1  # rows in the batch this request ran in


class OffloadError(Exception):
    """An offload that did not produce an answer; ``reason`` is the status name (e.g. UNAVAILABLE)."""

    def __init__(self, reason: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        # With RESOURCE_EXHAUSTED from a node shedding load: the pushback it sent. None when
        # the refusal came from elsewhere (gRPC's own message-size limit, on either side).
        self.retry_after_s = retry_after_s
        # The call had to open the connection first: a timeout then says nothing of the link's rate
        self.cold = False

    @property
    def node_alive(self) -> bool:
        """The node answered this call itself: it shed load (with its pushback) or refused the
        request as malformed; not a sign that the node is failing."""
        return self.reason == "INVALID_ARGUMENT" or (self.reason == "RESOURCE_EXHAUSTED"
                                                     and self.retry_after_s is not None)


@dataclass
class OffloadResult:
    """What a node answered to an offloaded tail, and what it cost."""

    logits: object  # torch.Tensor
    edge_seconds: float
    round_trip_seconds: float
    sent_bytes: int
    batch_size: int = 1  # rows in the node's batch this request ran in
    # The call had to open the connection first (a new client, a node back from a restart):
    # its round trip holds the TCP and HTTP/2 handshakes and says nothing of the link's rate.
    cold: bool = False
    # When the request reached the node, on the node's own monotonic clock (None if it did not
    # say), and a name for that clock: the gap between two requests sent back to back and
    # stamped by the same clock is the second's time on the link.
    edge_arrival_s: float | None = None
    edge_clock: str | None = None
