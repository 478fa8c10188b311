"""Forwarding of one proxied connection: per direction, a pump that reads, cuts the bytes
into pieces, puts them through the link and stamps their delivery time, and a writer that
delivers them when that time comes.

A piece's delivery time is when its last byte has left the link (see :mod:`.link`) plus
the delay ± jitter, never earlier than the piece before it, so bytes are never reordered and
delay overlaps with transmission, as on a real link. Loss ``p`` is the probability that a
TCP segment (1448 bytes) is lost; a piece that contains a lost segment, and everything
behind it, is held for ``stall_ms`` (like a retransmission timeout), and the sender's side
of that connection pauses as long.
"""

from __future__ import annotations

import asyncio
import collections
import math
import socket
import struct
from typing import TYPE_CHECKING

from .link import MBPS, Link

if TYPE_CHECKING:
    from .emulator import LinkEmulator

__all__ = [
    "MAX_QUEUE_LIMIT", "QUEUE_LIMIT", "READ_CHUNK", "SEGMENT_BYTES", "TIMER_SLACK", "Connection", "Pipe",
    "queue_limit", "rst_close",
]

READ_CHUNK = 64 * 1024  # largest read from a socket
SEGMENT_BYTES = 1448  # one TCP segment on an Ethernet path: the unit that loss applies to
QUEUE_LIMIT = 8 * 1024 * 1024  # bytes in flight per connection and direction, at least ...
MAX_QUEUE_LIMIT = 256 * 1024 * 1024  # ... and at most: twice the rate x delay product in between
# asyncio sleeps on epoll, whose timeout has a resolution of 1 ms and is rounded up. Aiming
# half a millisecond early rounds a wait to the nearest millisecond instead; what remains is
# the wake-up latency of the loop (about 0.1-0.4 ms, so delays come out that much long).
TIMER_SLACK = 0.0005


def rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):  # already closed
            pass
    writer.transport.abort()


def queue_limit(settings) -> int:
    """Bytes a connection may have in flight one way: enough for twice the link's rate x
    delay product (a connection at 100 Mbit/s over 1 s of delay keeps 25 MB in flight, or
    its throughput would be capped below the rate), within QUEUE_LIMIT..MAX_QUEUE_LIMIT."""
    if settings.rate_mbps is None:
        return QUEUE_LIMIT
    product = 2 * settings.rate_mbps * MBPS * (settings.delay_ms + settings.jitter_ms) / 1000.0
    return int(min(MAX_QUEUE_LIMIT, max(QUEUE_LIMIT, product)))


class Pipe:
    """One direction of one connection: pump (read, shape, stamp) and writer (deliver)."""

    def __init__(
        self,
        emu: LinkEmulator,
        link: Link,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        self.emu = emu
        self.link = link
        self.src = src
        self.dst = dst
        self.direction = direction
        self.items: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.last_release = 0.0
        self.has_items = asyncio.Event()
        self.has_space = asyncio.Event()

    async def pump(self) -> None:
        """Read, cut into pieces, take each through the link and queue it for delivery."""
        emu = self.emu
        while True:
            while self.queued >= queue_limit(emu._settings):
                self.has_space.clear()
                await self.has_space.wait()
            data = await self.src.read(READ_CHUNK)
            if not data:
                self._push(None, emu._loop.time())
                return
            off = 0
            while off < len(data):
                taken, sent = await self.link.send(len(data) - off)
                piece = data[off : off + taken] if off or taken < len(data) else data
                off += taken
                stall = self._push(piece, sent)
                if stall:
                    await asyncio.sleep(stall)  # the sender waits out the "timeout" too

    def _push(self, piece: bytes | None, sent: float) -> float:
        """Queue ``piece`` (None: end of stream), whose last byte left the link at ``sent``,
        for delivery; return the stall, if any."""
        emu = self.emu
        s = emu._settings
        delay = s.delay_ms
        stall = 0.0
        if piece is not None:
            if s.jitter_ms:
                delay = max(0.0, delay + emu._rng.uniform(-s.jitter_ms, s.jitter_ms))
            if s.loss and s.stall_ms:
                p = 1.0 - (1.0 - s.loss) ** math.ceil(len(piece) / SEGMENT_BYTES)
                if emu._rng.random() < p:
                    stall = s.stall_ms / 1000.0
            self.queued += len(piece)
        release = max(self.last_release, sent + delay / 1000.0 + stall)
        self.last_release = release
        self.items.append((release, piece))
        self.has_items.set()
        return stall

    async def deliver(self) -> None:
        """Write each queued piece when its time comes (held while the link is a blackhole)."""
        emu = self.emu
        loop = emu._loop
        items = self.items
        while True:
            while not items:
                self.has_items.clear()
                await self.has_items.wait()
            wait = items[0][0] - TIMER_SLACK - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            while emu._settings.outage == "blackhole":
                await emu._wait_changed()
            horizon = loop.time() + TIMER_SLACK
            batch: list[bytes] = []
            eof = False
            while items and items[0][0] <= horizon:
                piece = items.popleft()[1]
                if piece is None:
                    eof = True
                    break
                batch.append(piece)
            if batch:
                data = batch[0] if len(batch) == 1 else b"".join(batch)
                self.dst.write(data)
                self.queued -= len(data)
                emu._count(self.direction, len(data))
                self.has_space.set()
                await self.dst.drain()
            if eof:
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                return


class Connection:
    """A proxied connection: device side (client) and node side (upstream)."""

    def __init__(
        self,
        emu: LinkEmulator,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.writers = (client[1], upstream[1])
        self.pipes = (
            Pipe(emu, emu._links["up"], client[0], upstream[1], "up"),
            Pipe(emu, emu._links["down"], upstream[0], client[1], "down"),
        )
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        """Forward both directions until both ends close, or reset both if one side breaks."""
        self.tasks = [
            asyncio.ensure_future(coro)
            for pipe in self.pipes
            for coro in (pipe.pump(), pipe.deliver())
        ]
        failed = False
        try:
            pending = set(self.tasks)
            while pending and not failed:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                failed = any(t.cancelled() or t.exception() is not None for t in done)
        finally:
            for task in self.tasks:
                task.cancel()
            if failed:  # a side broke: make the other side see a reset too
                self.abort()
            else:
                for writer in self.writers:
                    writer.close()

    def abort(self) -> None:
        """Reset both sides (RST) and stop forwarding."""
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            rst_close(writer)
