"""Run the system tools the test bed needs (``ip``, ``tc``, ``nft``) and check they are there.

Every command is an argv list (never a shell string), runs with a timeout, and a failure
raises :class:`TestbedError` with the command and its stderr.

Example::

    check_available()                              # raises TestbedUnavailable if not root
    run_command(["ip", "netns", "list"]).stdout
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

from .errors import TestbedError, TestbedUnavailable

DEFAULT_TIMEOUT_S = 30.0


def run_command(
    argv: Sequence[str], *, check: bool = True, timeout: float = DEFAULT_TIMEOUT_S, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion, capturing text output; raise TestbedError if ``check`` and it fails."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise TestbedUnavailable(f"{argv[0]!r} is not installed; install iproute2 and nftables") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"{' '.join(argv)} did not finish in {timeout} s") from None
    if check and done.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def require_tool(name: str, package: str) -> str:
    """The path of tool ``name``, or TestbedUnavailable saying which package provides it."""
    path = shutil.which(name)
    if path is None:
        raise TestbedUnavailable(f"{name!r} is not on PATH; install the {package} package")
    return path


def unavailable_reason() -> str | None:
    """Why the test bed cannot run here (not root, no ``ip netns``), or None when it can."""
    if os.geteuid() != 0:
        return "the test bed needs root (network namespaces, tc, nftables, cgroups); run it with sudo"
    if shutil.which("ip") is None:
        return "'ip' is not on PATH; install the iproute2 package"
    try:
        done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'ip netns list' failed: {exc}"
    if done.returncode != 0:
        return f"'ip netns' does not work here: {done.stderr.strip()}"
    return None


def check_available() -> None:
    """Raise :class:`TestbedUnavailable` with the reason when the test bed cannot run here."""
    reason = unavailable_reason()
    if reason:
        raise TestbedUnavailable(reason)
