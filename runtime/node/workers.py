"""Where batches run: worker threads in the node's process, or worker processes beside it.

Both take a batch (a served model and its requests) and return a future of its
:class:`~edgesplit.runtime.node.batching.BatchOutcome`.

- :class:`ThreadWorkers`: a thread pool in the node's process. Simple, and what tests and
  in-process servers use; but the workers share the interpreter lock with the event loop,
  and PyTorch releases it only inside each kernel, not between the ops of a forward pass.
  On the 2-core test machine a node with two worker threads never used more than about
  1.3 cores (docs/benchmarks.md, throughput).
- :class:`ProcessWorkers`: one process per worker, forked from the node after its models
  are loaded and before any gRPC object exists, so each has its own interpreter lock and
  a copy-on-write copy of the weights. Batches travel over a pipe as a JSON header plus raw
  tensor bytes (no pickle). A worker that dies is replaced and its batch sent once more to
  the fresh one; a batch whose second worker dies too fails (UNAVAILABLE). A batch that
  would run alone on an idle node runs on a thread of the node instead, which saves the
  pipe crossings when latency matters and contention is nil.
  ``edge-node`` uses these by default.

Worker threads and processes run at a lower CPU priority than the event loop, so that on
a saturated node admissions, refusals and answers are not stuck behind model execution.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from edgesplit.runtime.inference import InferError, InferInput, InferOutput, InferRequest, InferResult

from .batching import BatchOutcome, execute_batch
from .registry import ModelRegistry, ServedModel

log = logging.getLogger("edgesplit.node.workers")

WORKER_NICE = 5


def lower_priority(nice: int = WORKER_NICE) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


class ThreadWorkers:
    """Batches run in a pool of threads of this process."""

    kind = "threads"

    def __init__(self, workers: int, max_elements: int, nice: int = WORKER_NICE) -> None:
        self.workers = workers
        self.max_elements = max_elements
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segment",
                                        initializer=lower_priority, initargs=(nice,))

    def submit(self, model: ServedModel, requests: list[InferRequest], alone: bool = False) -> Future:
        return self._pool.submit(execute_batch, model, requests, self.max_elements)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# -- wire format between the node and its worker processes -------------------------------

def _pack(header: dict, payloads: list[bytes]) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([len(head).to_bytes(4, "little"), head, *payloads])


def _unpack(message: bytes) -> tuple[dict, memoryview]:
    size = int.from_bytes(message[:4], "little")
    return json.loads(message[4:4 + size]), memoryview(message)[4 + size:]


def encode_batch(model: str, requests: list[InferRequest]) -> bytes:
    """The batch as one message; raises ValueError/OverflowError for typed values that do not fit
    their datatype (see :func:`raw_payloads`)."""
    payloads, items = [], []
    for r in requests:
        inputs = []
        for inp in r.inputs:
            data = inp.raw_bytes()
            payloads.append(data)
            inputs.append({"name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape),
                           "params": dict(inp.params), "nbytes": len(data)})
        items.append({"inputs": inputs, "outputs": list(r.requested_outputs), "id": r.id})
    return _pack({"model": model, "requests": items}, payloads)


def decode_batch(message: bytes) -> tuple[str, list[InferRequest]]:
    header, body = _unpack(message)
    requests, offset = [], 0
    for item in header["requests"]:
        inputs = []
        for i in item["inputs"]:
            data = bytes(body[offset:offset + i["nbytes"]])
            offset += i["nbytes"]
            inputs.append(InferInput(i["name"], i["datatype"], tuple(i["shape"]), data, i["params"]))
        requests.append(InferRequest(header["model"], inputs, id=item["id"], requested_outputs=item["outputs"]))
    return header["model"], requests


def encode_outcome(outcome: BatchOutcome) -> bytes:
    payloads, answers = [], []
    for a in outcome.answers:
        if isinstance(a, InferError):
            answers.append({"error": [a.code, a.message]})
            continue
        outs = []
        for o in a.outputs:
            payloads.append(o.data)
            outs.append({"name": o.name, "datatype": o.datatype, "shape": list(o.shape), "nbytes": len(o.data)})
        answers.append({"outputs": outs, "model": a.model_name, "version": a.model_version,
                        "compute": a.compute_seconds, "batch": a.batch_size})
    return _pack({"rows": outcome.rows, "compute": outcome.compute_seconds, "answers": answers}, payloads)


def decode_outcome(message: bytes) -> BatchOutcome:
    header, body = _unpack(message)
    answers: list[InferResult | InferError] = []
    offset = 0
    for a in header["answers"]:
        if "error" in a:
            answers.append(InferError(*a["error"]))
            continue
        outs = []
        for o in a["outputs"]:
            data = bytes(body[offset:offset + o["nbytes"]])
            outs.append(InferOutput(o["name"], o["datatype"], tuple(o["shape"]), data))
            offset += o["nbytes"]
        answers.append(InferResult(a["model"], a["version"], outs, a["compute"], 0.0, a["batch"]))
    return BatchOutcome(answers, header["rows"], header["compute"])


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the node dies (even by SIGKILL)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _close_inherited_descriptors(keep: set[int]) -> None:
    """Close what fork copied from the node (listening and client sockets, epoll, metrics), so
    that a closed node port refuses connections instead of leaving them queued in a worker."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _worker_main(registry: ModelRegistry, conn, inherited: list, threads: int, nice: int, max_elements: int) -> None:
    """A worker process: run each batch that arrives, answer with its outcome, until told to stop."""
    import signal

    import torch

    _die_with_parent()
    for other in inherited:  # pipe ends of the node (ours and other workers') copied by fork
        other.close()
    _close_inherited_descriptors(keep={0, 1, 2, conn.fileno()})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when workers stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(max(1, threads))
    try:
        os.nice(nice)
    except OSError:
        pass
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not message:  # the node's stop message
            return
        try:
            name, requests = decode_batch(message)
            outcome = execute_batch(registry.get(name), requests, max_elements)
        except Exception as exc:  # a malformed batch must not kill the worker
            error = InferError(InferError.INTERNAL, f"worker failed: {type(exc).__name__}: {exc}")
            outcome = BatchOutcome([error], 0, 0.0)
        conn.send_bytes(encode_outcome(outcome))


