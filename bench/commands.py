"""The line protocol between a benchmark and the process it runs inside the test bed.

The child prints one JSON ``hello`` line when it is ready, then answers each JSON command
on stdin (``{"op": NAME, ...}``) with one JSON line, until ``{"op": "quit"}`` or the end of
input. An unknown op is answered with ``{"error": ...}``; the parent side is
:class:`edgesplit.bench.split.DeviceProcess`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping


def answer_commands(hello: dict, handlers: Mapping[str, Callable[[dict], dict]]) -> int:
    """Print ``hello``, then answer every command with its handler; 0 when told to quit."""
    print(json.dumps({"ready": True, **hello}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        handler = handlers.get(op)
        answer = handler(command) if handler else {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)
    return 0
