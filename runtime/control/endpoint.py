"""Checks of ZeroMQ endpoint strings given on a command line, before anything binds.

ZeroMQ takes a TCP port modulo 65536 (``tcp://127.0.0.1:99999`` binds 34463) and reports
other mistakes only when a socket binds or connects, so a flag is checked here first.

    >>> check_endpoint("tcp://127.0.0.1:5555", "--telemetry")
    'tcp://127.0.0.1:5555'
"""

from __future__ import annotations

import re

_TCP = re.compile(r"tcp://(?P<host>\[[^\]\s]+\]|[^:\s/]+):(?P<port>\*|\d{1,5})")
_OTHER = re.compile(r"(ipc|inproc)://\S+")


def check_endpoint(endpoint: str, flag: str, bind: bool = False) -> str:
    """``endpoint`` if it is ``tcp://HOST:PORT`` (PORT 1..65535, or ``*`` when binding),
    ``ipc://PATH`` or ``inproc://NAME``; else ValueError naming ``flag``."""
    tcp = _TCP.fullmatch(endpoint) if isinstance(endpoint, str) else None
    if tcp:
        port = tcp.group("port")
        if port == "*" and bind or port != "*" and 1 <= int(port) <= 65535:
            return endpoint
        allowed = "1..65535" + (" or *" if bind else "")
        raise ValueError(f"{flag}: port {port} of {endpoint!r} must be {allowed}")
    if isinstance(endpoint, str) and _OTHER.fullmatch(endpoint):
        return endpoint
    raise ValueError(f"{flag} must be a ZeroMQ endpoint like tcp://10.0.0.1:5555, not {endpoint!r:.200}")