class _Worker:
    """One worker process and the thread of the node that talks to it."""

    def __init__(self, pool: ProcessWorkers, index: int) -> None:
        self.pool = pool
        self.index = index
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.pending = 0  # batches given to this worker and not finished (guarded by the pool's lock)
        self.process, self.conn = pool._spawn()
        self.thread = threading.Thread(target=self._serve, name=f"worker-io-{index}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            future, model, requests = job
            try:
                if future.set_running_or_notify_cancel():
                    future.set_result(self._run(model, requests))
            except BaseException as exc:  # never leave a caller waiting
                log.exception("worker %d: batch failed", self.index)
                if not future.done():
                    error = InferError(InferError.INTERNAL, f"the node failed to run the batch: {type(exc).__name__}")
                    future.set_result(BatchOutcome([error] * len(requests), 0, 0.0))
            finally:
                with self.pool._lock:
                    self.pending -= 1

    def _run(self, model: ServedModel, requests: list[InferRequest]) -> BatchOutcome:
        answers: list[InferResult | InferError | None] = [None] * len(requests)
        good = []
        for i, r in enumerate(requests):
            try:
                for inp in r.inputs:  # typed values become bytes here; out-of-range ones are refused
                    inp.data, inp.values = inp.raw_bytes(), None
                good.append(i)
            except (ValueError, OverflowError, TypeError) as exc:
                answers[i] = InferError(InferError.INVALID_ARGUMENT, f"input values do not fit their datatype: {exc}")
        if not good:
            return BatchOutcome(answers, 0, 0.0)  # type: ignore[arg-type]
        message = encode_batch(model.name, [requests[i] for i in good])
        outcome = self._exchange(message)
        if len(outcome.answers) != len(good):  # the worker failed the batch as a whole
            outcome = BatchOutcome([outcome.answers[0]] * len(good), outcome.rows, outcome.compute_seconds)
        for i, answer in zip(good, outcome.answers):
            answers[i] = answer
        return BatchOutcome(answers, outcome.rows, outcome.compute_seconds)  # type: ignore[arg-type]

    def _exchange(self, message: bytes) -> BatchOutcome:
        """Send a batch and read its outcome. A worker that is dead, or dies before answering,
        is replaced and the batch sent once more to the fresh one: whether it died of this
        batch cannot be told from here (a worker killed while idle can still take the write,
        and the node only sees the reset when it reads). If the fresh worker dies too, the
        batch fails (UNAVAILABLE): a batch that kills workers costs two of them, no more."""
        for _attempt in range(2):
            if self.conn is None:
                break
            try:
                self.conn.send_bytes(message)
            except (OSError, ValueError):
                log.error("worker process %d is gone; replacing it", self.process.pid)
                self._replace()
                continue
            try:
                return decode_outcome(self.conn.recv_bytes())
            except (EOFError, OSError, ValueError) as exc:
                log.error("worker process %d died during a batch (%s); replacing it", self.process.pid,
                          type(exc).__name__)
                self._replace()
        error = InferError(InferError.UNAVAILABLE, "the worker process running this batch died; retry")
        return BatchOutcome([error], 0, 0.0)

    def _replace(self) -> None:
        try:
            self.conn.close()
        finally:
            if self.process.is_alive():
                self.process.kill()
            self.process.join(5)
        self.conn = None
        if self.pool.closing:
            return
        try:
            self.process, self.conn = self.pool._spawn()
        except OSError as exc:  # out of processes or memory: run on without this worker
            log.error("could not replace worker %d (%s); the node runs on with the others", self.index, exc)


class ProcessWorkers:
    """Batches run in worker processes forked from this one (see the module docstring).

    Create it after the registry's models are loaded and before any gRPC server or channel
    exists in this process: forking a process that holds gRPC threads is unsafe.
    """

    kind = "processes"

    def __init__(self, registry: ModelRegistry, workers: int, threads: int, max_elements: int,
                 nice: int = WORKER_NICE) -> None:
        self.registry = registry
        self.workers = workers
        self.threads = threads
        self.nice = nice
        self.max_elements = max_elements
        self.closing = False
        self._context = multiprocessing.get_context("fork")
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        for i in range(workers):
            self._workers.append(_Worker(self, i))
        self._local = ThreadWorkers(1, max_elements, nice)
        self.local_batches = 0
        self.process_batches = 0

    def _spawn(self):
        parent, child = self._context.Pipe(duplex=True)
        inherited = [parent, *(w.conn for w in self._workers if w.conn is not None and not w.conn.closed)]
        process = self._context.Process(
            target=_worker_main,
            args=(self.registry, child, inherited, self.threads, self.nice, self.max_elements),
            name="edgesplit-worker", daemon=True,
        )
        process.start()
        child.close()
        return process, parent

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.conn is not None]

    def submit(self, model: ServedModel, requests: list[InferRequest], alone: bool = False) -> Future:
        """Queue a batch on the worker with the fewest jobs (the node runs at most ``workers`` at once).

        ``alone``: the batch is a request that came to an idle node (nothing running, none
        queued). Then it runs on a thread of this process instead, which saves the two pipe
        crossings (about 0.15 ms) and costs nothing in contention, since the event loop is idle
        too.
        ``local_batches`` and ``process_batches`` count where batches ran.
        """
        live = [w for w in self._workers if w.conn is not None]
        if alone or not live:  # no worker process left: run on a thread rather than fail
            self.local_batches += 1
            return self._local.submit(model, requests)
        self.process_batches += 1
        future: Future = Future()
        with self._lock:
            worker = min(live, key=lambda w: w.pending)
            worker.pending += 1
        worker.jobs.put((future, model, requests))
        return future

    def close(self) -> None:
        self.closing = True
        self._local.close()
        for w in self._workers:
            w.jobs.put(None)
        for w in self._workers:
            w.thread.join(30)
            if w.conn is not None:
                try:
                    w.conn.send_bytes(b"")  # stop
                except OSError:
                    pass  # already gone
                w.conn.close()
            w.process.join(10)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5)
