"""Everything an edge node is configured with, as one checked object, and its command-line flags.

:class:`NodeSettings` is what :func:`edgesplit.runtime.node.server.serve` takes; it comes
from the command line (:func:`NodeSettings.from_args`) or is built in Python. Defaults
never oversubscribe the CPU: ``workers`` x ``threads`` (torch intra-op threads per batch)
stays within the cores, and a setting that exceeds them is reported.

Example::

    >>> s = NodeSettings(models=("resnet_fm",), port=0, threads=1)
    >>> s.worker_count(cores=2), s.batching_config().preferred_batch
    (2, 32)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgesplit.runtime.control.endpoint import check_endpoint

if TYPE_CHECKING:  # the registry imports torch; the command line should not have to
    from .registry import BatchingConfig


@dataclass(frozen=True)
class NodeSettings:
    """Configuration of one edge node (see ``edge-node --help`` for each field)."""

    models: tuple[str, ...] = ("resnet_fm",)
    weights: str | None = None
    bundle: str | None = None  # serve the cuts of this bundle's traced graph instead of the zoo's
    random_weights: bool = False
    nonn: str | None = None  # serve members of this NoNN bundle (shipped name or manifest path)
    members: tuple[int, ...] = ()  # which NoNN members; empty: all of them
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9091
    port_file: str | None = None
    name: str = dataclasses.field(default_factory=socket.gethostname)
    max_inflight: int = 96
    batching: bool = True
    max_batch: int = 64
    preferred_batch: int = 32
    max_delay_ms: float = 2.0
    workers: int = 0  # 0: as many as the cores allow at ``threads`` each
    worker_processes: bool = True  # run batches in worker processes (else threads of the node)
    threads: int = 1  # torch intra-op threads per batch; 0: cores / workers
    grace: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    token_file: str | None = None
    metrics_tls: bool = False
    health_host: str = "127.0.0.1"
    health_port: int = -1
    telemetry: str | None = None  # ZeroMQ endpoint of the controller's telemetry socket
    telemetry_interval: float = 1.0
    curve_dir: str | None = None  # CURVE keys for the bus: <name>.key(_secret) and controller.key

    def __post_init__(self) -> None:
        if not self.models and not self.nonn:
            raise ValueError("give at least one --model (or --nonn)")
        if self.bundle and self.nonn:
            raise ValueError("--bundle serves the bundle's own model: not with --nonn")
        if self.members and not self.nonn:
            raise ValueError("--member picks members of a NoNN bundle: give --nonn too")
        if any(m < 0 for m in self.members):
            raise ValueError(f"--member must be >= 0, not {min(self.members)}")
        if self.weights and len(self.models) != 1:
            raise ValueError("--weights applies to a single --model; serve one model per weights file")
        for name, value in (("max_inflight", self.max_inflight), ("max_batch", self.max_batch)):
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        if self.workers < 0 or self.threads < 0:
            raise ValueError("--workers and --threads must be >= 0 (0 picks them from the core count)")
        if self.grace < 0:
            raise ValueError(f"--grace must be >= 0, not {self.grace}")
        if not self.telemetry_interval > 0:
            raise ValueError(f"--telemetry-interval must be > 0 seconds, not {self.telemetry_interval}")
        if self.telemetry is not None:
            check_endpoint(self.telemetry, "--telemetry")
        for flag, port, lowest in (("--port", self.port, 0), ("--metrics-port", self.metrics_port, -1),
                                   ("--health-port", self.health_port, -1)):
            if not lowest <= port <= 65535:  # the OS takes a port modulo 65536: 70000 would serve on 4464
                off = ", -1 disables it" if lowest < 0 else ""
                raise ValueError(f"{flag} must be 0..65535 (0 picks a free one{off}), not {port}")
        if self.port_file:  # found unwritable only once serving, the node would stop at once
            folder = os.path.dirname(os.path.abspath(self.port_file))
            if os.path.isdir(self.port_file) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                raise ValueError(f"--port-file {self.port_file}: cannot write a file there")
        if self.curve_dir and not self.telemetry:
            raise ValueError("--curve-dir secures the telemetry bus: give --telemetry too")
        self.batching_config()  # validates preferred/max batch and delay

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NodeSettings:
        """Settings from a namespace made by :func:`configure_parser`."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        if getattr(args, "bundle", None) and (args.models or getattr(args, "nonn", None)):
            # the bundle is served alone (a node with both served only the bundle and said otherwise)
            raise ValueError("--bundle serves the bundle's own model: drop --model and --nonn, or run another node")
        values["models"] = tuple(args.models or (() if getattr(args, "nonn", None) else ("resnet_fm",)))
        values["members"] = tuple(sorted(set(getattr(args, "members", None) or ())))
        values["batching"] = not args.no_batching
        values["worker_processes"] = not args.worker_threads
        return cls(**values)

    def worker_count(self, cores: int | None = None) -> int:
        cores = cores or os.cpu_count() or 1
        if self.workers:
            return self.workers
        return max(1, cores // max(1, self.threads or 1))

    def thread_count(self, cores: int | None = None) -> int:
        cores = cores or os.cpu_count() or 1
        if self.threads:
            return self.threads
        return max(1, cores // self.worker_count(cores))

    def oversubscribed(self, cores: int | None = None) -> bool:
        cores = cores or os.cpu_count() or 1
        return self.worker_count(cores) * self.thread_count(cores) > cores

    def batching_config(self) -> BatchingConfig:
        from .registry import BatchingConfig

        return BatchingConfig(
            enabled=self.batching, preferred_batch=min(self.preferred_batch, self.max_batch),
            max_batch=self.max_batch, max_delay_s=self.max_delay_ms / 1000,
        )


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the node's flags to ``p`` (used by ``edge-node`` and ``edgesplit node``)."""
    d = NodeSettings.__dataclass_fields__
    p.add_argument("--model", dest="models", action="append",
                   help="model from the zoo; repeat to serve several (default: resnet_fm)")
    p.add_argument("--weights", help="safetensors weights (default: the shipped ones)")
    p.add_argument("--bundle", help="serve a bundle (edgesplit plan MODEL --out DIR): every cut K of its traced "
                   "graph as MODEL.graph.from.K, one input per crossing tensor, and the chain's block segments "
                   "as MODEL.from.K (what the device runner asks for); hashes are verified first. Not with "
                   "--model or --nonn")
    p.add_argument("--nonn", help="serve the members of a NoNN bundle (a shipped name such as "
                   "nonn_resnet_fm_s8_enhanced, or a manifest path) as NAME.member.I; without --model, only them")
    p.add_argument("--member", dest="members", type=int, action="append",
                   help="with --nonn: serve this member only; repeat for several (default: every member)")
    p.add_argument("--random-weights", action="store_true", help="serve untrained weights (latency work)")
    p.add_argument("--host", default=d["host"].default, help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=d["port"].default, help="gRPC port; 0 picks a free one (default: 8001)")
    p.add_argument("--metrics-host", default=d["metrics_host"].default, help="address of the /metrics endpoint")
    p.add_argument("--metrics-port", type=int, default=d["metrics_port"].default,
                   help="Prometheus port; 0 picks one, -1 disables (default: 9091)")
    p.add_argument("--port-file", help="write {port, metrics_port, health_port, pid} as JSON here once serving")
    p.add_argument("--name", default=socket.gethostname(), help="node name reported by NodeInfo")
    p.add_argument("--max-inflight", type=int, default=d["max_inflight"].default,
                   help="requests queued or running before RESOURCE_EXHAUSTED (default: 96)")
    b = p.add_argument_group("dynamic batching")
    b.add_argument("--no-batching", action="store_true", help="run every request on its own")
    b.add_argument("--max-batch", type=int, default=d["max_batch"].default,
                   help="most rows in one batch, and in one request (default: 64)")
    b.add_argument("--preferred-batch", type=int, default=d["preferred_batch"].default,
                   help="rows a loaded node waits for before running a batch (default: 32)")
    b.add_argument("--max-delay-ms", type=float, default=d["max_delay_ms"].default,
                   help="longest wait for the preferred batch while the node is loaded (default: 2)")
    c = p.add_argument_group("threads (workers x threads should not exceed the cores)")
    c.add_argument("--workers", type=int, default=0, help="batches run at a time (default 0: cores / threads)")
    c.add_argument("--worker-threads", action="store_true",
                   help="run batches in threads of the node's process instead of worker processes "
                   "(less memory, but the workers share the interpreter lock with the server)")
    c.add_argument("--threads", type=int, default=d["threads"].default,
                   help="torch intra-op threads per batch (default: 1; 0: cores / workers)")
    p.add_argument("--grace", type=float, default=d["grace"].default,
                   help="seconds to drain in-flight requests on SIGTERM (default: 10)")
    s = p.add_argument_group("security (see docs/security.md)")
    s.add_argument("--tls-cert", help="PEM certificate of this node (edgesplit certs); serve TLS")
    s.add_argument("--tls-key", help="PEM private key of --tls-cert")
    s.add_argument("--tls-ca", help="PEM CA certificate: require client certificates signed by it (mutual TLS)")
    s.add_argument(
        "--token-file",
        help="file whose first line is the bearer token every call but health must carry "
        "(default: $EDGESPLIT_TOKEN if set; never given on the command line)",
    )
    s.add_argument("--metrics-tls", action="store_true",
                   help="serve /metrics over HTTPS with --tls-cert/--tls-key (client certificates if --tls-ca)")
    s.add_argument("--health-host", default=d["health_host"].default,
                   help="address of the health-only port (default: 127.0.0.1)")
    s.add_argument(
        "--health-port", type=int, default=d["health_port"].default,
        help="extra port with only grpc.health.v1, for probes without certificate or token; 0 picks one, "
        "-1 (default) disables; health is always on --port too",
    )
    t = p.add_argument_group("telemetry bus (see docs/controller.md)")
    t.add_argument("--telemetry", help="publish queue depth and segment times to this controller endpoint "
                   "(e.g. tcp://10.0.0.1:5555)")
    t.add_argument("--telemetry-interval", type=float, default=d["telemetry_interval"].default,
                   help="seconds between node telemetry messages (default: 1)")
    t.add_argument("--curve-dir", help="CURVE keys for the bus: NAME.key and NAME.key_secret (NAME: --name) and "
                   "controller.key, as edgesplit certs --curve writes them")
    return p
