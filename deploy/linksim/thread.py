"""Run a :class:`~.emulator.LinkEmulator` in its own event loop in a background thread, for
synchronous code (tests, benchmarks, scripts)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from typing import Any

from .emulator import LinkEmulator
from .settings import LinkSettings

__all__ = ["LinkEmulatorThread", "run_in_thread"]


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
