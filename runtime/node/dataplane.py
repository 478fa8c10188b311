"""The node's data plane: admit, validate and queue requests for the models of a registry.

It knows nothing of gRPC: transports convert their messages to
:class:`~edgesplit.runtime.inference.InferRequest` and back, and map
:class:`~edgesplit.runtime.inference.InferError` codes to their status codes at one
boundary. On the event loop it does only cheap work, in this order: resolve the model,
admit the request or refuse it (RESOURCE_EXHAUSTED) before looking at its payload, check
names, datatypes and shapes, and queue it. Decoding, the model and encoding run in worker
threads (:mod:`.batching`), so health checks and metrics answer while the node is busy.

Example::

    >>> import asyncio, torch
    >>> from edgesplit.models import build_model
    >>> from edgesplit.runtime.codec import encode
    >>> from edgesplit.runtime.inference import InferInput, InferRequest
    >>> from edgesplit.runtime.node.registry import ModelRegistry, register_split_model
    >>> registry = ModelRegistry()
    >>> _ = register_split_model(registry, build_model("resnet_fm").eval())
    >>> enc = encode(torch.zeros(1, 16, 28, 28), "fp32")
    >>> request = InferRequest("resnet_fm.from.4", [InferInput("input", enc.datatype, enc.shape, enc.data, enc.params)])
    >>> async def once():
    ...     plane = DataPlane(registry)
    ...     try:
    ...         return await plane.infer(request)
    ...     finally:
    ...         await plane.aclose()
    >>> asyncio.run(once()).outputs[0].shape
    (1, 10)
"""

from __future__ import annotations

import asyncio
import math
import random
import time

from edgesplit.runtime import codec
from edgesplit.runtime.inference import TYPED_NUMPY, InferError, InferRequest, InferResult
from edgesplit.runtime.metrics import NodeMetrics

from .batching import BatchOutcome, ModelQueue, Pending, WorkerSlots
from .registry import ModelRegistry, ServedModel, shown
from .workers import ProcessWorkers, ThreadWorkers

