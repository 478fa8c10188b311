"""Bandwidth of the emulated link: each direction is a serialiser that sends one piece after
another at the set rate, shared by all connections.

A piece of ``n`` bytes takes ``n / rate`` seconds on the wire and may be delivered (after
the delay) once its last byte has been sent, no earlier. The link is busy until then, and
the next piece starts when it is free (or when it arrives, if the link is idle). So a
message of B bytes sent over an idle link arrives ``B / rate + delay`` after it was sent,
whatever its size, and a long transfer moves at the rate exactly.

This replaces a token bucket that released a piece whenever its token count was not
negative and started full: about 15 ms worth of bytes crossed an idle link free, so small
requests were too fast (3,136 bytes at 2 Mbit/s: 22.1 ms measured against 32.7 ms with a
20 ms round trip) while bulk throughput was right.

Times are the event loop's (``loop.time()``) and computed, not measured: a piece's
departure is the previous departure plus its own transmission time, so a timer that wakes
late makes no gap and loses no rate. Pumps stamp pieces up to ``BACKLOG_SECONDS`` ahead of
the wire (which is what lets them wake late); a change of rate applies to the rest of the
piece on the wire at once and to the pieces stamped after it, so within ``BACKLOG_SECONDS``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .settings import LinkSettings

__all__ = ["BACKLOG_SECONDS", "MBPS", "MIN_PIECE", "PIECE_SECONDS", "TIMER_RESOLUTION", "Link", "piece_bytes"]

MBPS = 125_000.0  # bytes per second in one Mbit/s
PIECE_SECONDS = 0.005  # at a limited rate, data moves in pieces of about this much time
MIN_PIECE = 512  # ... but never in pieces smaller than this
MAX_PIECE = 64 * 1024  # ... nor larger than this
BACKLOG_SECONDS = 0.01  # pieces are stamped at most this far ahead of the wire ...
TIMER_RESOLUTION = 0.001  # ... give or take this: asyncio waits no shorter (epoll: 1 ms)


def piece_bytes(rate: float) -> int:
    """Size of the pieces that data moves in at ``rate`` bytes per second."""
    return int(min(MAX_PIECE, max(MIN_PIECE, rate * PIECE_SECONDS)))


class Link:
    """One direction of the emulated link: a serialiser shared by all connections.

    ``clock`` is the loop's clock, ``settings`` returns the settings in force, and
    ``wait_changed(timeout)`` waits until they change or ``timeout`` seconds pass (None:
    no limit).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        settings: Callable[[], LinkSettings],
        wait_changed: Callable[[float | None], Awaitable[None]],
    ) -> None:
        self._clock = clock
        self._settings = settings
        self._wait_changed = wait_changed
        self._lock = asyncio.Lock()  # pieces from all connections, first come first served
        self.busy_until: float | None = None  # when the last piece put on the wire has left

    def transmit(self, now: float, n: float, rate: float) -> float:
        """Put ``n`` bytes on the wire at ``rate`` bytes per second behind what is on it
        already (or at ``now`` if it is idle); return when their last byte has left.

        >>> link = Link(lambda: 0.0, LinkSettings, None)
        >>> link.transmit(1.0, 250, 1000.0), link.transmit(1.0, 250, 1000.0)
        (1.25, 1.5)
        >>> link.transmit(2.0, 100, 1000.0)  # idle again: no credit for the idle time
        2.1
        """
        start = now if self.busy_until is None else max(now, self.busy_until)
        self.busy_until = start + n / rate
        return self.busy_until

    async def send(self, n: int) -> tuple[int, float]:
        """Put the next piece of at most ``n`` bytes on the wire, sized for the rate in force
        when it starts (:func:`piece_bytes`); return how many bytes it took and the loop time
        at which their last byte has been sent (now when the rate is unlimited): the earliest
        they may be delivered, before the delay. While the link is blocked (an outage or a
        rate of 0) this waits for the settings to change.

        A piece is stamped only once its end is within ``BACKLOG_SECONDS``; until then a
        change of rate re-times what is left of it: the bytes sent at the old rate count,
        the rest goes at the new one. So a piece that started on a fast link and meets a
        deep dip (a trace sample of 0.0006 Mbit/s) leaves when the link recovers, not when
        the dip's rate would have let it out many seconds later."""
        async with self._lock:
            taken = None  # the piece's size, fixed when it starts
            left = 0.0  # bytes of the piece not yet sent
            while True:
                s = self._settings()
                if s.blocked:
                    await self._wait_changed(None)
                    continue
                now = self._clock()
                if s.rate_mbps is None:
                    self.busy_until = None
                    return (n if taken is None else taken), now
                rate = s.rate_mbps * MBPS
                if taken is None:
                    taken = min(n, piece_bytes(rate))
                    left = float(taken)
                begin = now if self.busy_until is None else max(now, self.busy_until)
                finish = begin + left / rate
                if finish - now - BACKLOG_SECONDS < TIMER_RESOLUTION:
                    return taken, self.transmit(now, left, rate)
                await self._wait_changed(finish - now - BACKLOG_SECONDS)
                now = self._clock()
                if now > begin:  # this much of the piece went out at ``rate`` meanwhile
                    left -= (now - begin) * rate  # below 0 if the wait overslept: the end is past
                    self.busy_until = now
