"""Accuracy of the link emulator: does ``edgesplit linksim`` give the rate and delay it is set to?

The goals: measured throughput within 10 % of the setting from 0.25 to 100 Mbit/s on
loopback, added one-way delay within 1 ms of the setting, and one request of B bytes taking
B/rate + delay within 10 % (plus 1 ms of timer resolution). Everything runs on 127.0.0.1: a
small server (sink, source, echo and timestamping receiver) in a thread, the emulator in
front of it, and the client here.

- Throughput, each direction: a transfer sized to last a few seconds at the set rate
  (``quick``: about 1.5 s), timed from the first byte sent to the sink's acknowledgement
  (up) or from the request to the last byte (down).
- Delay: round trips of 64 bytes through the emulator, each paired with one straight to the
  echo server; the added one-way delay is ``median(rtt_emulated - rtt_direct) / 2``.
- Per-request latency: at several rates and delays, messages of a few hundred bytes to
  100 KB sent one at a time over an idle link (25 ms apart); the server notes when the last
  byte arrived (same process, same clock), so the one-way time is measured directly. The
  median of 9 repetitions (``quick``: 3, and no request that takes more than 0.5 s at the
  rate) is compared with ``bytes / rate + delay``: what a serialising link gives, with no
  free burst for small messages.

Run: ``edgesplit bench linksim [--quick]``, or::

    from edgesplit.bench import run_benchmark
    run_benchmark("linksim", quick=True)
"""

from __future__ import annotations

import socket
import socketserver
import statistics
import struct
import sys
import threading
import time

from edgesplit.bench import machine_info, table
from edgesplit.linksim import LinkEmulatorThread

RATES_MBPS = (0.25, 1.0, 5.0, 20.0, 100.0)
DELAYS_MS = (0.0, 5.0, 20.0, 50.0)
RATE_TOLERANCE = 0.10  # relative
DELAY_TOLERANCE_MS = 1.0  # absolute
PING_BYTES = 64
REQUEST_RATES_MBPS = (0.5, 2.0, 10.0, 50.0)
REQUEST_BYTES = (300, 1_000, 3_136, 10_000, 30_000, 100_000)
REQUEST_DELAYS_MS = (0.0, 10.0)
REQUEST_TOLERANCE = 0.10  # relative to bytes / rate + delay ...
REQUEST_SLACK_MS = 1.0  # ... plus this much (asyncio timers have a resolution of 1 ms)
REQUEST_IDLE_SECONDS = 0.025  # pause between requests: each finds the link idle
QUICK_REQUEST_SECONDS = 0.5  # --quick skips requests that take longer than this at the rate


