"""Link emulator: a TCP proxy that makes a fast link behave like a slow, lossy or broken one.

Modules, one job each: :mod:`.settings` (what the link does), :mod:`.traces` (schedules and
bandwidth traces from files), :mod:`.link` (the bandwidth model), :mod:`.pipes` (forwarding
one connection), :mod:`.emulator` (:class:`LinkEmulator`, with an example), :mod:`.thread`
(:class:`LinkEmulatorThread`), :mod:`.control` (the HTTP/JSON control endpoint) and
:mod:`.cli` (``edgesplit linksim``; ``edgesplit linksim --help``).
"""

from .cli import configure_parser, main, run
from .emulator import LinkEmulator
from .settings import LinkSettings
from .thread import LinkEmulatorThread, run_in_thread
from .traces import load_schedule, load_trace

__all__ = [
    "LinkEmulator",
    "LinkEmulatorThread",
    "LinkSettings",
    "configure_parser",
    "load_schedule",
    "load_trace",
    "main",
    "run",
    "run_in_thread",
]
