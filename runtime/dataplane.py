"""The node's data plane: resolve a served model, decode its input, run the segment, answer.

It knows nothing of gRPC: transports convert their messages to :class:`InferInput` and
back, and map :class:`DataPlaneError` codes to their status codes at one boundary.
Segments are exposed as models: ``resnet_fm`` runs the whole network, ``resnet_fm.from.K``
the tail after cut ``K``. Model execution runs in worker threads (torch releases the
GIL), never on the event loop.

Example::

    >>> import asyncio, torch
    >>> from edgesplit.models import build_model
    >>> from edgesplit.runtime.codec import encode
    >>> plane = DataPlane(build_model("resnet_fm").eval())
    >>> enc = encode(torch.zeros(1, 16, 28, 28), "fp32")
    >>> inp = InferInput("x", enc.datatype, enc.shape, enc.data, enc.params)
    >>> out = asyncio.run(plane.infer("resnet_fm.from.4", [inp]))
    >>> out.outputs[0].shape
    (1, 10)
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from edgesplit.models.split_model import SplitModel

from . import codec
from .metrics import NodeMetrics

_SEGMENT_NAME = re.compile(r"^(?P<model>[A-Za-z0-9_\-]+)(?:\.from\.(?P<cut>\d{1,4}))?$")


class DataPlaneError(Exception):
    """A request the data plane cannot answer; ``code`` names the status class."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class InferInput:
    """One input tensor as it arrived: raw bytes plus how to read them."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes
    params: Mapping[str, object] = field(default_factory=dict)


@dataclass
class InferOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass
class InferResult:
    model_name: str
    outputs: list[InferOutput]
    compute_seconds: float
    queue_seconds: float


@dataclass(frozen=True)
class Segment:
    """A served model: the blocks from ``start`` cut to the end of the network."""

    name: str
    start: int
    input_shape: tuple[int, ...]  # per sample
    output_shape: tuple[int, ...]


class DataPlane:
    """Serve every tail segment of one split model, bounded in concurrency and batch size."""

    def __init__(
        self,
        model: SplitModel,
        metrics: NodeMetrics | None = None,
        max_inflight: int = 32,
        max_batch: int = 64,
        workers: int = 2,
        max_elements: int = 1 << 24,
    ) -> None:
        self.model = model.eval()
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.max_batch = max_batch
        self.max_elements = max_elements
        self._inflight = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segment")
        cuts = model.cut_points()
        out_shape = cuts[-1].shape
        self.segments: dict[str, Segment] = {model.name: Segment(model.name, 0, cuts[0].shape, out_shape)}
        for cut in cuts[:-1]:
            name = f"{model.name}.from.{cut.index}"
            self.segments[name] = Segment(name, cut.index, cut.shape, out_shape)

    @property
    def inflight(self) -> int:
        return self._inflight

    def resolve(self, model_name: str) -> Segment:
        """The segment a model name refers to, or NOT_FOUND with what is served."""
        segment = self.segments.get(model_name)
        if segment is None:
            match = _SEGMENT_NAME.match(model_name or "")
            hint = (
                f"cuts run 0..{self.model.num_blocks - 1}"
                if match and match["model"] == self.model.name
                else (f"this node serves {self.model.name} and {self.model.name}.from.K")
            )
            raise DataPlaneError(DataPlaneError.NOT_FOUND, f"unknown model {model_name!r}: {hint}")
        return segment

    def _decode(self, segment: Segment, inputs: list[InferInput]) -> torch.Tensor:
        if len(inputs) != 1:
            raise DataPlaneError(
                DataPlaneError.INVALID_ARGUMENT, f"{segment.name} takes exactly one input tensor, got {len(inputs)}"
            )
        inp = inputs[0]
        shape = tuple(inp.shape)
        if len(shape) != 1 + len(segment.input_shape) or tuple(shape[1:]) != segment.input_shape:
            raise DataPlaneError(
                DataPlaneError.INVALID_ARGUMENT,
                f"{segment.name} expects shape [batch, {', '.join(map(str, segment.input_shape))}], got {list(shape)}",
            )
        if not 1 <= shape[0] <= self.max_batch:
            raise DataPlaneError(
                DataPlaneError.INVALID_ARGUMENT, f"batch size {shape[0]} is outside 1..{self.max_batch}"
            )
        try:
            x = codec.decode(inp.data, inp.datatype, shape, inp.params, max_elements=self.max_elements)
        except codec.CodecError as exc:
            raise DataPlaneError(DataPlaneError.INVALID_ARGUMENT, f"input {inp.name!r}: {exc}") from None
        if not torch.isfinite(x).all():
            raise DataPlaneError(DataPlaneError.INVALID_ARGUMENT, f"input {inp.name!r} holds NaN or Inf values")
        return x

    def _run(self, segment: Segment, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        started = time.perf_counter()
        with torch.inference_mode():
            y = self.model.run(x, segment.start)
        return y, time.perf_counter() - started

    async def infer(self, model_name: str, inputs: list[InferInput]) -> InferResult:
        """Run the segment ``model_name`` on ``inputs``; raise DataPlaneError on bad requests."""
        segment = self.resolve(model_name)
        x = self._decode(segment, inputs)
        with self._lock:
            if self._inflight >= self.max_inflight:
                raise DataPlaneError(
                    DataPlaneError.RESOURCE_EXHAUSTED,
                    f"node is at its limit of {self.max_inflight} requests in flight; retry later or run locally",
                )
            self._inflight += 1
        if self.metrics:
            self.metrics.inflight.inc()
        queued = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            y, seconds = await loop.run_in_executor(self._executor, self._run, segment, x)
        except Exception as exc:  # a model failure must not take the node down
            raise DataPlaneError(
                DataPlaneError.INTERNAL, f"{segment.name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            with self._lock:
                self._inflight -= 1
            if self.metrics:
                self.metrics.inflight.dec()
        queue_seconds = max(0.0, time.perf_counter() - queued - seconds)
        if self.metrics:
            self.metrics.compute_seconds.labels(model=segment.name).observe(seconds)
        enc = codec.encode(y.contiguous(), "fp32")
        out = InferOutput("logits", enc.datatype, tuple(enc.shape), enc.data)
        return InferResult(segment.name, [out], seconds, queue_seconds)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
