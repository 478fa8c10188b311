"""Link emulator: a TCP proxy that makes a fast link behave like a slow, lossy or broken one.

``edgesplit linksim`` sits between a device and a node and forwards the byte stream of every
TCP connection, each direction on its own, untouched (gRPC over HTTP/2 passes through as
is). On the way it emulates a link: a bandwidth limit per direction (token bucket), one-way
delay with jitter, random loss modelled as retransmission stalls, and full outages
("blackhole" holds the bytes until the link is back, "reset" kills the connections with an
RST and refuses new ones). Settings are fixed, follow a scripted schedule, or replay a
bandwidth trace (``../shared/traces`` format), and can be changed while it runs through the
Python API or a small HTTP/JSON control endpoint on its own loopback port.

Example (runnable as is: an echo server reached through a 5 Mbit/s link with 20 ms of
one-way delay, then cut and restored)::

    import socket, socketserver, threading
    from edgesplit.runtime.linksim import LinkEmulatorThread, LinkSettings

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                while data := self.request.recv(65536):
                    self.request.sendall(data)
            except ConnectionResetError:
                pass  # the link was reset

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = LinkSettings(rate_mbps=5, delay_ms=20)
    with LinkEmulatorThread("127.0.0.1", server.server_address[1], settings=settings) as link:
        with socket.create_connection(("127.0.0.1", link.port)) as s:
            s.sendall(b"ping")
            print(s.recv(4))             # b'ping', about 40 ms later
            link.update(outage="reset")  # open connections get an RST, new ones are refused
            try:
                s.recv(4)
            except ConnectionResetError:
                print("reset")
        link.update(outage=None)         # the link is back
        print(link.stats()["bytes_up"])  # 4
    server.shutdown()
    server.server_close()

From the command line (the control endpoint speaks JSON)::

    edgesplit linksim --listen 127.0.0.1:9000 --target 127.0.0.1:8001 --rate 2 --delay 25
    curl -s http://127.0.0.1:CONTROL_PORT/settings
    curl -s -X PUT -d '{"outage": "blackhole"}' http://127.0.0.1:CONTROL_PORT/settings

How the emulation works, per connection and direction: a pump reads chunks of up to 64 KiB,
cuts them into pieces of about 5 ms of transmission at the set rate, and takes each piece
through the direction's token bucket (shared by all connections, as a link is; time comes
from ``loop.time()`` and debt is carried over, so late timer wake-ups do not lose rate). A
piece is then stamped with its release time (now + delay ± jitter, never earlier than the
piece before it, so bytes are never reordered) and a writer delivers it when that time
comes. Delay therefore overlaps with transmission, as on a real link, instead of adding up
per chunk. Loss ``p`` is the probability that a TCP segment (1448 bytes) is lost; a piece
that contains a lost segment, and everything behind it, is held for ``stall_ms`` (like a
retransmission timeout), and the sender's side of that connection pauses as long.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import random
import signal
import socket
import struct
import sys
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "LinkEmulator",
    "LinkEmulatorThread",
    "LinkSettings",
    "load_schedule",
    "load_trace",
    "main",
    "run_in_thread",
]

Outage = Literal["blackhole", "reset"]
OUTAGES: tuple[str | None, ...] = (None, "blackhole", "reset")

READ_CHUNK = 64 * 1024  # largest read from a socket
SEGMENT_BYTES = 1448  # one TCP segment on an Ethernet path: the unit that loss applies to
PIECE_SECONDS = 0.005  # at a limited rate, data moves in pieces of about this much time
MIN_PIECE = 512  # ... but never in pieces smaller than this
BURST_SECONDS = 0.01  # token bucket depth, in time at the set rate (at least two pieces)
QUEUE_LIMIT = 8 * 1024 * 1024  # bytes in flight per connection and direction
# asyncio sleeps on epoll, whose timeout has a resolution of 1 ms and is rounded up. Aiming
# half a millisecond early rounds a wait to the nearest millisecond instead; what remains is
# the wake-up latency of the loop (about 0.1-0.4 ms, so delays come out that much long).
TIMER_SLACK = 0.0005
_MBPS = 125_000.0  # bytes per second in one Mbit/s


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class LinkSettings:
    """What the emulated link does; the same settings apply to both directions.

    - ``rate_mbps``: bandwidth of each direction in Mbit/s (``None``: unlimited; ``0``:
      nothing is transmitted until the rate rises again).
    - ``delay_ms``: one-way delay added to every byte.
    - ``jitter_ms``: the delay varies uniformly within ``delay_ms ± jitter_ms`` (never below
      0 and never reordering bytes).
    - ``loss``: probability that a TCP segment (1448 bytes) is lost, emulated as a stall.
    - ``stall_ms``: how long a loss holds the stream (a retransmission timeout).
    - ``outage``: ``None`` (link up), ``"blackhole"`` (bytes are accepted and held, nothing
      is forwarded until the link is back) or ``"reset"`` (connections are reset, new ones
      refused).

    >>> LinkSettings(rate_mbps=2, delay_ms=25).replace(outage="blackhole").outage
    'blackhole'
    """

    rate_mbps: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    stall_ms: float = 200.0
    outage: Outage | None = None

    def __post_init__(self) -> None:
        if self.rate_mbps is not None:
            object.__setattr__(self, "rate_mbps", _number("rate_mbps", self.rate_mbps))
        for name in ("delay_ms", "jitter_ms", "loss", "stall_ms"):
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if self.loss > 1:
            raise ValueError(f"loss is a probability between 0 and 1, got {self.loss!r}")
        if self.outage not in OUTAGES:
            raise ValueError(f"outage must be null, 'blackhole' or 'reset', got {self.outage!r}")

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """Names of the settable fields."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **fields: Any) -> LinkSettings:
        """A copy with ``fields`` changed; unknown names or bad values raise ``ValueError``."""
        unknown = sorted(set(fields) - set(self.fields()))
        if unknown:
            raise ValueError(
                f"unknown link setting(s) {', '.join(unknown)}; "
                f"settable: {', '.join(self.fields())}"
            )
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: LinkSettings | None = None) -> LinkSettings:
        """Settings from a dict; fields it leaves out come from ``base`` (or the defaults)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"link settings must be a JSON object, got {data!r}")
        return (base or cls()).replace(**dict(data))

    @property
    def blocked(self) -> bool:
        """True when nothing is transmitted (an outage or a rate of 0)."""
        return self.outage is not None or self.rate_mbps == 0


def load_trace(path: str | Path) -> list[tuple[float, float]]:
    """Read a bandwidth trace: one ``<seconds> <Mbit/s>`` sample a line.

    Times must increase strictly and rates be >= 0 (0: the link is down). Blank lines and
    lines starting with ``#`` are skipped. Raises ``ValueError`` naming the file and line of
    the first malformed sample.

    >>> samples = load_trace("../shared/traces/hsdpa-3g/norway_bus_1.txt")  # doctest: +SKIP
    """
    path = Path(path)
    samples: list[tuple[float, float]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            where = f"{path}:{lineno}"
            if len(parts) != 2:
                raise ValueError(
                    f"{where}: expected '<seconds> <Mbit/s>' (two numbers), got {text!r}"
                )
            try:
                t, rate = float(parts[0]), float(parts[1])
            except ValueError:
                raise ValueError(
                    f"{where}: expected '<seconds> <Mbit/s>' (two numbers), got {text!r}"
                ) from None
            if not (math.isfinite(t) and math.isfinite(rate)) or t < 0 or rate < 0:
                raise ValueError(f"{where}: time and rate must be finite and >= 0, got {text!r}")
            if samples and t <= samples[-1][0]:
                raise ValueError(f"{where}: times must increase, {t} follows {samples[-1][0]}")
            samples.append((t, rate))
    if not samples:
        raise ValueError(f"{path}: no samples; expected lines of '<seconds> <Mbit/s>'")
    return samples


def load_schedule(
    path: str | Path, base: LinkSettings | None = None
) -> list[tuple[float, LinkSettings]]:
    """Read a schedule from JSON: a list of ``{"t": seconds, <setting>: value, ...}``.

    Each step changes the fields it names, the others carry over from the step before (the
    first step starts from ``base``). Example file::

        [{"t": 0, "rate_mbps": 5, "delay_ms": 20},
         {"t": 10, "outage": "blackhole"},
         {"t": 15, "outage": null, "rate_mbps": 1}]
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: a schedule is a non-empty JSON list of steps")
    steps: list[tuple[float, LinkSettings]] = []
    current = base or LinkSettings()
    for i, step in enumerate(data):
        if not isinstance(step, dict) or "t" not in step:
            raise ValueError(f"{path}: step {i} must be an object with a time 't', got {step!r}")
        fields = dict(step)
        try:
            t = _number("t", fields.pop("t"))
            current = current.replace(**fields)
        except ValueError as e:
            raise ValueError(f"{path}: step {i}: {e}") from None
        if steps and t < steps[-1][0]:
            raise ValueError(f"{path}: step {i}: times must not decrease")
        steps.append((t, current))
    return steps


