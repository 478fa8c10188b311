"""Circuit breaker for offloading: stop calling a node that keeps failing, probe it later.

Closed: calls go through; ``failure_threshold`` failures in a row open it. Open: calls are
refused (the device computes locally) for ``reset_seconds``. Half-open: one probe goes
through; its success closes the breaker, its failure opens it again.

Example::

    >>> b = CircuitBreaker(failure_threshold=2, reset_seconds=10)
    >>> b.failure(); b.failure(); b.allow()
    False
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(
        self, failure_threshold: int = 3, reset_seconds: float = 0.5, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.clock = clock
        self.state = self.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go through now? In half-open state only one probe at a time may."""
        with self._lock:
            if self.state == self.OPEN and self.clock() - self._opened_at >= self.reset_seconds:
                self.state = self.HALF_OPEN
                self._probe_out = False
            if self.state == self.CLOSED:
                return True
            if self.state == self.HALF_OPEN and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self.state = self.CLOSED
            self._failures = 0
            self._probe_out = False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self.state == self.HALF_OPEN or self._failures >= self.failure_threshold:
                self.state = self.OPEN
                self._opened_at = self.clock()
                self._probe_out = False
