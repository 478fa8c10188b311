"""The metrics HTTP server: /metrics only, connection limits, idle and slow clients cut off."""

from __future__ import annotations

import http.client
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from edgesplit.runtime.metrics_http import MetricsServer
from tests.helpers import wait_until


@pytest.fixture
def server():
    registry = CollectorRegistry()
    Counter("demo_total", "A demo counter.", registry=registry).inc(3)
    s = MetricsServer(registry, port=0, idle_timeout_s=0.5, max_connections=4, max_connection_s=1.5)
    yield s
    s.close()


def test_only_metrics_is_served(server):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10).read()
    assert b"demo_total 3.0" in body
    for path in ("/", "/v2/health/live", "/metrics/x"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=10)
        assert err.value.code == 404


def test_a_client_trickling_bytes_is_cut_off_at_the_connection_deadline(server):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    started = time.monotonic()
    closed = False
    try:
        for ch in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":  # one byte every 0.2 s: never idle 0.5 s
            try:
                sock.sendall(bytes([ch]))
            except OSError:
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
    finally:
        sock.close()
    assert closed, "the trickling connection was never closed"
    assert time.monotonic() - started < 10


def test_connections_over_the_limit_are_closed_and_the_server_recovers(server):
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(6)]

    def eof(sock):
        sock.settimeout(0.05)
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    wait_until(lambda: all(eof(s) for s in held[4:]), 10, "connections over the limit to close")
    for s in held:
        s.close()

    def scrape_works() -> bool:
        # Until the server has seen the held connections close, their slots are taken and a
        # scrape is turned away (reset or closed): that is the limit working, not a failure.
        try:
            return b"demo_total" in urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                                           timeout=10).read()
        except (ConnectionError, http.client.HTTPException, urllib.error.URLError):
            return False

    wait_until(scrape_works, 10, "scrapes to work again")


def test_a_tls_client_trickling_its_request_is_cut_off_at_the_connection_deadline(tmp_path):
    """Wrapping the socket for TLS detached the one the server held, so the deadline's shutdown
    silently failed: 16 trickling clients locked scrapes out for as long as they liked."""
    import ssl

    from edgesplit.runtime.transport import tls

    files = tls.make_cluster_certs(tmp_path, ["node=127.0.0.1"])
    cert, key = files["hosts"]["node"]["cert"], files["hosts"]["node"]["key"]
    s = MetricsServer(CollectorRegistry(), port=0, idle_timeout_s=0.5, max_connections=4, max_connection_s=1.5,
                      certfile=cert, keyfile=key)
    context = ssl.create_default_context(cafile=str(files["ca"]))
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", s.port), timeout=10),
                               server_hostname="127.0.0.1")
    started = time.monotonic()
    closed = False
    try:
        for ch in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" * 4:  # one byte every 0.2 s: never idle 0.5 s
            try:
                sock.sendall(bytes([ch]))
                sock.settimeout(0.2)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except (OSError, ssl.SSLError):
                closed = True
                break
    finally:
        sock.close()
        s.close()
    assert closed, "the trickling TLS connection was never closed"
    assert time.monotonic() - started < 10
