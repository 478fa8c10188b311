"""Tests of the link's bandwidth model (edgesplit.linksim.link): a message of B bytes takes
B / rate on top of the delay, with no free burst, in the model and through a real emulator."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import statistics
import struct
import time
from collections.abc import Iterator

import pytest

from edgesplit.linksim import LinkEmulatorThread, LinkSettings
from edgesplit.linksim.link import BACKLOG_SECONDS, MBPS, TIMER_RESOLUTION, Link, piece_bytes

from .servers import serve

pytestmark = pytest.mark.timeout(60)

RATE_MBPS = 2.0
TOLERANCE = 0.10  # relative to the expected time ...
SLACK = 0.0015  # ... plus this much: asyncio timers have a resolution of 1 ms
IDLE = 0.025  # pause before each request, so that each finds the link idle
REPEATS = 7


# --------------------------------------------------------------------------- the model
class _Clock:
    """A loop clock that only moves when a wait asks it to."""

    def __init__(self, settings: LinkSettings) -> None:
        self.now = 100.0
        self.settings = settings
        self.waits: list[float | None] = []

        self.changes: list[tuple[float, LinkSettings]] = []  # (when, settings): applied as time passes

    async def wait_changed(self, timeout: float | None) -> None:
        self.waits.append(timeout)
        if self.changes and (timeout is None or self.changes[0][0] <= self.now + timeout):
            self.now, self.settings = self.changes.pop(0)
            return
        if timeout is None or timeout < 0.0005:
            raise AssertionError(f"pointless wait: {timeout!r}")
        self.now += timeout


async def _sent(link: Link, n: int) -> float:
    """When the last byte of ``n`` bytes has left, sent piece by piece as a pump does."""
    left, sent = n, 0.0
    while left:
        taken, sent = await link.send(left)
        assert 0 < taken <= left
        left -= taken
    return sent


def _link(settings: LinkSettings) -> tuple[Link, _Clock]:
    clock = _Clock(settings)
    return Link(lambda: clock.now, lambda: clock.settings, clock.wait_changed), clock


def test_a_message_on_an_idle_link_takes_bytes_over_rate() -> None:
    async def scenario() -> None:
        link, clock = _link(LinkSettings(rate_mbps=RATE_MBPS))
        rate = RATE_MBPS * MBPS
        step = piece_bytes(rate)
        n = 3136
        start = clock.now
        sent = []
        for off in range(0, n, step):
            taken, at = await link.send(n - off)
            assert taken == min(step, n - off)  # pieces sized for the rate
            sent.append(at)
        # the last byte leaves B / rate after the first was sent: no free burst
        assert sent[-1] - start == pytest.approx(n / rate)
        # and each piece no earlier than its own last byte
        assert sent == pytest.approx([start + min(off + step, n) / rate for off in range(0, n, step)])
        # a long idle time earns no credit: the next message takes as long again
        clock.now += 10.0
        start = clock.now
        assert await _sent(link, 1000) - start == pytest.approx(1000 / rate)

    asyncio.run(scenario())


def test_a_rate_change_re_times_the_piece_on_the_wire() -> None:
    async def scenario() -> None:
        slow = LinkSettings(rate_mbps=0.1)  # 12.5 kB/s: 512-byte pieces of 41 ms
        rate = 0.1 * MBPS
        link, clock = _link(slow)
        start = clock.now
        # A deep dip (a trace's 0.000624 Mbit/s) 1 ms into the piece, for half a second: the
        # piece leaves when the link recovers, not 6.4 s later at the dip's rate.
        dip = LinkSettings(rate_mbps=0.000624)
        clock.changes = [(start + 0.001, dip), (start + 0.501, slow)]
        taken, sent = await link.send(100_000)
        assert taken == 512
        left = 512 - 0.001 * rate - 0.5 * 0.000624 * MBPS  # what the first 1 ms and the dip sent
        assert sent == pytest.approx(start + 0.501 + left / rate)
        # an outage (rate 0) in the middle of the next piece: the bytes sent before it count,
        # the rest goes when it ends
        begun = link.busy_until  # the next piece starts when this one has left
        clock.changes = [(begun + 0.02, LinkSettings(rate_mbps=0)), (begun + 1.02, slow)]
        taken, sent = await link.send(100_000)
        assert sent == pytest.approx(begun + 1.02 + (512 - 0.02 * rate) / rate)
        # a rise mid-piece speeds up its rest
        begun = link.busy_until
        clock.changes = [(begun + 0.01, LinkSettings(rate_mbps=1.0))]
        taken, sent = await link.send(100_000)
        assert taken == 512
        assert sent == pytest.approx(begun + 0.01 + (512 - 0.01 * rate) / (1.0 * MBPS))

    asyncio.run(scenario())


def test_bulk_transfer_keeps_the_rate_and_stamps_ahead_a_bounded_time() -> None:
    async def scenario() -> None:
        link, clock = _link(LinkSettings(rate_mbps=RATE_MBPS))
        rate = RATE_MBPS * MBPS
        step = piece_bytes(rate)
        start = clock.now
        last = start
        for _ in range(200):  # 250 KB, 1 s at 2 Mbit/s
            taken, sent = await link.send(step)
            assert taken == step and sent > last
            assert sent - clock.now <= BACKLOG_SECONDS + TIMER_RESOLUTION + step / rate
            last = sent
            clock.now += 0.0013  # the pump wakes late: no gap, no rate lost
        assert last - start == pytest.approx(200 * step / rate)

    asyncio.run(scenario())


def test_unlimited_rate_sends_at_once_and_forgets_the_backlog() -> None:
    async def scenario() -> None:
        link, clock = _link(LinkSettings(rate_mbps=1))
        await link.send(100_000)
        clock.settings = LinkSettings()
        assert await link.send(1_000_000) == (1_000_000, clock.now)  # all of it, at once
        clock.settings = LinkSettings(rate_mbps=1)
        start = clock.now
        assert await _sent(link, 1250) - start == pytest.approx(0.01)

    asyncio.run(scenario())


def test_transmit_queues_behind_a_busy_link() -> None:
    link, _ = _link(LinkSettings(rate_mbps=1))
    assert link.transmit(0.0, 125, 1000.0) == pytest.approx(0.125)
    assert link.transmit(0.1, 125, 1000.0) == pytest.approx(0.25)  # busy: waits its turn
    assert link.transmit(1.0, 125, 1000.0) == pytest.approx(1.125)  # idle: starts now


# --------------------------------------------------------------------------- through the emulator
class _Stamp(socketserver.BaseRequestHandler):
    """Messages that start with their own length (8 bytes, counted in it); each is answered
    with the ``perf_counter()`` at which its last byte arrived (an 8-byte double)."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while head := _recv_exactly(sock, 8):
                _recv_exactly(sock, int.from_bytes(head, "big") - 8)
                sock.sendall(struct.pack("!d", time.perf_counter()))
        except (OSError, EOFError):
            pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if not buf:
                return b""
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@pytest.fixture
def stamp_port() -> Iterator[int]:
    yield from serve(_Stamp)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _request(sock: socket.socket, n: int) -> tuple[float, float]:
    """Send an ``n``-byte message; return (one-way time, round trip with the 8-byte reply)."""
    message = n.to_bytes(8, "big") + bytes(n - 8)
    start = time.perf_counter()
    sock.sendall(message)
    reply = _recv_exactly(sock, 8)
    done = time.perf_counter()
    (arrived,) = struct.unpack("!d", reply)
    return arrived - start, done - start


