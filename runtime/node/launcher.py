"""Start, kill and restart ``edge-node`` processes (demo, tests, benchmarks).

Example::

    with NodeProcess(model="resnet_fm") as node:
        client = EdgeClient(node.address)
        node.kill()          # SIGKILL
        node.start()         # same port again
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class NodeProcess:
    """One ``edge-node`` in a child process, listening on loopback."""

    def __init__(
        self,
        model: str | None = "resnet_fm",
        host: str = "127.0.0.1",
        port: int = 0,
        metrics_port: int = 0,
        extra_args: list[str] | None = None,
        threads: int = 1,
        startup_timeout: float = 60.0,
        log_path: str | Path | None = None,
        command_prefix: list[str] | None = None,
    ) -> None:
        self.model = model
        self.host = host
        self.port = port
        self.metrics_port = metrics_port
        self.extra_args = list(extra_args or [])
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.command_prefix = list(command_prefix or [])
        self._dir = tempfile.TemporaryDirectory(prefix="edgesplit-node-")
        self.log_path = Path(log_path) if log_path else Path(self._dir.name) / "node.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> NodeProcess:
        """Start the node (on its previous port after a restart) and wait until it serves."""
        port_file = Path(self._dir.name) / "port.json"
        port_file.unlink(missing_ok=True)
        cmd = [
            *self.command_prefix,
            sys.executable,
            "-m",
            "edgesplit.runtime.node",
            *(["--model", self.model] if self.model else []),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--port-file",
            str(port_file),
            "--threads",
            str(self.threads),
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"edge-node exited with {self.proc.returncode}:\n{self.log_path.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"edge-node did not start in {self.startup_timeout} s:\n{self.log_path.read_text()[-2000:]}"
                )
            time.sleep(0.05)
        info = json.loads(port_file.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies at once, in-flight requests and all."""
        if self.running:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait for the graceful exit; returns the exit code."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def restart(self) -> NodeProcess:
        self.kill()
        return self.start()

    def close(self) -> None:
        self.kill()
        self._dir.cleanup()

    def __enter__(self) -> NodeProcess:
        try:
            return self.start()
        except BaseException:  # a failed or interrupted start (Ctrl-C, SIGTERM) must not leave a node behind
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()
