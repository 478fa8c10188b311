"""Link impairments inside a namespace: ``tbf`` rate limits and nftables random drops.

Bandwidth is shaped with the kernel's token bucket filter on an interface's egress (root
qdisc); loss is an ``inet`` nftables table whose rules drop ``numgen random mod 1000 < N``
of the packets through one interface.

Example::

    shape("es42-device", "eth0", rate_mbit=20)        # device -> bridge at 20 Mbit/s
    drop("es42-device", "eth0", percent=5)            # 5 % of packets in and out of eth0
    undrop("es42-device"); unshape("es42-device", "eth0")

The pieces that need no root::

    >>> default_burst(8), default_burst(1000)          # bytes
    (32768, 500000)
    >>> print(drop_ruleset("eth0", 2.5, ("output",)), end="")
    table inet edgesplit_testbed {}
    delete table inet edgesplit_testbed
    table inet edgesplit_testbed {
      chain output {
        type filter hook output priority 0; policy accept;
        oifname "eth0" numgen random mod 1000 < 25 drop
      }
    }
"""

from __future__ import annotations

from .commands import require_tool, run_command
from .errors import TestbedError
from .netns import exec_prefix

NFT_TABLE = "edgesplit_testbed"
DEFAULT_LATENCY_S = 0.05  # how long a packet may wait in the tbf queue before it is dropped
MIN_BURST_BYTES = 32 * 1024


def default_burst(rate_mbit: float) -> int:
    """Bucket size: 4 ms at full rate, at least 32 KiB (well above one GSO super-packet's MTU share)."""
    return max(MIN_BURST_BYTES, int(rate_mbit * 1e6 / 8 * 0.004))


MAX_RATE_MBIT = 100_000.0  # 100 Gbit/s: beyond any link the bed emulates
MAX_BURST_BYTES = 1 << 30
MAX_LATENCY_S = 60.0


def _number(value, what: str, low: float, high: float, exclusive_low: bool = False) -> float:
    """``value`` as a float within low..high (a bool or non-number, NaN or infinity: ValueError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, not {value!r}")
    if not (low < value if exclusive_low else low <= value) or not value <= high:
        bound = f"above {low:g}" if exclusive_low else f"at least {low:g}"
        raise ValueError(f"{what} must be {bound} and at most {high:g}, not {value!r}")
    return float(value)


def _size(value: int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"burst must be a whole number of bytes (or a tc size such as '64kb'), not {value!r}")
    return f"{int(_number(value, 'burst', 1, MAX_BURST_BYTES))}b"


def _duration(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return f"{max(1, round(_number(value, 'latency', 0, MAX_LATENCY_S, exclusive_low=True) * 1e6))}us"


def shape(
    ns: str, dev: str, rate_mbit: float, burst: int | str | None = None, latency: float | str = DEFAULT_LATENCY_S
) -> None:
    """Limit ``dev``'s egress in ``ns`` to ``rate_mbit`` with tbf (replacing any root qdisc).

    ``burst`` is the bucket in bytes (or a tc size string such as ``"64kb"``); ``latency`` is
    the longest queueing delay in seconds (or a tc time string) before tbf drops.
    """
    if isinstance(rate_mbit, (int, float)) and not isinstance(rate_mbit, bool) and rate_mbit == 0:
        raise ValueError("rate_mbit must be positive, not 0; use unshape() to remove a limit")
    rate_mbit = _number(rate_mbit, "rate_mbit", 0.001, MAX_RATE_MBIT)  # tc's unit is 1 kbit/s
    burst_arg, latency_arg = _size(default_burst(rate_mbit) if burst is None else burst), _duration(latency)
    require_tool("tc", "iproute2")
    rate = f"{round(rate_mbit * 1000)}kbit"
    run_command(
        ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
         "burst", burst_arg, "latency", latency_arg]
    )


def unshape(ns: str, dev: str) -> None:
    """Remove the root qdisc of ``dev`` in ``ns`` (back to the default); no error if none is set."""
    require_tool("tc", "iproute2")
    done = run_command(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
    if done.returncode != 0 and "No such file" not in done.stderr and "Cannot delete qdisc with handle of zero" \
            not in done.stderr:
        raise TestbedError(f"tc qdisc del dev {dev} in {ns} failed: {done.stderr.strip()}")


def qdisc(ns: str, dev: str) -> str:
    """``tc -s qdisc show dev`` output (kind, parameters and counters) for ``dev`` in ``ns``."""
    require_tool("tc", "iproute2")
    return run_command(["tc", "-n", ns, "-s", "qdisc", "show", "dev", dev]).stdout


def drop_ruleset(dev: str, percent: float, directions: tuple[str, ...] = ("input", "output")) -> str:
    """The nftables script that (re)creates the drop table for ``dev``."""
    threshold = round(percent * 10)
    chance = "" if threshold >= 1000 else f"numgen random mod 1000 < {threshold} "  # mod 1000 stops at 999
    lines = [f"table inet {NFT_TABLE} {{}}", f"delete table inet {NFT_TABLE}", f"table inet {NFT_TABLE} {{"]
    for hook in directions:
        match = "iifname" if hook == "input" else "oifname"
        lines += [
            f"  chain {hook} {{",
            f"    type filter hook {hook} priority 0; policy accept;",
            f'    {match} "{dev}" {chance}drop',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def drop(ns: str, dev: str, percent: float, direction: str = "both") -> None:
    """Drop ``percent`` % of the packets through ``dev`` at random (0.1 % steps), with nftables in ``ns``.

    ``direction`` is ``"both"`` (each packet in either direction is dropped with that
    probability), ``"egress"`` (leaving the host) or ``"ingress"`` (arriving).
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent must be within 0..100, not {percent!r}")
    hooks = {"both": ("input", "output"), "egress": ("output",), "ingress": ("input",)}
    if direction not in hooks:
        raise ValueError(f"direction must be one of {sorted(hooks)}, not {direction!r}")
    require_tool("nft", "nftables")
    run_command([*exec_prefix(ns), "nft", "-f", "-"], input=drop_ruleset(dev, percent, hooks[direction]))


def undrop(ns: str) -> bool:
    """Remove the drop table from ``ns``; False if there was none."""
    require_tool("nft", "nftables")
    done = run_command([*exec_prefix(ns), "nft", "delete", "table", "inet", NFT_TABLE], check=False)
    return done.returncode == 0


def drop_rules(ns: str) -> str:
    """The drop table as nft lists it, or "" when none is installed."""
    require_tool("nft", "nftables")
    done = run_command([*exec_prefix(ns), "nft", "list", "table", "inet", NFT_TABLE], check=False)
    return done.stdout if done.returncode == 0 else ""
