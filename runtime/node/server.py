"""``edge-node``: serve the tail segments of a model over gRPC, with health and metrics.

Settings are one object, :class:`~edgesplit.runtime.node.settings.NodeSettings`.

Example::

    edge-node --model resnet_fm --port 8001 --metrics-port 9091

SIGTERM (or Ctrl-C) stops it gracefully: it stops accepting requests, reports NOT_SERVING,
lets in-flight requests finish within ``--grace`` seconds, and exits 0.

Security (docs/security.md): ``--tls-cert``/``--tls-key`` serve TLS, ``--tls-ca`` adds
mutual TLS (clients need a certificate from that CA); ``--token-file`` (or
``$EDGESPLIT_TOKEN``) requires ``authorization: Bearer <token>`` on every call but health.
Metrics listen on ``--metrics-host`` (loopback by default), an optional health-only port on
``--health-host``/``--health-port``::

    edge-node --host 198.18.0.11 --tls-cert certs/node1.pem --tls-key certs/node1.key \
        --tls-ca certs/ca.pem --token-file /etc/edgesplit/token
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from edgesplit.runtime.logs import log_to_stderr
from edgesplit.runtime.transport.auth import read_token

from .settings import NodeSettings, configure_parser

log = logging.getLogger("edgesplit.node")


class PortError(Exception):
    """A port the node was told to listen on cannot be bound (taken, or a bad address)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-node", description="Serve a model's segments over gRPC.")
    return configure_parser(p)


@dataclass
class Security:
    """What the security flags resolved to, checked before anything starts."""

    credentials: object | None = None  # grpc.ServerCredentials
    token: str | None = None
    mode: str = "plaintext"  # plaintext, TLS or mutual TLS


