"""Dynamic batching: a queue per served model, batches formed when a worker is free.

Requests for the same model from many devices wait in that model's queue. When one of
the node's workers is free, the queue's dispatcher takes the waiting requests, up to the
model's ``max_batch`` rows and, when other workers are free too, about its share of the
queue (at least ``preferred_batch``); while another batch is running (the node is loaded) it first
waits up to ``max_delay_s`` for the queue to reach ``preferred_batch`` rows, so a loaded
node runs fuller batches and an idle node never delays a request. A request whose
deadline has passed is answered DEADLINE_EXCEEDED and never run; a request whose caller
went away is dropped.

The batch itself runs in a worker thread (:func:`execute_batch`): each request's inputs
are decoded there by their own codec (so mixed codecs batch together), stacked, run,
split back, and each request's outputs encoded, so the event loop only moves references.
One request's bad payload fails that request alone.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgesplit.runtime import codec
from edgesplit.runtime.inference import InferError, InferOutput, InferRequest, InferResult

from .registry import ServedModel

log = logging.getLogger("edgesplit.node.batching")


class WorkerSlots:
    """The node's worker threads as slots shared by every model's queue; counts batches running.

    Used on the event loop only.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.busy = 0
        self._freed: asyncio.Event | None = None

    def try_acquire(self) -> bool:
        if self.busy < self.workers:
            self.busy += 1
            return True
        return False

    async def acquire(self) -> None:
        while not self.try_acquire():
            if self._freed is None:
                self._freed = asyncio.Event()
            self._freed.clear()
            await self._freed.wait()

    def release(self) -> None:
        self.busy -= 1
        if self._freed is not None:
            self._freed.set()


@dataclass
class Pending:
    """A request waiting in a model's queue."""

    request: InferRequest
    rows: int
    future: asyncio.Future
    enqueued: float  # time.perf_counter()
    deadline: float | None  # time.perf_counter() by which it must be answered
    left: bool = False  # has left the queue or its batch (counted out of the node's in-flight total)


@dataclass
class BatchOutcome:
    """What a worker returns for one batch: per request a result or an error."""

    answers: list[InferResult | InferError]
    rows: int
    compute_seconds: float


