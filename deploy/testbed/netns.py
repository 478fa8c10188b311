"""Network namespace primitives: create and delete namespaces, veth pairs, a bridge, links.

Each function is one ``ip`` invocation (or a few); nothing here is created in the root
namespace: a veth pair is created inside the bridge's namespace with its peer placed
directly into the host's namespace.

Example::

    add_namespace("es42-bridge"); add_namespace("es42-device")
    add_bridge("es42-bridge", "br0")
    add_port("es42-bridge", "br0", "v-device", "es42-device", "eth0", "198.18.0.1/24")
    delete_namespace("es42-device"); delete_namespace("es42-bridge")
"""

from __future__ import annotations

import os
import signal
import time

from .commands import run_command


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = run_command(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_namespace(name: str) -> None:
    """Create namespace ``name`` and bring its loopback up."""
    run_command(["ip", "netns", "add", name])
    run_command(["ip", "-n", name, "link", "set", "lo", "up"])


def exec_prefix(name: str) -> list[str]:
    """The argv prefix that runs a command inside namespace ``name``."""
    return ["ip", "netns", "exec", name]


def namespace_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (empty if the namespace is gone)."""
    done = run_command(["ip", "netns", "pids", name], check=False)
    return [int(tok) for tok in done.stdout.split() if tok.isdigit()] if done.returncode == 0 else []


def kill_namespace_processes(name: str, grace_s: float = 2.0) -> None:
    """SIGTERM every process inside namespace ``name``, then SIGKILL what is left after ``grace_s``."""
    pids = [p for p in namespace_pids(name) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2.0)
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone for our purpose
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def delete_namespace(name: str) -> bool:
    """Delete namespace ``name`` (its interfaces go with it); False if it did not exist."""
    if name not in list_namespaces():
        return False
    run_command(["ip", "netns", "delete", name])
    return True


def add_bridge(ns: str, bridge: str) -> None:
    """Create Linux bridge ``bridge`` (STP off, so ports forward at once) inside ``ns`` and bring it up."""
    run_command(["ip", "-n", ns, "link", "add", bridge, "type", "bridge", "stp_state", "0"])
    run_command(["ip", "-n", ns, "link", "set", bridge, "up"])


def add_port(bridge_ns: str, bridge: str, port: str, host_ns: str, dev: str, cidr: str) -> None:
    """Join ``host_ns`` to the bridge: a veth pair ``port`` (bridge side) / ``dev`` (host side, address ``cidr``)."""
    run_command(["ip", "-n", bridge_ns, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", host_ns])
    run_command(["ip", "-n", bridge_ns, "link", "set", port, "master", bridge, "up"])
    run_command(["ip", "-n", host_ns, "addr", "add", cidr, "dev", dev])
    run_command(["ip", "-n", host_ns, "link", "set", dev, "up"])


def set_link(ns: str, dev: str, up: bool) -> None:
    """``ip link set dev up|down`` inside ``ns``."""
    run_command(["ip", "-n", ns, "link", "set", dev, "up" if up else "down"])


def link_is_up(ns: str, dev: str) -> bool:
    """Whether ``dev`` inside ``ns`` is administratively up."""
    out = run_command(["ip", "-n", ns, "-o", "link", "show", "dev", dev]).stdout
    flags = out.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in out else []
    return "UP" in flags