def load_security(settings: NodeSettings, env: dict | None = None) -> Security:
    """Check the TLS and token settings and load them; ValueError/FileNotFoundError say what to fix."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        given, missing = ("--tls-cert", "--tls-key") if settings.tls_cert else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} needs {missing}: give the node's certificate and its private key together")
    if settings.tls_ca and not settings.tls_cert:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key: a node that checks client certificates "
                         "must serve TLS itself")
    if settings.metrics_tls and not settings.tls_cert:
        raise ValueError("--metrics-tls needs --tls-cert and --tls-key")
    security = Security(token=read_token(settings.token_file, env))
    if settings.tls_cert:
        from edgesplit.runtime.transport.tls import check_pair, server_credentials

        check_pair(settings.tls_cert, settings.tls_key, settings.tls_ca)
        mode = Path(settings.tls_key).stat().st_mode
        if mode & 0o077:
            log.warning("%s is readable by group or others (mode %o); chmod 600 it", settings.tls_key, mode & 0o777)
        security.credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_ca, require_client_auth=True
        )
        security.mode = "mutual TLS" if settings.tls_ca else "TLS"
    elif security.token is not None:
        log.warning("a bearer token without TLS travels in clear text; add --tls-cert/--tls-key")
    return security


def load_registry(settings: NodeSettings):
    """The registry of every segment of the configured models, and a hash of their weights."""
    from edgesplit.models import WEIGHTS_DIR, build_model, load_trained
    from edgesplit.models.weights_io import sha256_file

    from .registry import ModelRegistry, register_split_model

    registry = ModelRegistry()
    hashes = []
    if settings.bundle:
        from edgesplit.partitioner.bundle import load_bundle

        from .registry import register_graph_cuts

        bundle = load_bundle(settings.bundle)
        unserved = [section for section in ("int8", "bottleneck") if section in bundle.manifest]
        if unserved:  # the node runs the bundle's float weights; say so rather than let it pass unnoticed
            log.warning("bundle %s carries %s, which edge-node does not serve yet (docs/compression.md): "
                        "serving its float32 model", bundle.path, " and ".join(unserved))
        register_graph_cuts(registry, f"{bundle.model.name}.graph", bundle.graph, settings.batching_config())
        # the chain's own segments too, named as the device runner asks for them
        register_split_model(registry, bundle.model, settings.batching_config())
        return registry, bundle.manifest["files"]["weights.safetensors"]
    for name in settings.models:
        if settings.random_weights:
            model = build_model(name).eval()
        else:
            model = load_trained(name, settings.weights)
            hashes.append(sha256_file(settings.weights or WEIGHTS_DIR / f"{name}.safetensors"))
        register_split_model(registry, model, settings.batching_config())
    if settings.nonn:
        from edgesplit.partitioner.nonn.bundle import load_ensemble

        from .registry import register_nonn_members

        ensemble = load_ensemble(settings.nonn, list(settings.members) or None)
        register_nonn_members(registry, ensemble, list(settings.members) or None, settings.batching_config())
        hashes.append(ensemble.manifest["sha256"])
    return registry, ",".join(hashes)


async def serve(settings: NodeSettings, security: Security | None = None) -> int:
    """Run a node until SIGTERM or SIGINT, then drain and stop; returns the exit code."""
    import torch
    from prometheus_client import CollectorRegistry

    from edgesplit.runtime.metrics import NodeMetrics
    from edgesplit.runtime.metrics_http import MetricsServer

    from .dataplane import MAX_INPUT_ELEMENTS, DataPlane
    from .servicer import start_health_server, start_node_server
    from .workers import ProcessWorkers

    workers, threads = settings.worker_count(), settings.thread_count()
    if settings.oversubscribed():
        log.warning("%d workers x %d threads exceed the %d cores: expect slower answers",
                    workers, threads, os.cpu_count())
    torch.set_num_threads(threads)
    registry, sha = load_registry(settings)
    prom = CollectorRegistry()
    metrics = NodeMetrics(prom)
    # Worker processes are forked here: after the models are loaded, before any gRPC object exists.
    executor = ProcessWorkers(registry, workers, threads, MAX_INPUT_ELEMENTS) if settings.worker_processes else None
    plane = DataPlane(registry, metrics, max_inflight=settings.max_inflight, workers=workers, executor=executor)
    security = security or load_security(settings)
    http = None
    metrics_port = -1
    if settings.metrics_port >= 0:  # before gRPC: a port already taken fails here, with nothing to undo
        tls = {}
        if settings.metrics_tls:
            tls = {"certfile": settings.tls_cert, "keyfile": settings.tls_key, "client_cafile": settings.tls_ca}
        try:
            http = MetricsServer(prom, settings.metrics_port, settings.metrics_host, **tls)
        except OSError as exc:
            if executor:
                executor.close()
            where = f"{settings.metrics_host}:{settings.metrics_port}"
            raise PortError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        metrics_port = http.port
    node = None
    health_server, health_port = None, -1
    where = f"{settings.host}:{settings.port}"
    try:
        node = await start_node_server(
            plane, settings.host, settings.port, node_name=settings.name, weights_sha256=sha,
            intra_op_threads=threads, credentials=security.credentials, token=security.token,
        )
        if settings.health_port >= 0:
            where = f"health port {settings.health_host}:{settings.health_port}"
            health_server, health_port = await start_health_server(node.health, settings.health_host,
                                                                   settings.health_port)
    except (OSError, RuntimeError) as exc:  # gRPC raises RuntimeError when it cannot bind
        if node is not None:  # the data port is up: stop it, or it serves on without workers
            await node.stop(0)
        if http:
            http.close()
        if executor:
            executor.close()
        raise PortError(f"cannot listen on {where}: {exc}") from None
    auth = "bearer token required" if security.token else "no token"
    # With --bundle the zoo models are not served (settings.models keeps its default): name the
    # bundle's model, which the start-up line called resnet_fm whatever the bundle held.
    served = list(settings.models)
    if settings.bundle:
        split = next(iter(registry.split_models.values()), None)
        served = [f"{split.name if split else 'nothing'} (bundle {settings.bundle})"]
    if settings.nonn:
        which = ", ".join(map(str, settings.members)) if settings.members else "all"
        served.append(f"NoNN {settings.nonn} (members {which})")
    batching = (f"batching up to {settings.max_batch} (preferred {settings.preferred_batch}, "
                f"{settings.max_delay_ms:g} ms)" if settings.batching else "no batching")
    print(
        f"edge-node: serving {', '.join(served)} on {settings.host}:{node.port} ({security.mode}, {auth}), "
        f"{workers} worker {'processes' if settings.worker_processes else 'threads'} x {threads} torch threads, "
        f"{batching}, metrics on port {metrics_port}",
        flush=True,
    )
    if settings.port_file:
        tmp = Path(settings.port_file).with_suffix(".tmp")
        info = {"port": node.port, "metrics_port": metrics_port, "health_port": health_port, "pid": os.getpid(),
                "worker_pids": executor.pids if executor else []}
        tmp.write_text(json.dumps(info))
        tmp.replace(settings.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    publisher, publishing = _start_telemetry(settings, plane, registry, stop)
    await stop.wait()
    if publishing is not None:
        await publishing
        publisher.close()
    print(f"edge-node: draining {plane.inflight} in-flight requests", flush=True)
    await node.stop(settings.grace)
    if health_server:
        await health_server.stop(0)
    await plane.aclose()
    if http:
        http.close()
    print("edge-node: stopped", flush=True)
    return 0


def _start_telemetry(settings: NodeSettings, plane, registry, stop: asyncio.Event):
    """The publisher and its task when ``--telemetry`` is set, else (None, None)."""
    if not settings.telemetry:
        return None, None
    import zmq

    from edgesplit.runtime.control.bus import CurveKeys, TelemetryPublisher

    from .telemetry import publish_load

    keys = (CurveKeys.load(settings.curve_dir, settings.name.replace(":", "_"), server="controller")
            if settings.curve_dir else None)
    try:
        publisher = TelemetryPublisher(zmq.Context.instance(), settings.telemetry, f"node/{settings.name}", keys)
    except zmq.ZMQError as exc:  # e.g. a host name ZeroMQ cannot resolve: serve on, say so
        log.error("telemetry to %s disabled: %s", settings.telemetry, exc)
        return None, None
    task = asyncio.get_running_loop().create_task(
        publish_load(publisher, plane, registry, settings.telemetry_interval, stop))
    return publisher, task


def run(args: argparse.Namespace) -> int:
    """Run a node from parsed flags (``edgesplit node`` and ``edge-node``)."""
    log_to_stderr()
    try:
        settings = NodeSettings.from_args(args)
        security = load_security(settings)  # before loading the model: a bad flag fails at once
        if settings.curve_dir:
            from edgesplit.runtime.control.bus import CurveKeys

            CurveKeys.load(settings.curve_dir, settings.name.replace(":", "_"), server="controller")
        return asyncio.run(serve(settings, security))
    except (FileNotFoundError, KeyError, ValueError, PortError) as exc:
        print(f"edge-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the node's own handlers are in place: no traceback
        print("edge-node: interrupted while starting", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