MAX_INPUT_ELEMENTS = 1 << 24  # per input tensor, whole batch
class DataPlane:
    """Serve the models of a registry, bounded in requests in flight and batch size.

    ``max_inflight`` counts requests queued or running; beyond it a request is refused
    at once. ``workers`` batches run at a time, each in its own thread.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: NodeMetrics | None = None,
        max_inflight: int = 96,
        workers: int = 2,
        max_elements: int = MAX_INPUT_ELEMENTS,
        executor: ThreadWorkers | ProcessWorkers | None = None,
    ) -> None:
        if max_inflight < 1 or workers < 1:
            raise ValueError("max_inflight and workers must be at least 1")
        self._workers = executor or ThreadWorkers(workers, max_elements)
        workers = self._workers.workers
        self.registry = registry
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.workers = workers
        self.max_elements = max_elements
        self._inflight = 0
        self._seconds_per_request = 0.0  # moving average of worker time per request, over all workers
        self._slots: WorkerSlots | None = None
        self._queues: dict[str, ModelQueue] = {}
        self._idle: asyncio.Event | None = None

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet answered (queued or running)."""
        return self._inflight

    def resolve(self, model_name: str, version: str = "") -> ServedModel:
        return self.registry.get(model_name, version)

    async def infer(self, request: InferRequest) -> InferResult:
        """Answer ``request`` or raise :class:`InferError` with its status class."""
        model = self.registry.get(request.model_name, request.model_version)
        self.admit_or_refuse()
        rows = self._validate(model, request)
        now = time.perf_counter()
        deadline = None if request.timeout_s is None else now + request.timeout_s
        loop = asyncio.get_running_loop()
        item = Pending(request, rows, loop.create_future(), now, deadline)
        queue = self._queue(model)
        self._admit()  # released by the queue when the request leaves it, answered or not
        queue.submit(item)
        try:
            return await item.future
        except asyncio.CancelledError:
            # The caller left: take the request (and its payload) out of the queue now; one
            # already in a running batch stays counted until the batch ends.
            item.future.cancel()
            queue.withdraw(item)
            raise

    def admit_or_refuse(self) -> None:
        """Raise RESOURCE_EXHAUSTED (with a pushback) when the node is at its in-flight limit."""
        if self._inflight >= self.max_inflight:
            raise InferError(
                InferError.RESOURCE_EXHAUSTED,
                f"node is at its limit of {self.max_inflight} requests in flight; retry later or run locally",
                # Spread over one to three drain times, so refused clients do not come back together.
                retry_after_s=self.expected_drain_seconds() * (1.0 + 2.0 * random.random()),
            )

    def _validate(self, model: ServedModel, request: InferRequest) -> int:
        """Cheap structural checks (names, datatypes, shapes, counts); returns the batch size."""
        names = [inp.name for inp in request.inputs]
        if len(names) != len(model.inputs) or set(names) != set(model.input_names):
            unexpected = [n for n in names if n not in model.input_names]
            if unexpected:
                raise InferError(
                    InferError.INVALID_ARGUMENT,
                    f"unexpected input {shown(unexpected[0])} for model {model.name}; "
                    f"it takes {', '.join(model.input_names)}",
                )
            raise InferError(
                InferError.INVALID_ARGUMENT,
                f"model {model.name} expects {len(model.inputs)} input(s) ({', '.join(model.input_names)}), "
                f"got {len(names)}" + (" with repeated names" if len(set(names)) != len(names) else ""),
            )
        for wanted in request.requested_outputs:
            if wanted not in model.output_names:
                raise InferError(
                    InferError.INVALID_ARGUMENT,
                    f"unexpected output {shown(wanted)} for model {model.name}; it has {', '.join(model.output_names)}",
                )
        specs = model.input_specs
        batch = None
        for inp in request.inputs:
            spec = specs[inp.name]
            if inp.datatype not in spec.datatypes:
                raise InferError(
                    InferError.INVALID_ARGUMENT,
                    f"input {inp.name!r}: datatype {shown(inp.datatype, 16)} is not accepted; "
                    f"send one of {', '.join(spec.datatypes)}",
                )
            shape = tuple(inp.shape)
            if len(shape) != 1 + len(spec.shape) or shape[1:] != spec.shape:
                raise InferError(
                    InferError.INVALID_ARGUMENT,
                    f"input {inp.name!r} of {model.name} expects shape "
                    f"[batch, {', '.join(map(str, spec.shape))}], got {list(shape)[:8]}",
                )
            limit = model.batching.max_batch
            if not 1 <= shape[0] <= limit:
                raise InferError(InferError.INVALID_ARGUMENT, f"batch size {shape[0]} is outside 1..{limit}")
            if batch is not None and shape[0] != batch:
                raise InferError(InferError.INVALID_ARGUMENT, "all inputs of a request need the same batch size")
            batch = shape[0]
            count = math.prod(shape)
            if count > self.max_elements:
                raise InferError(
                    InferError.INVALID_ARGUMENT, f"input {inp.name!r} has {count} elements, over {self.max_elements}"
                )
            if inp.values is None:
                problem = codec.payload_size_problem(len(inp.data), inp.datatype, shape, inp.params)
                if problem:
                    raise InferError(InferError.INVALID_ARGUMENT, f"input {inp.name!r}: {problem}")
            else:
                if inp.datatype not in TYPED_NUMPY:
                    raise InferError(InferError.INVALID_ARGUMENT, f"input {inp.name!r}: no typed contents for "
                                     f"{inp.datatype}; send raw_input_contents")
                if len(inp.values) != count:
                    raise InferError(
                        InferError.INVALID_ARGUMENT,
                        f"input {inp.name!r} has {len(inp.values)} values for shape {list(shape)} ({count} needed)",
                    )
        return batch or 0

    def _queue(self, model: ServedModel) -> ModelQueue:
        queue = self._queues.get(model.name)
        if queue is None:
            if self._slots is None:
                self._slots = WorkerSlots(self.workers)
            queue = ModelQueue(model, self._workers, self._slots, self._on_batch, self._release)
            self._queues[model.name] = queue
        return queue

    def _admit(self) -> None:
        self._inflight += 1
        if self.metrics:
            self.metrics.inflight.set(self._inflight)

    def _release(self, _item: Pending | None = None) -> None:
        self._inflight -= 1
        if self.metrics:
            self.metrics.inflight.set(self._inflight)
        if self._inflight == 0 and self._idle is not None:
            self._idle.set()

    def expected_drain_seconds(self) -> float:
        """How long the requests in flight should take to clear, from recent batches (the
        pushback a refused client is given)."""
        return min(1.0, max(0.001, self._inflight * self._seconds_per_request))

    def _on_batch(self, model: ServedModel, batch: list[Pending], outcome: BatchOutcome, started: float) -> None:
        if batch:
            per_request = outcome.compute_seconds / len(batch) / self.workers
            self._seconds_per_request += 0.2 * (per_request - self._seconds_per_request)
        if outcome.rows:
            model.stats.add_batch(len(batch), outcome.rows, outcome.compute_seconds,
                                  sum(started - p.enqueued for p in batch))
        if self.metrics and outcome.rows:
            self.metrics.child("batch_size", model.name).observe(outcome.rows)
            self.metrics.child("compute_seconds", model.name).observe(outcome.compute_seconds)
            queue_seconds = self.metrics.child("queue_seconds", model.name)
            for p in batch:
                queue_seconds.observe(max(0.0, started - p.enqueued))

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        if self._inflight == 0:
            return True
        if self._idle is None or self._idle.is_set():
            self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def aclose(self) -> None:
        """Fail queued requests (UNAVAILABLE), finish running batches, stop the workers."""
        for queue in self._queues.values():
            await queue.close()
        self._workers.close()