def _recv_exactly(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes."""
    view = memoryview(bytearray(min(n, 1 << 20)))
    left = n
    while left:
        got = sock.recv_into(view, min(left, len(view)))
        if not got:
            raise EOFError(f"connection closed with {left} of {n} bytes to go")
        left -= got


def _recv_head(sock: socket.socket, n: int) -> bytes | None:
    """Read exactly ``n`` bytes; None if the connection closes first."""
    head = bytearray()
    while len(head) < n:
        chunk = sock.recv(n - len(head))
        if not chunk:
            return None
        head += chunk
    return bytes(head)


class _Handler(socketserver.BaseRequestHandler):
    """One opcode byte, then: ``u`` + length: sink, answer b"k"; ``d`` + length: send that
    many bytes; ``e``: echo until closed; ``t``: messages that start with their own length
    (8 bytes, counted in it), each answered with the ``perf_counter()`` at which its last
    byte arrived (8-byte double), until closed."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            op = sock.recv(1)
            if op == b"e":
                while data := sock.recv(65536):
                    sock.sendall(data)
                return
            if op == b"t":
                while (head := _recv_head(sock, 8)) is not None:
                    _recv_exactly(sock, int.from_bytes(head, "big") - 8)
                    sock.sendall(struct.pack("!d", time.perf_counter()))
                return
            head = _recv_head(sock, 8)
            if head is None:
                return
            n = int.from_bytes(head, "big")
            if op == b"u":
                _recv_exactly(sock, n)
                sock.sendall(b"k")
            elif op == b"d":
                block = bytes(min(n, 1 << 16))
                left = n
                while left:
                    sock.sendall(block[: min(left, len(block))])
                    left -= min(left, len(block))
        except (OSError, EOFError):
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _transfer(port: int, direction: str, n: int) -> float:
    """Seconds to move ``n`` bytes up (to the sink) or down (from the source)."""
    with _connect(port) as s:
        if direction == "up":
            payload = bytes(min(n, 1 << 20))
            start = time.perf_counter()
            s.sendall(b"u" + n.to_bytes(8, "big"))
            left = n
            while left:
                s.sendall(payload[: min(left, len(payload))])
                left -= min(left, len(payload))
            if s.recv(1) != b"k":
                raise RuntimeError("sink did not acknowledge the transfer")
        else:
            start = time.perf_counter()
            s.sendall(b"d" + n.to_bytes(8, "big"))
            _recv_exactly(s, n)
        return time.perf_counter() - start


def _round_trip(sock: socket.socket, payload: bytes) -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    _recv_exactly(sock, len(payload))
    return time.perf_counter() - start


def _one_way(sock: socket.socket, n: int) -> float:
    """Seconds from sending an ``n``-byte message (``t`` protocol) to its last byte's arrival."""
    message = n.to_bytes(8, "big") + bytes(n - 8)
    start = time.perf_counter()
    sock.sendall(message)
    (arrived,) = struct.unpack("!d", _recv_head(sock, 8) or b"")
    return arrived - start


def measure_request_latency(port: int, n: int, repeats: int) -> float:
    """Median one-way time in seconds of ``repeats`` messages of ``n`` bytes sent one at a
    time, each over an idle link, over one connection to a ``t`` server (through the emulator
    when ``port`` is its)."""
    times = []
    with _connect(port) as s:
        s.sendall(b"t")
        _one_way(s, 64)  # the connection is set up end to end
        for _ in range(repeats):
            time.sleep(REQUEST_IDLE_SECONDS)
            times.append(_one_way(s, n))
    return statistics.median(times)


def _request_latency(
    link: LinkEmulatorThread, target: int, repeats: int, say, max_seconds: float | None = None
) -> list[dict]:
    rows: list[dict] = []
    for rate in REQUEST_RATES_MBPS:
        for delay in REQUEST_DELAYS_MS:
            link.update(rate_mbps=rate, delay_ms=delay, jitter_ms=0.0)
            for n in REQUEST_BYTES:
                if max_seconds is not None and n * 8 / (rate * 1e6) > max_seconds:
                    continue
                measured = measure_request_latency(link.port, n, repeats) * 1000
                direct = measure_request_latency(target, n, 3) * 1000
                expected = n * 8 / (rate * 1000) + delay
                error = measured - expected
                rows.append(
                    {
                        "rate_mbit": rate,
                        "bytes": n,
                        "delay_ms": delay,
                        "measured_ms": round(measured, 3),
                        "expected_ms": round(expected, 3),
                        "error_ms": round(error, 3),
                        "error_pct": round(100 * error / expected, 2),
                        "direct_ms": round(direct, 3),
                        "repeats": repeats,
                        "ok": abs(error) <= REQUEST_TOLERANCE * expected + REQUEST_SLACK_MS,
                    }
                )
                say(
                    f"request {n} B at {rate:g} Mbit/s, delay {delay:g} ms: {measured:.2f} ms "
                    f"(expected {expected:.2f}, {100 * error / expected:+.1f} %)"
                )
    return rows


def run(quick: bool = False, progress: bool = True) -> dict:
    """Measure throughput, added delay and per-request latency through the emulator."""
    seconds = 1.5 if quick else 4.0
    pings = 40 if quick else 200
    repeats = 3 if quick else 9

    def say(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr, flush=True)

    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    target = server.server_address[1]
    throughput: list[dict] = []
    delays: list[dict] = []
    requests: list[dict] = []
    try:
        with LinkEmulatorThread("127.0.0.1", target, control_port=None) as link:
            for rate in RATES_MBPS:
                for direction in ("up", "down"):
                    link.update(rate_mbps=rate, delay_ms=0.0)
                    n = int(rate * 125_000 * seconds)
                    elapsed = _transfer(link.port, direction, n)
                    measured = n * 8 / elapsed / 1e6
                    error = (measured - rate) / rate
                    row = {
                        "direction": direction,
                        "setting_mbps": rate,
                        "bytes": n,
                        "seconds": round(elapsed, 4),
                        "measured_mbps": round(measured, 4),
                        "error_pct": round(100 * error, 2),
                        "ok": abs(error) <= RATE_TOLERANCE,
                    }
                    throughput.append(row)
                    say(
                        f"rate {rate:g} Mbit/s {direction}: {measured:.3f} Mbit/s "
                        f"({100 * error:+.1f} %)"
                    )
            payload = bytes(PING_BYTES)
            for delay in DELAYS_MS:
                link.update(rate_mbps=None, delay_ms=delay)
                with _connect(link.port) as emu, _connect(target) as direct:
                    emu.sendall(b"e")
                    direct.sendall(b"e")
                    for _ in range(3):  # warm up both paths
                        _round_trip(emu, payload)
                        _round_trip(direct, payload)
                    diffs, rtts = [], []
                    for _ in range(pings):
                        d = _round_trip(direct, payload)
                        e = _round_trip(emu, payload)
                        diffs.append(e - d)
                        rtts.append(d)
                added = statistics.median(diffs) / 2 * 1000
                deciles = statistics.quantiles([x / 2 * 1000 for x in diffs], n=10)
                row = {
                    "setting_ms": delay,
                    "measured_ms": round(added, 3),
                    "error_ms": round(added - delay, 3),
                    "p10_ms": round(deciles[0], 3),
                    "p90_ms": round(deciles[-1], 3),
                    "direct_rtt_ms": round(statistics.median(rtts) * 1000, 3),
                    "round_trips": pings,
                    "ok": abs(added - delay) <= DELAY_TOLERANCE_MS,
                }
                delays.append(row)
                say(f"delay {delay:g} ms: added {added:.3f} ms one way")
            requests = _request_latency(
                link, target, repeats, say, QUICK_REQUEST_SECONDS if quick else None
            )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return {
        "machine": machine_info(),
        "goals": {
            "rate_tolerance_pct": 100 * RATE_TOLERANCE,
            "delay_tolerance_ms": DELAY_TOLERANCE_MS,
            "request_tolerance_pct": 100 * REQUEST_TOLERANCE,
            "request_slack_ms": REQUEST_SLACK_MS,
        },
        "transfer_seconds": seconds,
        "throughput": throughput,
        "delay": delays,
        "request_latency": requests,
        "all_ok": all(r["ok"] for r in throughput + delays + requests),
    }


def render(result: dict) -> str:
    """Tables of measured vs set rate, delay and request latency, with pass/fail against the goals."""
    goals = result["goals"]
    rate_rows = [
        [
            f"{r['setting_mbps']:g} Mbit/s",
            r["direction"],
            f"{r['measured_mbps']:.3f}",
            f"{r['error_pct']:+.1f} %",
            f"{r['seconds']:.2f} s",
            "pass" if r["ok"] else "FAIL",
        ]
        for r in result["throughput"]
    ]
    delay_rows = [
        [
            f"{r['setting_ms']:g} ms",
            f"{r['measured_ms']:.3f}",
            f"{r['error_ms']:+.3f} ms",
            f"{r['p10_ms']:.2f} .. {r['p90_ms']:.2f}",
            "pass" if r["ok"] else "FAIL",
        ]
        for r in result["delay"]
    ]
    request_rows = [
        [
            f"{r['rate_mbit']:g} Mbit/s",
            f"{r['delay_ms']:g} ms",
            f"{r['bytes']:,} B",
            f"{r['expected_ms']:.2f}",
            f"{r['measured_ms']:.2f}",
            f"{r['error_ms']:+.2f} ms",
            f"{r['error_pct']:+.1f} %",
            "pass" if r["ok"] else "FAIL",
        ]
        for r in result.get("request_latency", [])
    ]
    machine = result.get("machine", {})
    lines = [
        f"link emulator accuracy ({'quick' if result.get('quick') else 'full'} run, "
        f"{machine.get('cpus', '?')} CPUs, python {machine.get('python', '?')})",
        "",
        f"throughput (goal: within {goals['rate_tolerance_pct']:g} % of the setting)",
        table(["setting", "dir", "measured Mbit/s", "error", "transfer", "result"], rate_rows),
        "",
        f"added one-way delay (goal: within {goals['delay_tolerance_ms']:g} ms of the setting; "
        "median of paired round trips / 2)",
        table(["setting", "measured ms", "error", "p10 .. p90 ms", "result"], delay_rows),
        "",
        f"one-way time of one request over an idle link (goal: bytes / rate + delay, within "
        f"{goals.get('request_tolerance_pct', 10):g} % + {goals.get('request_slack_ms', 1):g} ms; "
        "median of repetitions)",
        table(
            ["rate", "delay", "request", "expected ms", "measured ms", "error", "error %", "result"],
            request_rows,
        ),
        "",
        "all within goals" if result["all_ok"] else "SOME MEASUREMENTS MISSED THE GOALS",
    ]
    return "\n".join(lines)
