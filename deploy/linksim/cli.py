"""``edgesplit linksim``: the command line of the link emulator; it runs one until SIGINT or
SIGTERM.

The main CLI mounts it as a subcommand with :func:`configure_parser` and :func:`run`; on its
own it is :func:`main` (``python -m edgesplit.linksim``)::

    edgesplit linksim --listen 127.0.0.1:9000 --target 127.0.0.1:8001 --rate 2 --delay 25
    curl -s http://127.0.0.1:CONTROL_PORT/settings
    curl -s -X PUT -d '{"outage": "blackhole"}' http://127.0.0.1:CONTROL_PORT/settings
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from .emulator import LinkEmulator
from .settings import LinkSettings
from .traces import load_schedule, load_trace

__all__ = ["DESCRIPTION", "configure_parser", "emulator_from_args", "main", "run"]

PROG = "edgesplit linksim"
DESCRIPTION = (
    "Emulate a slow, lossy or broken link between a device and a node: a TCP proxy with "
    "bandwidth, delay, jitter, loss stalls and outages, changeable at run time through "
    "GET/PUT http://127.0.0.1:CONTROL_PORT/settings."
)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0..65535, got {text!r}")
    return int(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``edgesplit linksim`` to ``parser`` (a subcommand's, say)."""
    p = parser
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
        type=_port,
        default=0,
        metavar="PORT",
        help="port of the control endpoint on 127.0.0.1 (default 0: ephemeral)",
    )
    p.add_argument("--no-control", action="store_true", help="no control endpoint")
    p.add_argument("--seed", type=int, default=None, help="seed for jitter and loss")


def emulator_from_args(args: argparse.Namespace) -> LinkEmulator:
    """The emulator that parsed arguments describe (not started); ``ValueError`` or
    ``OSError`` (an unreadable trace or schedule) when they do not make sense."""
    if args.period is not None and args.schedule is None:
        raise ValueError("--period applies to --schedule")
    settings = LinkSettings(
        rate_mbps=args.rate,
        delay_ms=args.delay,
        jitter_ms=args.jitter,
        loss=args.loss,
        stall_ms=args.stall,
    )
    trace = load_trace(args.trace) if args.trace else None
    schedule = load_schedule(args.schedule, settings) if args.schedule else None
    return LinkEmulator(
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
        varying = " (then as the trace or schedule says)" if emulator.replaying else ""
        print(f"linksim settings {json.dumps(emulator.settings.to_dict())}{varying}", flush=True)
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await emulator.stop()


def run(args: argparse.Namespace) -> int:
    """Run the link emulator that ``args`` (from :func:`configure_parser`'s arguments)
    describe until SIGINT or SIGTERM. Returns the exit status: 0, 1 when it cannot start
    (the port is taken, say), 2 when the arguments are bad (the error is on stderr)."""
    try:
        emulator = emulator_from_args(args)
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(emulator))
    except OSError as e:
        print(f"{PROG}: cannot start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """``edgesplit linksim``: parse ``argv`` (default ``sys.argv[1:]``) and :func:`run`."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    configure_parser(parser)
    return run(parser.parse_args(argv))