def _validate_schedule(steps: Iterable[tuple[float, LinkSettings]]) -> list[tuple[float, dict]]:
    out: list[tuple[float, dict]] = []
    for t, settings in steps:
        t = _number("schedule time", t)
        if not isinstance(settings, LinkSettings):
            raise ValueError(f"schedule steps are (seconds, LinkSettings), got {settings!r}")
        if out and t < out[-1][0]:
            raise ValueError("schedule times must not decrease")
        out.append((t, settings.to_dict()))
    if not out:
        raise ValueError("a schedule needs at least one step")
    return out


def _validate_trace(
    samples: Iterable[tuple[float, float]],
) -> tuple[list[tuple[float, dict]], float]:
    samples = [(_number("trace time", t), _number("trace rate", r)) for t, r in samples]
    if not samples:
        raise ValueError("a trace needs at least one sample")
    for i in range(1, len(samples)):
        if samples[i][0] <= samples[i - 1][0]:
            raise ValueError("trace times must increase")
    start = samples[0][0]
    last = samples[-1][0] - samples[-2][0] if len(samples) > 1 else 1.0
    period = samples[-1][0] - start + last
    return [(t - start, {"_trace_rate": r}) for t, r in samples], period


def _piece_bytes(rate: float) -> int:
    return int(min(READ_CHUNK, max(MIN_PIECE, rate * PIECE_SECONDS)))


