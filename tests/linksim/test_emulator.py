"""Tests of the link emulator (edgesplit.linksim) against real loopback servers."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgesplit.linksim import (
    LinkEmulator,
    LinkEmulatorThread,
    LinkSettings,
    configure_parser,
    load_schedule,
    load_trace,
    main,
    run,
)

from .servers import serve

pytestmark = pytest.mark.timeout(60)

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


# --------------------------------------------------------------------------- servers
class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass  # reset by the emulator: fine


class _Sink(socketserver.BaseRequestHandler):
    """Reads an 8-byte length, then that many bytes, then answers b"k"."""

    def handle(self) -> None:
        try:
            n = int.from_bytes(_recv_exactly(self.request, 8), "big")
            _recv_exactly(self.request, n)
            self.request.sendall(b"k")
        except (OSError, EOFError):
            pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@pytest.fixture
def echo_port() -> Iterator[int]:
    yield from serve(_Echo)


@pytest.fixture
def sink_port() -> Iterator[int]:
    yield from serve(_Sink)


@pytest.fixture
def link_factory() -> Iterator[Callable[..., LinkEmulatorThread]]:
    links: list[LinkEmulatorThread] = []

    def make(port: int, settings: LinkSettings | None = None, **kwargs) -> LinkEmulatorThread:
        link = LinkEmulatorThread("127.0.0.1", port, settings=settings, **kwargs)
        links.append(link)
        return link

    yield make
    for link in links:
        link.close()


def _connect(port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _rtt(sock: socket.socket, payload: bytes = b"0123456789") -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    assert _recv_exactly(sock, len(payload)) == payload
    return time.perf_counter() - start


def _wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> float:
    """Poll until ``predicate()``; return when it became true (perf_counter)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return time.perf_counter()
        time.sleep(0.005)
    raise AssertionError("condition not reached in time")


# --------------------------------------------------------------------------- settings
def test_settings_validate_and_replace() -> None:
    s = LinkSettings(rate_mbps=2, delay_ms=25)
    assert s.rate_mbps == 2.0 and s.outage is None and not s.blocked
    assert s.replace(outage="blackhole").blocked
    assert LinkSettings(rate_mbps=0).blocked
    with pytest.raises(ValueError, match="unknown link setting"):
        s.replace(bandwidth=3)
    with pytest.raises(ValueError, match="loss"):
        LinkSettings(loss=1.5)
    with pytest.raises(ValueError, match="delay_ms"):
        LinkSettings(delay_ms=-1)
    with pytest.raises(ValueError, match="outage"):
        LinkSettings(outage="down")  # type: ignore[arg-type]
    assert LinkSettings.from_dict(s.to_dict()) == s


# --------------------------------------------------------------------------- data path
def test_bytes_pass_unchanged_both_ways(echo_port, link_factory) -> None:
    link = link_factory(echo_port, LinkSettings(rate_mbps=80, delay_ms=2, jitter_ms=2))
    payload = os.urandom(1_000_000)
    with _connect(link.port) as s:
        received = bytearray()

        def read() -> None:
            while len(received) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        for off in range(0, len(payload), 10_000):  # many small writes: order must hold
            s.sendall(payload[off : off + 10_000])
        reader.join(20)
        assert bytes(received) == payload
        # half-close travels through: the echo server sees EOF and closes its side
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    stats = link.stats()
    assert stats["bytes_up"] == stats["bytes_down"] == len(payload)
    assert stats["connections"] == 1


def test_rate_limits_throughput(sink_port, link_factory) -> None:
    link = link_factory(sink_port, LinkSettings(rate_mbps=2))
    n = 500_000  # 2 s at 2 Mbit/s
    with _connect(link.port, timeout=20) as s:
        start = time.perf_counter()
        s.sendall(n.to_bytes(8, "big") + bytes(n))
        assert s.recv(1) == b"k"
        elapsed = time.perf_counter() - start
    assert 1.6 <= elapsed <= 6.0, elapsed


def test_delay_adds_to_round_trip(echo_port, link_factory) -> None:
    with _connect(echo_port) as direct:
        base = min(_rtt(direct) for _ in range(5))
    link = link_factory(echo_port, LinkSettings(delay_ms=30))
    with _connect(link.port) as s:
        rtts = [_rtt(s) for _ in range(5)]
    assert min(rtts) >= 0.060 - 0.001, rtts  # 30 ms each way
    assert min(rtts) - base < 0.5, rtts
    link.update(delay_ms=0)
    with _connect(link.port) as s:
        assert min(_rtt(s) for _ in range(5)) < 0.030


