"""Circuit breaker: opens after repeated failures, lets one probe through when half-open."""

from edgesplit.runtime.device.breaker import CircuitBreaker


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_breaker_opens_probes_and_closes():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=3, reset_seconds=1.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == b.CLOSED
    b.failure()
    assert b.state == b.OPEN and not b.allow()
    clock.now = 1.5
    assert b.allow() and b.state == b.HALF_OPEN
    assert not b.allow(), "only one probe at a time"
    b.success()
    assert b.state == b.CLOSED and b.allow()


def test_failed_probe_reopens():
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=1, reset_seconds=1.0, clock=clock)
    b.failure()
    clock.now = 1.0
    assert b.allow()
    b.failure()
    assert b.state == b.OPEN and not b.allow()
    clock.now = 2.1
    assert b.allow()