def _rst_close(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):  # already closed
            pass
    writer.transport.abort()


class _Bucket:
    """Token bucket of one direction, shared by all connections (as a link is)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.tokens = 0.0
        self.stamp: float | None = None  # loop time of the last refill; None: reset

    def refill(self, now: float, rate: float) -> None:
        depth = max(rate * BURST_SECONDS, 2 * _piece_bytes(rate))
        if self.stamp is None:
            self.tokens = depth
        else:
            self.tokens = min(depth, self.tokens + (now - self.stamp) * rate)
        self.stamp = now


class _Pipe:
    """One direction of one connection: pump (read, shape, stamp) and writer (deliver)."""

    def __init__(
        self,
        emu: LinkEmulator,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: str,
    ) -> None:
        self.emu = emu
        self.src = src
        self.dst = dst
        self.direction = direction
        self.items: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.last_release = 0.0
        self.has_items = asyncio.Event()
        self.has_space = asyncio.Event()

    async def pump(self) -> None:
        emu = self.emu
        bucket = emu._buckets[self.direction]
        while True:
            while self.queued >= QUEUE_LIMIT:
                self.has_space.clear()
                await self.has_space.wait()
            data = await self.src.read(READ_CHUNK)
            if not data:
                self._push(None)
                return
            rate = emu._settings.rate_mbps
            step = len(data) if rate is None else _piece_bytes(rate * _MBPS)
            for off in range(0, len(data), step):
                piece = data[off : off + step] if step < len(data) else data
                await emu._shape(bucket, len(piece))
                stall = self._push(piece)
                if stall:
                    await asyncio.sleep(stall)  # the sender waits out the "timeout" too

    def _push(self, piece: bytes | None) -> float:
        """Queue ``piece`` (None: end of stream) for delivery; return the stall, if any."""
        emu = self.emu
        s = emu._settings
        now = emu._loop.time()
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
        release = max(self.last_release, now + delay / 1000.0 + stall)
        self.last_release = release
        self.items.append((release, piece))
        self.has_items.set()
        return stall

    async def deliver(self) -> None:
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


class _Connection:
    """A proxied connection: device side (client) and node side (upstream)."""

    def __init__(
        self,
        emu: LinkEmulator,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.writers = (client[1], upstream[1])
        self.pipes = (
            _Pipe(emu, client[0], upstream[1], "up"),
            _Pipe(emu, upstream[0], client[1], "down"),
        )
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
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
            _rst_close(writer)


class LinkEmulator:
    """An emulated link between ``port`` (where devices connect) and the target (a node).

    Use inside a running event loop (``await start()`` ... ``await stop()``, or
    ``async with``); :class:`LinkEmulatorThread` runs one in a background thread for
    synchronous code. Methods other than the coroutines must be called from the loop's
    thread.

    - ``settings``: the fixed settings to start with;
    - ``listen_host``/``port``: where to listen (port 0: an ephemeral port, see ``.port``);
    - ``control_port``: the HTTP/JSON control endpoint on 127.0.0.1 (0: ephemeral; None:
      none);
    - ``schedule``: ``[(seconds, LinkSettings), ...]`` applied at those times after start
      (``schedule_period``: start over every that many seconds, which must be more than the
      last step's time; None: the last step's settings stay);
    - ``trace``: ``[(seconds, Mbit/s), ...]`` (see :func:`load_trace`) replayed in a loop;
      it sets ``rate_mbps``, and a rate of 0 sets ``outage="blackhole"`` until the next
      non-zero sample; the other fields stay as they are;
    - ``seed``: seed of the random numbers for jitter and loss.

    ``update()`` during a schedule or trace lasts until its next step changes that field.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        settings: LinkSettings | None = None,
        *,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        control_port: int | None = 0,
        schedule: Sequence[tuple[float, LinkSettings]] | None = None,
        schedule_period: float | None = None,
        trace: Sequence[tuple[float, float]] | None = None,
        seed: int | None = None,
    ) -> None:
        if schedule is not None and trace is not None:
            raise ValueError("give a schedule or a trace, not both")
        self.target_host = target_host
        self.target_port = int(target_port)
        self.listen_host = listen_host
        self.port = int(port)
        self.control_port = control_port
        self._settings = settings if settings is not None else LinkSettings()
        if not isinstance(self._settings, LinkSettings):
            raise TypeError(f"settings must be a LinkSettings, got {type(settings).__name__}")
        self._rng = random.Random(seed)
        self._plan: tuple[str, list[tuple[float, dict]], float | None] | None = None
        if schedule is not None:
            self._plan = self._schedule_plan(schedule, schedule_period)
        elif trace is not None:
            self._plan = self._trace_plan(trace)
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.AbstractServer | None = None
        self._control: asyncio.AbstractServer | None = None
        self._buckets: dict[str, _Bucket] = {}
        self._waiters: set[asyncio.Future] = set()
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task] = set()
        self._plan_task: asyncio.Task | None = None
        self._listener_task: asyncio.Task | None = None
        self._trace_blackhole = False
        self._running = False
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Listen (and serve the control endpoint); start the schedule or trace if any."""
        if self._running:
            raise RuntimeError("this LinkEmulator is already running")
        self._loop = asyncio.get_running_loop()
        self._buckets = {"up": _Bucket(), "down": _Bucket()}
        await self._listen()  # even when starting in "reset": this fixes the port
        if self._settings.outage == "reset":
            self._server.close()
            self._server = None
        try:
            if self.control_port is not None:
                self._control = await asyncio.start_server(
                    self._on_control, "127.0.0.1", self.control_port, reuse_address=True
                )
                self.control_port = self._control.sockets[0].getsockname()[1]
        except BaseException:
            if self._server is not None:
                self._server.close()
                self._server = None
            raise
        self._running = True
        if self._plan is not None:
            self._plan_task = self._loop.create_task(self._run_plan(self._plan))

    async def stop(self) -> None:
        """Stop listening, close every connection and the control endpoint."""
        if not self._running:
            return
        self._running = False
        for task in (self._plan_task, self._listener_task):
            if task is not None:
                task.cancel()
        servers = [s for s in (self._server, self._control) if s is not None]
        self._server = self._control = None
        for server in servers:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        tasks = [t for t in (self._plan_task, self._listener_task) if t is not None]
        tasks += list(self._handlers)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2.0)
            except asyncio.TimeoutError:
                pass
        self._plan_task = self._listener_task = None
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()

    async def __aenter__(self) -> LinkEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- settings
    @property
    def settings(self) -> LinkSettings:
        """The settings in force now."""
        return self._settings

    def update(self, **fields: Any) -> LinkSettings:
        """Change some settings now, e.g. ``update(rate_mbps=1, outage=None)``.

        Bytes already on their way keep the delay they were given. Switching to
        ``outage="reset"`` resets every connection and closes the listening socket at once;
        switching back reopens it in the background (``await wait_settled()`` to wait).
        """
        new = self._settings.replace(**fields)
        self._apply(new)
        return new

    async def wait_settled(self) -> None:
        """Wait until the listening socket matches the settings (after leaving "reset")."""
        while self._listener_task is not None and not self._listener_task.done():
            await asyncio.shield(self._listener_task)

    def stats(self) -> dict[str, Any]:
        """Settings and counters as a JSON-ready dict (what ``GET /settings`` returns)."""
        return {
            **self._settings.to_dict(),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections": self.connections,
            "active_connections": len(self._conns),
            "schedule": self._plan[0] if self._plan_running() else None,
            "listen": f"{self.listen_host}:{self.port}",
            "target": f"{self.target_host}:{self.target_port}",
        }

    def set_schedule(
        self, steps: Sequence[tuple[float, LinkSettings]], period: float | None = None
    ) -> None:
        """Replace any schedule or trace with ``steps``, timed from now (looping every
        ``period`` seconds when given)."""
        self._start_plan(self._schedule_plan(steps, period))

    def set_trace(self, samples: Sequence[tuple[float, float]]) -> None:
        """Replace any schedule or trace with a looping replay of ``samples``, from now."""
        self._start_plan(self._trace_plan(samples))

    def clear_schedule(self) -> None:
        """Stop the schedule or trace; the settings in force stay."""
        self._plan = None
        if self._plan_task is not None:
            self._plan_task.cancel()
            self._plan_task = None

    # ----------------------------------------------------------------- internals
    def _plan_running(self) -> bool:
        return self._plan is not None and self._plan_task is not None and not self._plan_task.done()

    @staticmethod
    def _schedule_plan(
        steps: Sequence[tuple[float, LinkSettings]], period: float | None
    ) -> tuple[str, list[tuple[float, dict]], float | None]:
        plan = _validate_schedule(steps)
        if period is not None:
            period = _number("schedule period", period)
            if period <= plan[-1][0]:
                raise ValueError(
                    f"the schedule period ({period} s) must be longer than the time of "
                    f"its last step ({plan[-1][0]} s)"
                )
        return ("schedule", plan, period)

    @staticmethod
    def _trace_plan(
        samples: Sequence[tuple[float, float]],
    ) -> tuple[str, list[tuple[float, dict]], float | None]:
        plan, period = _validate_trace(samples)
        return ("trace", plan, period if len(plan) > 1 else None)

    def _start_plan(self, plan: tuple[str, list[tuple[float, dict]], float | None]) -> None:
        self.clear_schedule()
        self._plan = plan
        if self._running:
            self._plan_task = self._loop.create_task(self._run_plan(plan))

    async def _run_plan(self, plan: tuple[str, list[tuple[float, dict]], float | None]) -> None:
        _, steps, period = plan
        origin = self._loop.time()
        while True:
            for t, fields in steps:
                wait = origin + t - self._loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if "_trace_rate" in fields:
                    self._apply_trace_rate(fields["_trace_rate"])
                else:
                    self._apply(LinkSettings(**fields))
            if period is None:
                return
            origin += period

    def _apply_trace_rate(self, rate: float) -> None:
        if rate == 0:
            if self._settings.outage is None:
                self._trace_blackhole = True
                self._apply(self._settings.replace(outage="blackhole"))
            return
        fields: dict[str, Any] = {"rate_mbps": rate}
        if self._trace_blackhole:
            self._trace_blackhole = False
            if self._settings.outage == "blackhole":
                fields["outage"] = None
        self._apply(self._settings.replace(**fields))

    def _apply(self, new: LinkSettings) -> None:
        old, self._settings = self._settings, new
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        if not self._running:
            return
        if new.outage == "reset" and old.outage != "reset":
            if self._server is not None:
                self._server.close()
                self._server = None
            for conn in list(self._conns):
                conn.abort()
        elif new.outage != "reset" and self._server is None:
            if self._listener_task is None or self._listener_task.done():
                self._listener_task = self._loop.create_task(self._reopen())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._on_client, self.listen_host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _reopen(self) -> None:
        """Listen again on the same port after a "reset" outage (retrying a busy port)."""
        delay = 0.01
        while self._running and self._settings.outage != "reset" and self._server is None:
            try:
                await self._listen()
            except OSError as e:
                if delay > 1:
                    print(f"linksim: cannot listen on port {self.port} again: {e}", file=sys.stderr)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if self._settings.outage == "reset":  # went down again while we opened
                self._server.close()
                self._server = None

    async def _wait_changed(self, timeout: float | None = None) -> None:
        """Wait until the settings change (or ``timeout`` seconds pass)."""
        fut = self._loop.create_future()
        self._waiters.add(fut)
        handle = None
        if timeout is not None:
            handle = self._loop.call_later(timeout, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if handle is not None:
                handle.cancel()

    async def _shape(self, bucket: _Bucket, n: int) -> None:
        """Wait until the link may transmit ``n`` more bytes in this direction."""
        async with bucket.lock:
            while True:
                s = self._settings
                if s.blocked:
                    await self._wait_changed()
                    continue
                if s.rate_mbps is None:
                    bucket.stamp = None
                    return
                rate = s.rate_mbps * _MBPS
                bucket.refill(self._loop.time(), rate)
                if bucket.tokens >= 0:
                    bucket.tokens -= n
                    return
                await self._wait_changed(-bucket.tokens / rate)

    def _count(self, direction: str, n: int) -> None:
        if direction == "up":
            self.bytes_up += n
        else:
            self.bytes_down += n

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        self.connections += 1
        try:
            while self._settings.outage == "blackhole":  # the SYN is "lost" until restored
                await self._wait_changed()
            if self._settings.outage == "reset" or not self._running:
                _rst_close(writer)
                return
            try:
                upstream = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                _rst_close(writer)  # the node is not there: the device sees a reset
                return
            if self._settings.outage == "reset":
                _rst_close(writer)
                _rst_close(upstream[1])
                return
            conn = _Connection(self, (reader, writer), upstream)
            self._conns.add(conn)
            try:
                await conn.run()
            finally:
                self._conns.discard(conn)
        except asyncio.CancelledError:
            _rst_close(writer)
        except Exception as e:  # keep the emulator up whatever a connection does
            print(f"linksim: connection failed: {e!r}", file=sys.stderr)
            _rst_close(writer)
        finally:
            self._handlers.discard(task)

    # ----------------------------------------------------------------- control endpoint
    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            try:
                status, payload = await asyncio.wait_for(self._control_request(reader), 10.0)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                status, payload = 400, {"error": f"bad request: {e}"}
            body = (json.dumps(payload) + "\n").encode()
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
            head = (
                f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n"
            )
            if status == 405:
                head += "Allow: GET, PUT, POST, DELETE\r\n"
            writer.write(head.encode() + b"\r\n" + body)
            await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _control_request(self, reader: asyncio.StreamReader) -> tuple[int, dict]:
        line = (await reader.readline()).decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise ValueError(f"not an HTTP request line: {line!r}")
        method, target = parts[0].upper(), parts[1]
        length = 0
        while True:
            header = (await reader.readline()).decode("latin-1")
            if header in ("\r\n", "\n", ""):
                break
            name, _, value = header.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
                if not 0 <= length <= 65536:
                    raise ValueError("body too large")
        body = await reader.readexactly(length) if length else b""
        path = target.split("?", 1)[0].rstrip("/") or "/"
        if path == "/settings":
            if method == "GET":
                return 200, self.stats()
            if method in ("PUT", "POST"):
                try:
                    fields = json.loads(body or b"{}")
                except json.JSONDecodeError as e:
                    return 400, {"error": f"body is not JSON: {e}"}
                if not isinstance(fields, dict):
                    return 400, {"error": "body must be a JSON object of settings"}
                try:
                    self.update(**fields)
                except (ValueError, TypeError) as e:
                    return 400, {"error": str(e)}
                await self.wait_settled()
                return 200, self.stats()
            return 405, {"error": f"{method} not allowed on /settings; use GET, PUT or POST"}
        if path == "/schedule":
            if method == "DELETE":
                self.clear_schedule()
                return 200, self.stats()
            return 405, {"error": "only DELETE /schedule (stop the schedule or trace)"}
        return 404, {"error": f"no {path}; try GET /settings, PUT /settings, DELETE /schedule"}


class LinkEmulatorThread:
    """A :class:`LinkEmulator` running in its own event loop in a background thread.

    For synchronous tests and benchmarks; it is listening when the constructor returns::

        with LinkEmulatorThread("127.0.0.1", node_port, settings=LinkSettings(delay_ms=10)) as link:
            connect_to(link.port)
            link.update(rate_mbps=1)

    Keyword arguments go to :class:`LinkEmulator`.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        settings: LinkSettings | None = None,
        **kwargs: Any,
    ) -> None:
        self.emulator = LinkEmulator(target_host, target_port, settings, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="linksim", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._call(self.emulator.start())
        except BaseException:
            self._shutdown()
            raise

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        if self._closed:
            coro.close()
            raise RuntimeError("this LinkEmulatorThread is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _in_loop(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            return fn(*args, **kwargs)

        return self._call(call())

    @property
    def port(self) -> int:
        """The port devices connect to."""
        return self.emulator.port

    @property
    def control_port(self) -> int | None:
        """The port of the HTTP/JSON control endpoint (on 127.0.0.1), if any."""
        return self.emulator.control_port

    @property
    def settings(self) -> LinkSettings:
        """The settings in force now."""
        return self.emulator.settings

    def update(self, **fields: Any) -> LinkSettings:
        """Change settings; returns once they are in force (listening again after "reset")."""

        async def call() -> LinkSettings:
            new = self.emulator.update(**fields)
            await self.emulator.wait_settled()
            return new

        return self._call(call())

    def stats(self) -> dict[str, Any]:
        """Settings and counters, as ``GET /settings`` returns them."""
        return self._in_loop(self.emulator.stats)

    def set_schedule(
        self, steps: Sequence[tuple[float, LinkSettings]], period: float | None = None
    ) -> None:
        """Replace any schedule or trace with ``steps``, timed from now (looping every
        ``period`` seconds when given)."""
        self._in_loop(self.emulator.set_schedule, steps, period)

    def set_trace(self, samples: Sequence[tuple[float, float]]) -> None:
        """Replace any schedule or trace with a looping replay of ``samples``, from now."""
        self._in_loop(self.emulator.set_trace, samples)

    def clear_schedule(self) -> None:
        """Stop the schedule or trace; the settings in force stay."""
        self._in_loop(self.emulator.clear_schedule)

    def close(self) -> None:
        """Stop the emulator and its thread (safe to call twice)."""
        if self._closed:
            return
        try:
            self._call(self.emulator.stop())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> LinkEmulatorThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_in_thread(
    target_host: str, target_port: int, settings: LinkSettings | None = None, **kwargs: Any
) -> LinkEmulatorThread:
    """Start a link emulator in a background thread; ``close()`` it when done."""
    return LinkEmulatorThread(target_host, target_port, settings, **kwargs)


# --------------------------------------------------------------------------- CLI
def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgesplit linksim",
        description="Emulate a slow, lossy or broken link between a device and a node: a TCP "
        "proxy with bandwidth, delay, jitter, loss stalls and outages, changeable at run time "
        "through GET/PUT http://127.0.0.1:CONTROL_PORT/settings.",
    )
    p.add_argument(
        "--listen",
        type=_host_port,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where devices connect (default 127.0.0.1:0, an ephemeral port)",
    )
    p.add_argument(
        "--target",
        type=_host_port,
        required=True,
        metavar="HOST:PORT",
        help="the node to forward to",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="MBPS",
        help="bandwidth of each direction in Mbit/s (default: unlimited)",
    )
    p.add_argument("--delay", type=float, default=0.0, metavar="MS", help="one-way delay in ms")
    p.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay varies within delay ± jitter ms",
    )
    p.add_argument(
        "--loss",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a TCP segment is lost (emulated as a stall)",
    )
    p.add_argument(
        "--stall",
        type=float,
        default=200.0,
        metavar="MS",
        help="how long a loss holds the stream (default 200 ms)",
    )
    plan = p.add_mutually_exclusive_group()
    plan.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="replay a bandwidth trace ('<seconds> <Mbit/s>' lines), looping",
    )
    plan.add_argument(
        "--schedule",
        type=Path,
        metavar="JSON_FILE",
        help='apply settings at times: [{"t": 0, "rate_mbps": 5}, ...]',
    )
    p.add_argument(
        "--period",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start the schedule over every SECONDS (default: run it once)",
    )
    p.add_argument(
        "--control-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the control endpoint on 127.0.0.1 (default 0: ephemeral)",
    )
    p.add_argument("--no-control", action="store_true", help="no control endpoint")
    p.add_argument("--seed", type=int, default=None, help="seed for jitter and loss")
    return p


