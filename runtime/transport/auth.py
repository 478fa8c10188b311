"""Bearer-token check for a node's gRPC services.

:class:`TokenAuthInterceptor` is a ``grpc.aio`` server interceptor: when a token is
configured, every call must carry the metadata ``authorization: Bearer <token>`` or it is
answered UNAUTHENTICATED before any handler runs and before its request is parsed. The
comparison is constant-time (:func:`hmac.compare_digest`). The standard health service
(``/grpc.health.v1.Health/``) stays open so that orchestrators and load balancers can
probe a node without holding the secret; it tells nothing but SERVING or NOT_SERVING.

The token is a shared secret, not an identity: combine it with TLS (see
:mod:`edgesplit.runtime.transport.tls`), or anyone on the path can read it.

Example::

    server = await start_node_server(plane, token=read_token("/etc/edgesplit/token"))
    client = EdgeClient("127.0.0.1:8001", token="s3cret")
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

TOKEN_ENV = "EDGESPLIT_TOKEN"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_REFUSED = "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"

log = logging.getLogger("edgesplit.auth")


def bearer_token(metadata: Iterable | None) -> str | None:
    """The token of the first ``authorization: Bearer ...`` entry in call metadata, else None.

    >>> bearer_token([("authorization", "Bearer abc")])
    'abc'
    >>> bearer_token([("authorization", "Basic abc")]) is None
    True
    """
    for item in metadata or ():
        key, value = item
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, credential = value.strip().partition(" ")
        return credential.strip() if scheme.lower() == "bearer" else None
    return None


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def read_token(path: str | os.PathLike | None = None, env: dict | None = None) -> str | None:
    """The node's token: the first line of ``path`` if given, else ``$EDGESPLIT_TOKEN``, else None.

    An empty file or variable is an error rather than "no token", so a misconfigured node
    never silently runs open.
    """
    env = os.environ if env is None else env
    if path is not None:
        try:
            if not Path(path).is_file():  # a directory, a FIFO that would block, /dev/zero
                if not Path(path).exists():
                    raise FileNotFoundError(f"token file {path} not found")
                raise ValueError(f"token file {path} is not a regular file")
            with open(path, encoding="utf-8") as f:
                text = f.read(64 * 1024)  # a token is one short line
        except UnicodeDecodeError:
            raise ValueError(f"token file {path} is not text") from None
        except PermissionError:
            raise ValueError(f"token file {path} cannot be read (permission denied)") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise ValueError(f"token file {path} is empty; put the token on its first line")
        mode = Path(path).stat().st_mode
        if mode & 0o077:
            log.warning("token file %s is readable by group or others (mode %o); chmod 600 it", path, mode & 0o777)
        return token
    if TOKEN_ENV in env:
        token = env[TOKEN_ENV].strip()
        if not token:
            raise ValueError(f"${TOKEN_ENV} is set but empty; unset it or give a token")
        return token
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED); health stays open."""

    def __init__(self, token: str, open_prefixes: tuple[str, ...] = OPEN_PREFIXES) -> None:
        if not token:
            raise ValueError("the token is empty; give a non-empty token or no interceptor")
        self._token = token
        self.open_prefixes = tuple(open_prefixes)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self.open_prefixes):
            return await continuation(handler_call_details)
        if token_matches(bearer_token(handler_call_details.invocation_metadata), self._token):
            return await continuation(handler_call_details)
        return _refusal(await continuation(handler_call_details))


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that answers UNAUTHENTICATED.

    It has no request deserializer: the refused request's bytes are never parsed.
    """

    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSED)

    request_streaming = bool(handler and handler.request_streaming)
    response_streaming = bool(handler and handler.response_streaming)
    if request_streaming and response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