def test_loss_stalls_the_stream(echo_port, link_factory) -> None:
    link = link_factory(echo_port, LinkSettings(loss=1.0, stall_ms=100), seed=1)
    with _connect(link.port) as s:
        assert _rtt(s) >= 0.2 - 0.002  # one stall each way


def test_grpc_passes_through_and_blackhole_times_out(link_factory) -> None:
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    node_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        link = link_factory(node_port, LinkSettings(delay_ms=10, rate_mbps=20))
        with grpc.insecure_channel(f"127.0.0.1:{link.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            start = time.perf_counter()
            stub.Check(request, timeout=5)
            assert time.perf_counter() - start >= 0.020 - 0.001  # one round trip at least
            link.update(outage="blackhole")
            with pytest.raises(grpc.RpcError) as exc:
                stub.Check(request, timeout=0.3)
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            link.update(outage=None)
            assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


# --------------------------------------------------------------------------- outages
def test_blackhole_holds_bytes_until_restored(echo_port, link_factory) -> None:
    link = link_factory(echo_port)
    with _connect(link.port) as s:
        _rtt(s)
        link.update(outage="blackhole")
        s.sendall(b"x" * 1000)
        s.settimeout(0.4)
        with pytest.raises(socket.timeout):
            s.recv(1000)
        # a new connection is accepted, but nothing gets through either
        late = _connect(link.port)
        late.sendall(b"hello")
        late.settimeout(0.2)
        with pytest.raises(socket.timeout):
            late.recv(5)
        link.update(outage=None)
        s.settimeout(5)
        late.settimeout(5)
        assert _recv_exactly(s, 1000) == b"x" * 1000
        assert _recv_exactly(late, 5) == b"hello"
        late.close()


def test_reset_kills_connections_and_refuses_new_ones(echo_port, link_factory) -> None:
    link = link_factory(echo_port)
    port = link.port
    with _connect(port) as s:
        _rtt(s)
        link.update(outage="reset")
        with pytest.raises(ConnectionResetError):
            s.recv(10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    link.update(outage=None)
    assert link.port == port
    with _connect(port) as s:
        assert _rtt(s) < 1.0


# --------------------------------------------------------------------------- control
def _http(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_control_endpoint_reads_and_updates(echo_port, link_factory) -> None:
    link = link_factory(echo_port, LinkSettings(delay_ms=1))
    with _connect(link.port) as s:
        _rtt(s, b"abcd")
    status, state = _http(link.control_port, "GET", "/settings")
    assert status == 200
    assert state["delay_ms"] == 1 and state["rate_mbps"] is None and state["outage"] is None
    assert state["bytes_up"] == 4 and state["bytes_down"] == 4 and state["connections"] == 1

    status, state = _http(link.control_port, "PUT", "/settings", {"rate_mbps": 3, "delay_ms": 7})
    assert status == 200 and state["rate_mbps"] == 3 and state["delay_ms"] == 7
    assert link.settings == LinkSettings(rate_mbps=3, delay_ms=7)
    status, state = _http(link.control_port, "POST", "/settings", {"outage": "blackhole"})
    assert status == 200 and link.settings.outage == "blackhole"

    status, err = _http(link.control_port, "PUT", "/settings", {"bandwidth": 1})
    assert status == 400 and "unknown link setting" in err["error"]
    status, err = _http(link.control_port, "PUT", "/settings", {"loss": 2})
    assert status == 400 and "loss" in err["error"]
    assert link.settings.loss == 0
    assert _http(link.control_port, "GET", "/nothing")[0] == 404
    assert _http(link.control_port, "DELETE", "/settings")[0] == 405
    conn = http.client.HTTPConnection("127.0.0.1", link.control_port, timeout=5)
    try:
        conn.request("PUT", "/settings", body=b"[" * 50_000)  # deeper than the JSON parser recurses
        resp = conn.getresponse()
        assert resp.status == 400 and "nested too deeply" in json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_async_api() -> None:
    async def scenario() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[1]
        try:
            async with LinkEmulator("127.0.0.1", target, control_port=None) as emu:
                assert emu.control_port is None and emu.port > 0
                emu.update(delay_ms=5)
                reader, writer = await asyncio.open_connection("127.0.0.1", emu.port)
                start = time.perf_counter()
                writer.write(b"hi")
                assert await reader.readexactly(2) == b"hi"
                assert time.perf_counter() - start >= 0.009
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- traces, schedules
@pytest.mark.skipif(not TRACES.is_dir(), reason="no ../shared/traces here")
def test_load_trace_reads_shared_traces() -> None:
    samples = load_trace(TRACES / "hsdpa-3g" / "norway_bus_1.txt")
    assert len(samples) == 266
    assert samples[0] == (0.0, pytest.approx(4.03768755221))
    assert all(t1 > t0 for (t0, _), (t1, _) in zip(samples, samples[1:], strict=False))
    fcc = load_trace(TRACES / "fcc" / "trace_13562_http---www.facebook.com.txt")
    assert any(rate == 0 for _, rate in fcc)  # outages are kept


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 1.5\n1 abc\n", r":2: expected '<seconds> <Mbit/s>'"),
        ("0 1.5 7\n", r":1: expected"),
        ("0 1.5\n0 2.0\n", r":2: times must increase"),
        ("0 -1\n", r":1: time and rate must be finite and >= 0"),
        ("\n# nothing\n", r"no samples"),
    ],
)
def test_load_trace_rejects_malformed_lines(tmp_path, text, message) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_trace(path)


def test_load_trace_skips_a_byte_order_mark(tmp_path) -> None:
    path = tmp_path / "bom.txt"
    path.write_text("\ufeff0 1.5\n1 2\n", encoding="utf-8")
    assert load_trace(path) == [(0.0, 1.5), (1.0, 2.0)]


def test_a_trace_denser_than_the_loop_can_follow_does_not_freeze_the_emulator(echo_port, link_factory) -> None:
    # 5,000 samples 5 us apart, repeating: the replay is always behind. It must still yield,
    # so connections and the control endpoint are served (it used to spin without yielding).
    samples = [(i * 5e-6, 1.0 + i % 7) for i in range(5000)]
    link = link_factory(echo_port, LinkSettings(delay_ms=1), trace=samples)
    _wait_for(lambda: link.settings.rate_mbps is not None and link.settings.rate_mbps > 1.0)
    with _connect(link.port) as s:
        assert _rtt(s, b"x" * 100) < 5.0
    status, state = _http(link.control_port, "GET", "/settings")
    assert status == 200 and state["schedule"] == "trace"


def test_schedule_applies_settings_at_their_times(echo_port, link_factory) -> None:
    steps = [
        (0.0, LinkSettings(rate_mbps=5)),
        (0.3, LinkSettings(rate_mbps=5, outage="blackhole")),
        (0.6, LinkSettings(delay_ms=10)),
    ]
    started = time.perf_counter()
    link = link_factory(echo_port, schedule=steps)
    t_first = _wait_for(lambda: link.settings == steps[0][1])
    t_black = _wait_for(lambda: link.settings.outage == "blackhole")
    t_last = _wait_for(lambda: link.settings == steps[2][1])
    assert t_first < t_black < t_last
    assert t_black - started >= 0.3 - 0.01
    assert t_last - started >= 0.6 - 0.01
    assert link.stats()["schedule"] is None  # done: it does not loop


def test_schedule_loops_with_a_period(echo_port, link_factory) -> None:
    steps = [(0.0, LinkSettings(delay_ms=1)), (0.2, LinkSettings(delay_ms=2))]
    link = link_factory(echo_port, schedule=steps, schedule_period=0.4)
    t1 = _wait_for(lambda: link.settings.delay_ms == 2)
    t2 = _wait_for(lambda: link.settings.delay_ms == 1)
    _wait_for(lambda: link.settings.delay_ms == 2)
    assert t2 - t1 >= 0.2 - 0.02
    assert link.stats()["schedule"] == "schedule"
    with pytest.raises(ValueError, match="period"):
        link.set_schedule(steps, period=0.1)


def test_trace_replay_loops_and_zero_is_blackhole(tmp_path, echo_port, link_factory) -> None:
    path = tmp_path / "trace.txt"
    path.write_text("10.0 4.0\n10.2 0\n10.4 8.0\n")  # period 0.6 s, starts at its first sample
    link = link_factory(echo_port, LinkSettings(delay_ms=3), trace=load_trace(path))
    _wait_for(lambda: link.settings.rate_mbps == 4.0)
    _wait_for(lambda: link.settings.outage == "blackhole")
    _wait_for(lambda: link.settings.rate_mbps == 8.0 and link.settings.outage is None)
    _wait_for(lambda: link.settings.rate_mbps == 4.0)  # looped
    assert link.settings.delay_ms == 3  # the trace only drives the rate
    assert link.stats()["schedule"] == "trace"
    link.clear_schedule()
    assert link.stats()["schedule"] is None


def test_load_schedule_carries_fields_over(tmp_path) -> None:
    path = tmp_path / "schedule.json"
    path.write_text(
        json.dumps(
            [
                {"t": 0, "rate_mbps": 5, "delay_ms": 20},
                {"t": 2, "outage": "blackhole"},
                {"t": 3, "outage": None, "rate_mbps": 1},
            ]
        )
    )
    steps = load_schedule(path)
    assert [t for t, _ in steps] == [0, 2, 3]
    assert steps[1][1] == LinkSettings(rate_mbps=5, delay_ms=20, outage="blackhole")
    assert steps[2][1] == LinkSettings(rate_mbps=1, delay_ms=20)
    path.write_text(json.dumps([{"t": 0, "rate": 5}]))
    with pytest.raises(ValueError, match="step 0: unknown link setting"):
        load_schedule(path)


# --------------------------------------------------------------------------- CLI
def test_cli_runs_until_signalled(echo_port) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgesplit.linksim",
            "--target",
            f"127.0.0.1:{echo_port}",
            "--delay",
            "5",
            "--rate",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listen = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
        control = re.search(r"control on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
        assert listen and control
        with _connect(int(listen.group(1))) as s:
            assert _rtt(s) >= 0.009
        status, state = _http(int(control.group(1)), "GET", "/settings")
        assert status == 200 and state["rate_mbps"] == 10 and state["bytes_up"] == 10
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_cli_rejects_bad_arguments(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--target", "nohostport"])
    assert exc.value.code == 2
    capsys.readouterr()
    bad = tmp_path / "bad.txt"
    bad.write_text("0 fast\n")
    assert main(["--target", "127.0.0.1:1", "--trace", str(bad)]) == 2
    assert "bad.txt:1" in capsys.readouterr().err
    assert main(["--target", "127.0.0.1:1", "--period", "5"]) == 2
    assert "--period applies to --schedule" in capsys.readouterr().err
    for port in ("70000", "-1"):
        with pytest.raises(SystemExit) as exc:
            main(["--target", "127.0.0.1:1", "--control-port", port])
        assert exc.value.code == 2
        assert "expected a port number 0..65535" in capsys.readouterr().err
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    assert main(["--target", "127.0.0.1:1", "--schedule", str(deep)]) == 2
    assert "nested too deeply" in capsys.readouterr().err
    one = tmp_path / "one.json"
    one.write_text('[{"t": 0, "rate_mbps": 1}]')
    assert main(["--target", "127.0.0.1:1", "--schedule", str(one), "--period", "1e-9"]) == 2
    assert "period must be at least 0.01 s" in capsys.readouterr().err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("0 1\n0.000001 2\n")
    assert main(["--target", "127.0.0.1:1", "--trace", str(tiny)]) == 2
    assert "must last at least 0.01 s" in capsys.readouterr().err


def test_cli_mounts_as_a_subcommand(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="edgesplit")
    sub = parser.add_subparsers(dest="command", required=True)
    configure_parser(sub.add_parser("linksim"))
    args = parser.parse_args(["linksim", "--target", "127.0.0.1:1", "--rate", "2", "--delay", "5"])
    assert args.target == ("127.0.0.1", 1) and args.rate == 2 and args.delay == 5
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    args = parser.parse_args(["linksim", "--target", "127.0.0.1:1", "--schedule", str(bad)])
    assert run(args) == 2
    assert "non-empty JSON list" in capsys.readouterr().err


def test_cli_reports_a_busy_port(echo_port, capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo_port}"]) == 1
    assert "cannot start" in capsys.readouterr().err