async def _serve(emulator: LinkEmulator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    await emulator.start()
    installed = []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread: run until cancelled
        print(
            f"linksim listening on {emulator.listen_host}:{emulator.port} "
            f"-> {emulator.target_host}:{emulator.target_port}",
            flush=True,
        )
        if emulator.control_port is not None:
            print(
                f"linksim control on 127.0.0.1:{emulator.control_port} "
                f"(GET/PUT http://127.0.0.1:{emulator.control_port}/settings)",
                flush=True,
            )
        print(f"linksim settings {json.dumps(emulator.settings.to_dict())}", flush=True)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await emulator.stop()


def main(argv: list[str] | None = None) -> int:
    """``edgesplit linksim``: run the link emulator until SIGINT or SIGTERM."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.period is not None and args.schedule is None:
        parser.error("--period applies to --schedule")
    try:
        settings = LinkSettings(
            rate_mbps=args.rate,
            delay_ms=args.delay,
            jitter_ms=args.jitter,
            loss=args.loss,
            stall_ms=args.stall,
        )
        trace = load_trace(args.trace) if args.trace else None
        schedule = load_schedule(args.schedule, settings) if args.schedule else None
        emulator = LinkEmulator(
            args.target[0],
            args.target[1],
            settings,
            listen_host=args.listen[0],
            port=args.listen[1],
            control_port=None if args.no_control else args.control_port,
            schedule=schedule,
            schedule_period=args.period,
            trace=trace,
            seed=args.seed,
        )
    except (OSError, ValueError) as e:
        parser.error(str(e))
    try:
        asyncio.run(_serve(emulator))
    except OSError as e:
        print(f"edgesplit linksim: cannot start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
