"""Offload across several edge nodes: per-node circuit breakers, retries only where they help.

A call goes to the preferred node (the last one that answered); on a failure it moves to
the next node whose breaker lets it through, as long as the deadline leaves time:

- UNAVAILABLE (node down, connection refused or reset): count a failure, try the next node;
- RESOURCE_EXHAUSTED (node full): try the next node, no failure counted (it is alive);
- DEADLINE_EXCEEDED: count a failure and give up: the time is spent, a retry cannot help;
- anything else (INVALID_ARGUMENT, NOT_FOUND, ...): give up at once: every node would say so.

Example::

    client = FailoverClient([EdgeClient("198.18.0.11:8001"), EdgeClient("198.18.0.12:8001")])
    runner = DeviceRunner(model, cut=4, client=client)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from . import codec
from .client import EdgeClient, OffloadError, OffloadResult
from .resilience import CircuitBreaker

RETRY_ELSEWHERE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
COUNTS_AS_FAILURE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"})
# Below this, a further attempt cannot finish in time; fail fast and complete locally.
MIN_ATTEMPT_SECONDS = 0.005


class FailoverClient:
    """An offloader over several :class:`EdgeClient` s, used like one."""

    def __init__(
        self,
        clients: Sequence[EdgeClient],
        breakers: Sequence[CircuitBreaker] | None = None,
        failure_threshold: int = 2,
        reset_seconds: float = 0.5,
    ) -> None:
        if not clients:
            raise ValueError("FailoverClient needs at least one EdgeClient")
        self.clients = list(clients)
        self.breakers = (
            list(breakers) if breakers else [CircuitBreaker(failure_threshold, reset_seconds) for _ in self.clients]
        )
        self._preferred = 0
        self._lock = threading.Lock()
        self.attempts: dict[str, int] = {c.target: 0 for c in self.clients}

    @property
    def targets(self) -> list[str]:
        return [c.target for c in self.clients]

    def infer(
        self, model_name: str, tensor: codec.EncodedTensor, timeout: float, request_id: str = ""
    ) -> OffloadResult:
        """Offload to the first node that answers within ``timeout``; raise OffloadError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            start = self._preferred
        last = OffloadError("UNAVAILABLE", "every edge node's circuit is open")
        n = len(self.clients)
        for step in range(n):
            i = (start + step) % n
            remaining = deadline - time.monotonic()
            if remaining < MIN_ATTEMPT_SECONDS:
                raise OffloadError("DEADLINE_EXCEEDED", f"no time left after {step} attempts") from None
            if not self.breakers[i].allow():
                continue
            self.attempts[self.clients[i].target] += 1
            try:
                result = self.clients[i].infer(model_name, tensor, remaining, request_id)
            except OffloadError as exc:
                last = exc
                if exc.reason in COUNTS_AS_FAILURE:
                    self.breakers[i].failure()
                else:
                    self.breakers[i].success()  # it answered: alive, just full or refusing
                if exc.reason not in RETRY_ELSEWHERE:
                    raise
                continue
            self.breakers[i].success()
            with self._lock:
                self._preferred = i
            return result
        raise last

    def close(self) -> None:
        for c in self.clients:
            c.close()