class ModelQueue:
    """The pending requests of one served model and the task that batches them."""

    def __init__(
        self,
        model: ServedModel,
        workers,  # ThreadWorkers or ProcessWorkers: submit(model, requests) -> Future[BatchOutcome]
        slots: WorkerSlots,
        on_batch: Callable[[ServedModel, list[Pending], BatchOutcome, float], None],
        on_leave: Callable[[Pending], None],
    ) -> None:
        self.model = model
        self._workers = workers
        self._slots = slots
        self._on_batch = on_batch
        self._on_leave = on_leave
        self._queue: collections.deque[Pending] = collections.deque()
        self._rows = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._running = 0
        self._drained: asyncio.Event | None = None
        self._loop = asyncio.get_running_loop()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, item: Pending) -> None:
        """Queue ``item``; its future gets the result or an :class:`InferError`."""
        if not self._queue and self._slots.busy == 0 and self._slots.try_acquire():
            self._launch([item], alone=True)  # an idle node: straight to a worker, no dispatcher round
            return
        self._queue.append(item)
        self._rows += item.rows
        self._arrived.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._dispatch(), name=f"batcher {self.model.name}")
            self._task.add_done_callback(self._dispatcher_ended)

    def withdraw(self, item: Pending) -> None:
        """Take a request whose caller left out of the queue (no-op once it is in a batch)."""
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._rows -= item.rows
        self._leave(item)

    def _leave(self, item: Pending) -> None:
        if not item.left:
            item.left = True
            self._on_leave(item)

    def _dispatcher_ended(self, task: asyncio.Task) -> None:
        """A dispatcher that failed must not strand its queue: fail what waits, start afresh later."""
        self._task = None
        if task.cancelled() or task.exception() is None:
            return
        log.error("batcher of %s failed: %r; failing its queue", self.model.name, task.exception())
        while self._queue:
            item = self._pop()
            if not item.future.done():
                item.future.set_exception(InferError(InferError.INTERNAL, "the node's batcher failed; retry"))
            self._leave(item)

    async def close(self) -> None:
        """Stop dispatching; fail what is queued with UNAVAILABLE; wait for running batches."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(InferError(InferError.UNAVAILABLE, "node is shutting down"))
            self._leave(item)
        self._rows = 0
        if self._running:
            self._drained = asyncio.Event()
            await self._drained.wait()

    async def _dispatch(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._slots.acquire()
            try:
                await self._fill()
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            self._launch(batch)

    async def _fill(self) -> None:
        """While the node is loaded, wait briefly for the queue to reach the preferred size."""
        config = self.model.batching
        if not config.enabled:
            return
        # busy counts this dispatcher's own slot too: more than one means another batch is running
        while self._queue and self._rows < config.preferred_batch and self._slots.busy > 1:
            left = self._queue[0].enqueued + config.max_delay_s - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[Pending]:
        """Pop the next batch: skip callers that left, fail expired requests, respect max_batch."""
        config = self.model.batching
        # Share the queue with the other free workers rather than leave them idle.
        free_others = self._slots.workers - self._slots.busy
        share = -(-self._rows // (1 + free_others))
        limit = min(config.max_batch, max(config.preferred_batch, share)) if config.enabled else 1
        batch: list[Pending] = []
        rows = 0
        now = time.perf_counter()
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # the caller went away (cancelled)
                self._leave(self._pop())
                continue
            if item.deadline is not None and now >= item.deadline:
                self._pop()
                item.future.set_exception(InferError(
                    InferError.DEADLINE_EXCEEDED,
                    f"deadline passed after {1000 * (now - item.enqueued):.1f} ms in the queue; not run",
                ))
                self._leave(item)
                continue
            if batch and (rows + item.rows > limit or not config.enabled):
                break
            self._pop()
            batch.append(item)
            rows += item.rows
        return batch

    def _pop(self) -> Pending:
        item = self._queue.popleft()
        self._rows -= item.rows
        return item

    def _launch(self, batch: list[Pending], alone: bool = False) -> None:
        """Run ``batch`` on a worker (the caller holds a slot); answers arrive via the loop.

        ``alone``: the request came to an idle node (nothing running, nothing queued), so the
        loop is idle too and a thread of this process costs no contention. A batch taken from
        the queue is not alone, however short the queue: requests waited, so the node is
        loaded, and the batch goes to a worker process to leave the loop free to admit."""
        started = time.perf_counter()
        self._running += 1
        try:
            work = self._workers.submit(self.model, [p.request for p in batch], alone=alone)
        except BaseException as exc:  # the executor is shut down, or broken: answer, never strand
            self._finish(batch, exc, started)
            return
        work.add_done_callback(lambda done: self._loop.call_soon_threadsafe(self._finish, batch, done, started))

    def _finish(self, batch: list[Pending], done, started: float) -> None:
        self._slots.release()
        self._running -= 1
        try:
            if isinstance(done, BaseException):
                raise done
            outcome = done.result()
        except BaseException as exc:  # the executor itself failed: nobody may hang
            error = InferError(InferError.UNAVAILABLE, f"node could not run the batch: {type(exc).__name__}")
            outcome = BatchOutcome([error] * len(batch), sum(p.rows for p in batch), 0.0)
        for item, answer in zip(batch, outcome.answers):
            if not item.future.done():
                if isinstance(answer, InferError):
                    item.future.set_exception(answer)
                else:
                    answer.queue_seconds = max(0.0, started - item.enqueued)
                    item.future.set_result(answer)
        for item in batch:
            if not item.future.done():  # an outcome short of answers must not strand a caller
                item.future.set_exception(InferError(InferError.INTERNAL, "the batch returned no answer"))
            self._leave(item)
        self._on_batch(self.model, batch, outcome, started)
        if self._running == 0 and self._drained is not None:
            self._drained.set()


def execute_batch(model: ServedModel, requests: list[InferRequest], max_elements: int) -> BatchOutcome:
    """Decode, stack, run, split and encode one batch (runs in a worker thread)."""
    answers: list[InferResult | InferError | None] = [None] * len(requests)
    decoded: list[tuple[int, list[torch.Tensor]]] = []
    for i, request in enumerate(requests):
        try:
            decoded.append((i, _decode_inputs(model, request, max_elements)))
        except InferError as exc:
            answers[i] = exc
    rows = 0
    compute = 0.0
    if decoded:
        by_name = [[tensors[k] for _, tensors in decoded] for k in range(len(model.inputs))]
        stacked = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in by_name]
        rows = stacked[0].shape[0]
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                outputs = model.run(stacked)
        except Exception as exc:  # a model failure answers INTERNAL, never kills the node
            error = InferError(InferError.INTERNAL, f"{model.name} failed: {type(exc).__name__}: {exc}")
            for i, _ in decoded:
                answers[i] = error
            return BatchOutcome(answers, rows, time.perf_counter() - started)  # type: ignore[arg-type]
        compute = time.perf_counter() - started
        arrays = [_float32_array(y) for y in outputs]  # once per batch; split below as numpy views
        offset = 0
        with np.errstate(over="ignore", invalid="ignore"):  # a sum that overflows is checked exactly
            for i, tensors in decoded:
                n = tensors[0].shape[0]
                rows_of = [y[offset:offset + n] for y in arrays]
                offset += n
                # NaN logits answered OK would be taken as a prediction by a client that does not
                # check. Whose fault: inputs beyond SANE_INPUT_MAGNITUDE (int8 values at a scale of
                # 1e36) are the caller's, INVALID_ARGUMENT, which devices do not count against the
                # node; NaN from ordinary inputs is the model's (weights gone bad), INTERNAL, which
                # devices count as the node failing and take elsewhere.
                if not all(math.isfinite(y.sum()) or np.isfinite(y).all() for y in rows_of):
                    answers[i] = _non_finite_error(model, tensors)
                    continue
                answers[i] = _result(model, requests[i], rows_of, compute, rows)
    return BatchOutcome(answers, rows, compute)  # type: ignore[arg-type]


SANE_INPUT_MAGNITUDE = 1e6  # beyond this, an input that drives a model to NaN is the caller's doing


def _non_finite_error(model: ServedModel, tensors: list[torch.Tensor]) -> InferError:
    """The error for a request whose outputs came out NaN or infinite (see execute_batch)."""
    largest = max(float(t.abs().max()) if t.numel() else 0.0 for t in tensors)
    if largest > SANE_INPUT_MAGNITUDE:
        return InferError(InferError.INVALID_ARGUMENT,
                          f"{model.name} computed NaN or Inf outputs for input values up to {largest:.3g}: beyond "
                          "the range the model handles")
    return InferError(InferError.INTERNAL, f"{model.name} computed NaN or Inf outputs for ordinary input values "
                                           f"(up to {largest:.3g}): the model is broken on this node")


def _decode_inputs(model: ServedModel, request: InferRequest, max_elements: int) -> list[torch.Tensor]:
    by_name = {inp.name: inp for inp in request.inputs}
    tensors = []
    for spec in model.inputs:
        inp = by_name[spec.name]
        try:
            x = codec.decode_array(inp.raw_bytes(), inp.datatype, inp.shape, inp.params, max_elements=max_elements)
        except (codec.CodecError, ValueError, OverflowError) as exc:
            raise InferError(InferError.INVALID_ARGUMENT, f"input {spec.name!r}: {exc}") from None
        # A finite sum means finite values (the exact check runs only when it is not).
        # Checked in numpy, as the answers are encoded: each torch call outside the model
        # runs several microseconds of dispatcher code, more on a CPU gone cold while idle.
        with np.errstate(over="ignore", invalid="ignore"):  # a huge finite sum is checked exactly below
            rough = math.isfinite(x.sum())
        if not rough and not np.isfinite(x).all():
            raise InferError(InferError.INVALID_ARGUMENT, f"input {spec.name!r} holds NaN or Inf values")
        tensors.append(torch.from_numpy(x))
    return tensors


def _float32_array(y: torch.Tensor) -> np.ndarray:
    """A model output as a C-contiguous little-endian float32 array (a view when it already is one)."""
    return np.ascontiguousarray(y.detach().cpu().numpy(), dtype="<f4")


def _result(
    model: ServedModel, request: InferRequest, outputs: list[np.ndarray], compute: float, rows: int
) -> InferResult:
    """One request's answer: its rows of each (wanted) output, as FP32 bytes."""
    wanted = set(request.requested_outputs) if request.requested_outputs else None
    encoded = []
    for spec, y in zip(model.outputs, outputs):
        if wanted is not None and spec.name not in wanted:
            continue
        encoded.append(InferOutput(spec.name, "FP32", y.shape, y.tobytes()))
    return InferResult(model.name, model.version, encoded, compute, 0.0, rows)
