"""The link emulator: a TCP proxy that makes a fast link behave like a slow, lossy or broken one.

:class:`LinkEmulator` listens where devices connect and forwards the byte stream of every
TCP connection to the target (a node), each direction on its own, untouched (gRPC over
HTTP/2 passes through as is). On the way it emulates a link: a bandwidth limit per
direction (a serialising link shared by all connections, see :mod:`.link`), one-way delay
with jitter, random loss modelled as retransmission stalls (:mod:`.pipes`), and full outages
("blackhole" holds the bytes until the link is back, "reset" kills the connections with an
RST and refuses new ones). Settings (:mod:`.settings`) are fixed, follow a scripted schedule
or replay a bandwidth trace (:mod:`.traces`), and can be changed while it runs through the
Python API or a small HTTP/JSON control endpoint on its own loopback port (:mod:`.control`).
:class:`~.thread.LinkEmulatorThread` runs one in a background thread; :mod:`.cli` is
``edgesplit linksim``.

Example (runnable as is: an echo server reached through a 5 Mbit/s link with 20 ms of
one-way delay, then cut and restored)::

    import socket, socketserver, threading
    from edgesplit.linksim import LinkEmulatorThread, LinkSettings

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
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
from collections.abc import Sequence
from typing import Any

from . import control
from .link import Link
from .pipes import Connection, rst_close
from .settings import LinkSettings, number
from .traces import validate_schedule, validate_trace

MIN_PERIOD_S = 0.01  # shortest schedule period or trace length (each repeats)

__all__ = ["LinkEmulator"]


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
        self._links: dict[str, Link] = {}
        self._waiters: set[asyncio.Future] = set()
        self._conns: set[Connection] = set()
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
        self._links = {d: Link(self._loop.time, self._current, self._wait_changed) for d in ("up", "down")}
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
    def replaying(self) -> bool:
        """Whether a trace or schedule changes the settings over time."""
        return self._plan is not None

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
    def _current(self) -> LinkSettings:
        return self._settings

    def _plan_running(self) -> bool:
        return self._plan is not None and self._plan_task is not None and not self._plan_task.done()

    @staticmethod
    def _schedule_plan(
        steps: Sequence[tuple[float, LinkSettings]], period: float | None
    ) -> tuple[str, list[tuple[float, dict]], float | None]:
        plan = validate_schedule(steps)
        if period is not None:
            period = number("schedule period", period)
            if period < MIN_PERIOD_S:
                raise ValueError(f"the schedule period must be at least {MIN_PERIOD_S} s, not {period}")
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
        plan, period = validate_trace(samples)
        if len(plan) > 1 and period < MIN_PERIOD_S:
            raise ValueError(f"a trace must last at least {MIN_PERIOD_S} s (it repeats), not {period} s")
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
                # Always yield, even when behind: steps closer together than the loop can
                # keep up with must not starve the connections, the control port or signals.
                await asyncio.sleep(max(0.0, origin + t - self._loop.time()))
                if "_trace_rate" in fields:
                    self._apply_trace_rate(fields["_trace_rate"])
                else:
                    self._apply(LinkSettings(**fields))
            if period is None:
                return
            origin += period
            behind = self._loop.time() - origin
            if behind > period:  # fell more than a period behind: skip the periods missed
                origin += period * math.floor(behind / period)

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
                rst_close(writer)
                return
            try:
                upstream = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                rst_close(writer)  # the node is not there: the device sees a reset
                return
            if self._settings.outage == "reset":
                rst_close(writer)
                rst_close(upstream[1])
                return
            conn = Connection(self, (reader, writer), upstream)
            self._conns.add(conn)
            try:
                await conn.run()
            finally:
                self._conns.discard(conn)
        except asyncio.CancelledError:
            rst_close(writer)
        except Exception as e:  # keep the emulator up whatever a connection does
            print(f"linksim: connection failed: {e!r}", file=sys.stderr)
            rst_close(writer)
        finally:
            self._handlers.discard(task)

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await control.handle(self, reader, writer)
        finally:
            self._handlers.discard(task)