def _within(measured: float, expected: float) -> bool:
    return abs(measured - expected) <= TOLERANCE * expected + SLACK


@pytest.mark.parametrize("delay_ms", [0.0, 10.0])
@pytest.mark.parametrize("size", [300, 3136, 20_000])
def test_request_takes_bytes_over_rate_plus_delay(stamp_port, delay_ms, size) -> None:
    """The reported defect: 3,136 bytes at 2 Mbit/s crossed in about 0 ms plus the delay
    (a free burst of about 15 ms at the rate) instead of 12.5 ms plus the delay."""
    rate = RATE_MBPS * MBPS
    delay = delay_ms / 1000
    settings = LinkSettings(rate_mbps=RATE_MBPS, delay_ms=delay_ms)
    with LinkEmulatorThread("127.0.0.1", stamp_port, settings=settings, control_port=None) as link:
        with _connect(link.port) as s:
            _request(s, 64)  # the connection is set up end to end
            one_way, round_trip = [], []
            for _ in range(REPEATS):
                time.sleep(IDLE)
                a, b = _request(s, size)
                one_way.append(a)
                round_trip.append(b)
    expected = size / rate + delay
    expected_rtt = expected + 8 / rate + delay
    got, got_rtt = statistics.median(one_way), statistics.median(round_trip)
    assert _within(got, expected), f"one way {got * 1e3:.2f} ms, expected {expected * 1e3:.2f} ms"
    assert _within(got_rtt, expected_rtt), (
        f"round trip {got_rtt * 1e3:.2f} ms, expected {expected_rtt * 1e3:.2f} ms"
    )


def test_connections_share_the_link(stamp_port) -> None:
    """Two requests sent at once on two connections go one after the other over one link:
    the last byte of both arrives after 2 B / rate, not B / rate."""
    rate = RATE_MBPS * MBPS
    size = 10_000
    with LinkEmulatorThread(
        "127.0.0.1", stamp_port, settings=LinkSettings(rate_mbps=RATE_MBPS), control_port=None
    ) as link:
        with _connect(link.port) as a, _connect(link.port) as b:
            _request(a, 64)
            _request(b, 64)
            times = []
            for _ in range(3):
                time.sleep(IDLE)
                message = size.to_bytes(8, "big") + bytes(size - 8)
                start = time.perf_counter()
                a.sendall(message)
                b.sendall(message)
                arrived = [struct.unpack("!d", _recv_exactly(s, 8))[0] for s in (a, b)]
                times.append(max(arrived) - start)
    got = statistics.median(times)
    expected = 2 * size / rate
    assert _within(got, expected), f"{got * 1e3:.2f} ms, expected {expected * 1e3:.2f} ms"


def test_a_connection_may_keep_twice_the_rate_delay_product_in_flight() -> None:
    from edgesplit.linksim.pipes import MAX_QUEUE_LIMIT, QUEUE_LIMIT, queue_limit

    # 100 Mbit/s over a 1 s delay: 12.5 MB in flight at the rate, so 8 MB would cap it at 64 Mbit/s
    assert queue_limit(LinkSettings(rate_mbps=100, delay_ms=1000)) == 25_000_000
    assert queue_limit(LinkSettings(rate_mbps=2, delay_ms=25)) == QUEUE_LIMIT
    assert queue_limit(LinkSettings()) == QUEUE_LIMIT  # unlimited rate: bytes wait out the delay only
    assert queue_limit(LinkSettings(rate_mbps=10_000, delay_ms=10_000)) == MAX_QUEUE_LIMIT
