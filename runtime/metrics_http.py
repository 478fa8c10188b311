"""Prometheus exposition over HTTP: ``/metrics`` only, bounded connections, idle timeouts.

Unlike a catch-all exporter, every other path answers 404, so a probe pointed at the wrong
path (``/v2/health/live``) does not read "live"; only GET and HEAD are served. Each
connection gets ``idle_timeout_s`` to send its request and at most ``max_connection_s`` in
all (a client trickling a byte at a time is cut off too), and at most ``max_connections``
are served at once (more are closed at once), so idle or slow clients cannot pile up
threads. With ``certfile``/``keyfile`` it serves HTTPS, and with ``client_cafile``
requires client certificates; the TLS handshake runs in the connection's thread, under
the same timeout.

Example::

    >>> from prometheus_client import CollectorRegistry, Counter
    >>> registry = CollectorRegistry()
    >>> Counter("demo_total", "A demo counter.", registry=registry).inc()
    >>> server = MetricsServer(registry, port=0)
    >>> import urllib.request
    >>> b"demo_total 1.0" in urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read()
    True
    >>> server.close()
"""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

METRICS_PATH = "/metrics"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout_s
        super().setup()
        if self.server.tls is not None:  # handshake here, off the accept loop, under the timeout
            # Wrapping detaches the accepted socket: the server must hold the TLS one before the
            # handshake starts, or a client trickling its handshake (or its request) could not
            # be cut off at the connection deadline.
            wrapped = self.server.tls.wrap_socket(self.connection, server_side=True, do_handshake_on_connect=False)
            self.server.track(self.request, wrapped)
            try:
                wrapped.do_handshake()
            except BaseException:
                wrapped.close()  # the accepted socket is detached: closing it would not free this one
                raise
            self.connection = wrapped
            self.rfile = self.connection.makefile("rb", self.rbufsize)
            self.wfile = self.connection.makefile("wb")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path != METRICS_PATH:
            self._send(404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8", body)
            return
        self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST, body)

    def _send(self, status: int, payload: bytes, content_type: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # scrapes are not worth a log line
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, registry, idle_timeout_s, max_connections, tls, max_connection_s) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.idle_timeout_s = idle_timeout_s
        self.max_connection_s = max_connection_s
        self.tls = tls
        self._slots = threading.BoundedSemaphore(max_connections)
        # accepted socket -> [when it must be closed, the socket to shut down then (the TLS one once wrapped)]
        self._open: dict[socket.socket, list] = {}
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def expire(self) -> None:
        """Shut down connections that have outlived ``max_connection_s`` (their threads then end)."""
        now = time.monotonic()
        with self._open_lock:
            late = [target for deadline, target in self._open.values() if deadline <= now]
        for sock in late:
            try:
                # the plain socket's shutdown, also on a TLS socket (whose own shutdown would
                # first tear down its TLS state under the thread still using it)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def track(self, request, sock: socket.socket) -> None:
        """From now on, shut down ``sock`` when ``request``'s connection outlives its deadline."""
        with self._open_lock:
            if request in self._open:
                self._open[request][1] = sock

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):  # too many open connections: refuse this one
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open[request] = [time.monotonic() + self.max_connection_s, request]
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _forget(self, request) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        self._slots.release()

    def handle_error(self, request, client_address) -> None:  # timeouts, resets, bad TLS: drop quietly
        pass


class MetricsServer:
    """Serve ``registry`` on ``host:port`` (0 picks a free port) in a background thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        port: int = 0,
        host: str = "127.0.0.1",
        idle_timeout_s: float = 5.0,
        max_connections: int = 16,
        max_connection_s: float = 10.0,
        certfile: str | None = None,
        keyfile: str | None = None,
        client_cafile: str | None = None,
    ) -> None:
        tls = None
        if certfile:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(certfile, keyfile)
            if client_cafile:
                tls.load_verify_locations(client_cafile)
                tls.verify_mode = ssl.CERT_REQUIRED
        self._server = _Server((host, port), registry, idle_timeout_s, max_connections, tls, max_connection_s)
        self.port = self._server.server_address[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self._reaper = threading.Thread(target=self._reap, name="metrics-http-reaper", daemon=True)
        self._reaper.start()

    def _reap(self) -> None:
        while not self._stop.wait(0.5):
            self._server.expire()

    def close(self) -> None:
        """Stop serving and close the listening socket (open connections time out on their own)."""
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self._reaper.join(5)
