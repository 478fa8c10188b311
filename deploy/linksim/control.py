"""The emulator's HTTP/JSON control endpoint: read and change the settings of a running link
emulator, or stop its schedule, from another process.

- ``GET /settings``: settings and counters (:meth:`LinkEmulator.stats`);
- ``PUT`` or ``POST /settings`` with a JSON object of settings: change them, answer as GET;
- ``DELETE /schedule``: stop the schedule or trace (the settings in force stay).

Errors answer 400, 404 or 405 with ``{"error": "..."}``. One request per connection.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .emulator import LinkEmulator

__all__ = ["handle"]

MAX_BODY = 65536
REQUEST_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def handle(emu: LinkEmulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one HTTP request on ``reader``/``writer`` about ``emu``, then close."""
    try:
        try:
            status, payload = await asyncio.wait_for(_request(emu, reader), REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            status, payload = 400, {"error": f"bad request: {e}"}
        body = (json.dumps(payload) + "\n").encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        )
        if status == 405:
            head += "Allow: GET, PUT, POST, DELETE\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _request(emu: LinkEmulator, reader: asyncio.StreamReader) -> tuple[int, dict]:
    line = (await reader.readline()).decode("latin-1").strip()
    parts = line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line: {line!r}")
    method, target = parts[0].upper(), parts[1]
    length = 0
    while True:
        header = (await reader.readline()).decode("latin-1")
        if header in ("\r\n", "\n", ""):
            break
        name, _, value = header.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
            if not 0 <= length <= MAX_BODY:
                raise ValueError("body too large")
    body = await reader.readexactly(length) if length else b""
    path = target.split("?", 1)[0].rstrip("/") or "/"
    if path == "/settings":
        if method == "GET":
            return 200, emu.stats()
        if method in ("PUT", "POST"):
            try:
                fields = json.loads(body or b"{}")
            except json.JSONDecodeError as e:
                return 400, {"error": f"body is not JSON: {e}"}
            except RecursionError:
                return 400, {"error": "body is JSON nested too deeply"}
            if not isinstance(fields, dict):
                return 400, {"error": "body must be a JSON object of settings"}
            try:
                emu.update(**fields)
            except (ValueError, TypeError) as e:
                return 400, {"error": str(e)}
            await emu.wait_settled()
            return 200, emu.stats()
        return 405, {"error": f"{method} not allowed on /settings; use GET, PUT or POST"}
    if path == "/schedule":
        if method == "DELETE":
            emu.clear_schedule()
            return 200, emu.stats()
        return 405, {"error": "only DELETE /schedule (stop the schedule or trace)"}
    return 404, {"error": f"no {path}; try GET /settings, PUT /settings, DELETE /schedule"}
