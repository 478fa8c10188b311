"""``edge-node``: serve the tail segments of a model over gRPC, with health and metrics.

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
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("edgesplit.node")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-node", description="Serve a model's tail segments over gRPC.")
    p.add_argument("--model", default="resnet_fm", help="model from the zoo (default: resnet_fm)")
    p.add_argument("--weights", help="safetensors weights (default: the shipped ones)")
    p.add_argument("--random-weights", action="store_true", help="serve untrained weights (latency work)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port; 0 picks a free one (default: 8001)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the /metrics endpoint")
    p.add_argument("--metrics-port", type=int, default=9091, help="Prometheus port; 0 picks one, -1 disables")
    p.add_argument("--port-file", help="write {port, metrics_port, pid} as JSON here once serving")
    p.add_argument("--name", default=socket.gethostname(), help="node name reported by NodeInfo")
    p.add_argument("--max-inflight", type=int, default=32, help="requests in flight before RESOURCE_EXHAUSTED")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch accepted in one request")
    p.add_argument("--workers", type=int, default=2, help="model execution threads")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to drain in-flight requests on SIGTERM")
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
    s.add_argument("--health-host", default="127.0.0.1", help="address of the health-only port (default: 127.0.0.1)")
    s.add_argument(
        "--health-port", type=int, default=-1,
        help="extra port with only grpc.health.v1, for probes without certificate or token; 0 picks one, "
        "-1 (default) disables; health is always on --port too",
    )
    return p


@dataclass
class Security:
    """What the security flags resolved to, checked before anything starts."""

    credentials: object | None = None  # grpc.ServerCredentials
    token: str | None = None
    mode: str = "plaintext"  # plaintext, TLS or mutual TLS


def load_security(args: argparse.Namespace, env: dict | None = None) -> Security:
    """Check the TLS and token flags and load them; ValueError/FileNotFoundError say what to fix."""
    from .auth import read_token

    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = ("--tls-cert", "--tls-key") if args.tls_cert else ("--tls-key", "--tls-cert")
        raise ValueError(f"{given} needs {missing}: give the node's certificate and its private key together")
    if args.tls_ca and not args.tls_cert:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key: a node that checks client certificates "
                         "must serve TLS itself")
    if args.metrics_tls and not args.tls_cert:
        raise ValueError("--metrics-tls needs --tls-cert and --tls-key")
    security = Security(token=read_token(args.token_file, env))
    if args.tls_cert:
        from .tls import check_pair, server_credentials

        check_pair(args.tls_cert, args.tls_key, args.tls_ca)
        mode = Path(args.tls_key).stat().st_mode
        if mode & 0o077:
            log.warning("%s is readable by group or others (mode %o); chmod 600 it", args.tls_key, mode & 0o777)
        security.credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_ca, require_client_auth=True)
        security.mode = "mutual TLS" if args.tls_ca else "TLS"
    elif security.token is not None:
        log.warning("a bearer token without TLS travels in clear text; add --tls-cert/--tls-key")
    return security


async def serve(args: argparse.Namespace, security: Security | None = None) -> int:
    import torch
    from prometheus_client import CollectorRegistry, start_http_server

    from edgesplit.models import build_model, load_trained
    from edgesplit.models.weights_io import sha256_file

    from .dataplane import DataPlane
    from .grpc_server import start_health_server, start_node_server
    from .metrics import NodeMetrics

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_weights:
        model, sha = build_model(args.model).eval(), ""
    else:
        model = load_trained(args.model, args.weights)
        from edgesplit.models import WEIGHTS_DIR

        sha = sha256_file(args.weights or WEIGHTS_DIR / f"{args.model}.safetensors")
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    plane = DataPlane(model, metrics, max_inflight=args.max_inflight, max_batch=args.max_batch, workers=args.workers)
    security = security or load_security(args)
    node = await start_node_server(
        plane, args.host, args.port, node_name=args.name, weights_sha256=sha,
        credentials=security.credentials, token=security.token,
    )
    health_server, health_port = None, -1
    if args.health_port >= 0:
        health_server, health_port = await start_health_server(node.health, args.health_host, args.health_port)
    metrics_port = -1
    http = None
    if args.metrics_port >= 0:
        tls = {}
        if args.metrics_tls:
            tls = {"certfile": args.tls_cert, "keyfile": args.tls_key,
                   "client_cafile": args.tls_ca, "client_auth_required": bool(args.tls_ca)}
        http, _ = start_http_server(args.metrics_port, args.metrics_host, registry, **tls)
        metrics_port = http.server_port
    auth = "bearer token required" if security.token else "no token"
    log.info("serving %s on %s:%d (%s, %s; metrics %s:%d; health port %d)", model.name, args.host, node.port,
             security.mode, auth, args.metrics_host, metrics_port, health_port)
    print(
        f"edge-node: serving {model.name} on {args.host}:{node.port} ({security.mode}, {auth}), "
        f"metrics on port {metrics_port}",
        flush=True,
    )
    if args.port_file:
        tmp = Path(args.port_file).with_suffix(".tmp")
        info = {"port": node.port, "metrics_port": metrics_port, "health_port": health_port, "pid": os.getpid()}
        tmp.write_text(json.dumps(info))
        tmp.replace(args.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"edge-node: draining {plane.inflight} in-flight requests", flush=True)
    await node.stop(args.grace)
    if health_server:
        await health_server.stop(0)
    plane.close()
    if http:
        http.shutdown()
    print("edge-node: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        security = load_security(args)  # before loading the model: a bad flag fails at once
        return asyncio.run(serve(args, security))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"edge-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
