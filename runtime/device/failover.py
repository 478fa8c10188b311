"""Offload across one or more edge nodes, with one circuit breaker per node.

This is the device side's only circuit-breaking layer. A call goes to the preferred node
(the last one that answered); on a failure it moves to the next node whose breaker lets
it through, as long as the deadline leaves time:

- UNAVAILABLE (node down, connection refused or reset): count a failure, try the next node;
- RESOURCE_EXHAUSTED (node full): try the next node, no failure counted (it is alive) when
  the refusal carries the node's pushback; without it (gRPC's own message-size limit) a
  failure is counted;
- INVALID_ANSWER (the node answered NaN or infinite logits) and INTERNAL (its model failed,
  or computed NaN, which an edgesplit node refuses to answer): count a failure, try the next;
- UNAUTHENTICATED, PERMISSION_DENIED and UNIMPLEMENTED (this node was given another token,
  say after a rotation that missed it, or is not an edgesplit node): count a failure, try the
  next: it is one node's setting, and the node is of no use to this client for any model;
- NOT_FOUND (this node does not serve that segment): try the next, no failure counted: the
  node is alive and may serve the client's other segments, so its breaker stays as it was;
- DEADLINE_EXCEEDED: count a failure and give up: the time is spent, a retry cannot help;
- anything else (INVALID_ARGUMENT, ...): give up at once: every node would say so.

When every breaker is open the call fails at once with reason ``CIRCUIT_OPEN``. Every
call a breaker let through reports its outcome to that breaker, whatever happens, so a
half-open breaker's single probe slot is always given back.

Example::

    client = FailoverClient([EdgeClient("198.18.0.11:8001"), EdgeClient("198.18.0.12:8001")])
    runner = DeviceRunner(model, cut=4, client=client)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from edgesplit.runtime import codec
from edgesplit.runtime.inference import OffloadError, OffloadResult

from .breaker import CircuitBreaker

# INVALID_ANSWER: the node answered NaN or infinite logits (corrupted weights, say); INTERNAL:
# the node's model failed, or computed NaN and refused to answer it: a failure of that node,
# and another one may answer properly.
# One node's settings refuse this client whatever it asks (its token, its services): a breaker
# opened by them spares later calls the round trip until the node is probed again. NOT_FOUND
# is one node's models: retried elsewhere, but the node is alive for the segments it serves.
NODE_SETTINGS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"})
RETRY_ELSEWHERE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "INVALID_ANSWER", "INTERNAL",
                             "NOT_FOUND"}) | NODE_SETTINGS
COUNTS_AS_FAILURE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN",
                               "INVALID_ANSWER"}) | NODE_SETTINGS
# Below this, a further attempt cannot finish in time; fail fast and complete locally.
MIN_ATTEMPT_SECONDS = 0.005
T = TypeVar("T")


class Offloader(Protocol):
    """What the device needs of a client: run a segment on a node, or raise OffloadError."""

    def infer(
        self,
        model_name: str,
        tensors: codec.EncodedTensor | Mapping[str, codec.EncodedTensor],
        timeout: float,
        request_id: str = "",
        wait_for_ready: bool = False,
        expect: tuple[int, ...] | None = None,
    ) -> OffloadResult: ...


class FailoverClient:
    """An offloader over several node clients (for example ``EdgeClient`` s), used like one."""

    def __init__(
        self,
        clients: Sequence[Offloader],
        breakers: Sequence[CircuitBreaker] | None = None,
        failure_threshold: int = 2,
        reset_seconds: float = 0.5,
    ) -> None:
        if not clients:
            raise ValueError("FailoverClient needs at least one client")
        self.clients = list(clients)
        self.breakers = (
            list(breakers) if breakers else [CircuitBreaker(failure_threshold, reset_seconds) for _ in self.clients]
        )
        if len(self.breakers) != len(self.clients):
            raise ValueError("give one breaker per client")
        self._preferred = 0
        self._lock = threading.Lock()
        self.attempts: dict[str, int] = {self._target(i): 0 for i in range(len(self.clients))}

    def _target(self, i: int) -> str:
        return str(getattr(self.clients[i], "target", f"client{i}"))

    @property
    def targets(self) -> list[str]:
        return [self._target(i) for i in range(len(self.clients))]

    @property
    def connected(self) -> bool:
        """Whether the connection to the node a call would go to first (the preferred one, or the
        next whose breaker is not open) is up (see EdgeClient.connected)."""
        with self._lock:
            start = self._preferred
        n = len(self.clients)
        for step in range(n):
            i = (start + step) % n
            if self.breakers[i].state != CircuitBreaker.OPEN:
                return getattr(self.clients[i], "connected", True)
        return True

    def infer(
        self,
        model_name: str,
        tensors: codec.EncodedTensor | Mapping[str, codec.EncodedTensor],
        timeout: float,
        request_id: str = "",
        wait_for_ready: bool = False,
        expect: tuple[int, ...] | None = None,
    ) -> OffloadResult:
        """Offload to the first node that answers within ``timeout``; raise OffloadError otherwise.
        (``expect``: the answer's shape; a node answering another counts as failing.)

        A half-open breaker's probe waits (within the deadline) for the node's connection
        to come back instead of failing at once while gRPC is still in reconnect backoff;
        otherwise a node that has just restarted would be probed too early and stay shunned.
        """
        return self._first_answer(
            lambda client, remaining, wait: client.infer(model_name, tensors, remaining, request_id,
                                                         wait_for_ready=wait, expect=expect),
            timeout, wait_for_ready)

    def infer_train(
        self,
        model_name: str,
        payloads: Sequence[codec.EncodedTensor],
        timeout: float,
        request_id: str = "",
    ) -> Train:
        """Send ``payloads`` to ``model_name`` on one node back to back, each without waiting
        for the answer to the one before (a train, for timing the link), and give the answers
        in order; the node is chosen, and failures move on, as for :meth:`infer` (a node
        that refuses one of them, full say, gives no train). A node client without
        ``infer_async`` gets them one after another, and the train says so."""
        return self._first_answer(
            lambda client, remaining, wait: send_train(client, model_name, payloads, remaining, request_id, wait),
            timeout, False)

    def _first_answer(self, call: Callable[[Offloader, float, bool], T], timeout: float, wait_for_ready: bool) -> T:
        """``call(client, remaining_s, wait_for_ready)`` on the first node that answers within
        ``timeout``, breakers told of every outcome; OffloadError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            start = self._preferred
        last = OffloadError("CIRCUIT_OPEN", "every edge node's circuit is open; completing locally")
        n = len(self.clients)
        for step in range(n):
            i = (start + step) % n
            remaining = deadline - time.monotonic()
            if remaining < MIN_ATTEMPT_SECONDS:
                raise OffloadError("DEADLINE_EXCEEDED", f"no time left after {step} attempts") from None
            breaker = self.breakers[i]
            if not breaker.allow():
                continue
            probe = breaker.state == CircuitBreaker.HALF_OPEN
            with self._lock:
                self.attempts[self._target(i)] += 1
            try:
                result = call(self.clients[i], remaining, wait_for_ready or probe)
            except OffloadError as exc:
                last = exc
                # RESOURCE_EXHAUSTED without the node's pushback is gRPC's own message-size
                # refusal (an answer too large, say): nothing shows the node is working.
                if exc.reason in COUNTS_AS_FAILURE or (exc.reason == "RESOURCE_EXHAUSTED" and not exc.node_alive):
                    breaker.failure()
                else:
                    breaker.success()  # it answered: alive, just full or refusing
                if exc.reason not in RETRY_ELSEWHERE:
                    raise
                continue
            except BaseException:
                breaker.failure()  # an unexpected error: never keep the probe slot
                raise
            breaker.success()
            with self._lock:
                self._preferred = i
            return result
        raise last

    def close(self) -> None:
        for c in self.clients:
            close = getattr(c, "close", None)
            if close:
                close()


@dataclass
class Train:
    """The answers to a train of requests, in order; ``back_to_back``: whether each left
    without waiting for the answer to the one before (else one after another)."""

    answers: list[OffloadResult]
    back_to_back: bool


def send_train(client: Offloader, model_name: str, payloads: Sequence[codec.EncodedTensor], timeout: float,
               request_id: str = "", wait_for_ready: bool = False) -> Train:
    """``payloads`` to one node client, back to back when it can start a call without waiting
    (``infer_async``), else one after another; OffloadError on any failure."""
    deadline = time.monotonic() + timeout
    start = getattr(client, "infer_async", None)
    if start is None:
        answers = []
        for p in payloads:
            remaining = deadline - time.monotonic()
            if remaining < MIN_ATTEMPT_SECONDS:
                raise OffloadError("DEADLINE_EXCEEDED", f"no time left after {len(answers)} of the train")
            answers.append(client.infer(model_name, p, remaining, request_id, wait_for_ready=wait_for_ready))
        return Train(answers, back_to_back=False)
    # the keyword only when wanted: an offloader's infer_async need not take it
    extra = {"wait_for_ready": True} if wait_for_ready else {}
    pending = []
    try:
        for p in payloads:
            pending.append(start(model_name, p, timeout, request_id, **extra))
        return Train([p.result() for p in pending], back_to_back=True)
    except BaseException:
        for p in pending:
            p.cancel()  # nothing to wait for once one failed (a finished call ignores it)
        raise
