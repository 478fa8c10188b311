"""Command line for the test bed: ``python -m edgesplit.testbed up|down|status|shape|link|drop|cpu|exec|clean|pi4``.

A bed made with ``up`` outlives the command (it is *detached*) and is operated by name
until ``down`` removes it.

Example::

    # python -m edgesplit.testbed up --name lab
    lab: device=198.18.0.1 (netns lab-device) ...
    # python -m edgesplit.testbed shape lab device 20
    # python -m edgesplit.testbed exec lab edge1 -- edge-node --host 198.18.0.11 --port 8001 &
    # python -m edgesplit.testbed link lab device down
    # python -m edgesplit.testbed down lab
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import netns
from .bed import DEFAULT_BASE, DEFAULT_HOSTS, Testbed, cleanup_stale, remove
from .errors import TestbedError, TestbedUnavailable
from .pi4 import PI4_CPU_FRACTION, PI4_ONE_CORE_SCALING, PI4_REFERENCE_SECONDS, measure_host_seconds
from .state import all_states, pid_alive


def _host_pair(text: str) -> tuple[str, str]:
    host, sep, addr = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected HOST=ADDRESS, e.g. edge3=198.18.0.13, not {text!r}")
    return host, addr


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgesplit.testbed", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="create a bed that stays until 'down'")
    up.add_argument("--name", help=f"bed name (default: {DEFAULT_BASE}<pid>); namespaces are NAME-HOST")
    up.add_argument("--host", action="append", type=_host_pair, metavar="HOST=ADDR",
                    help=f"hosts instead of the default {DEFAULT_HOSTS} (repeat)")
    up.add_argument("--json", action="store_true", help="print the bed as JSON")

    down = sub.add_parser("down", help="remove beds, their processes, namespaces and cgroups")
    down.add_argument("names", nargs="*", help="bed names")
    down.add_argument("--all", action="store_true", help="every bed with a state file, detached ones included")

    status = sub.add_parser("status", help="list beds, or show one")
    status.add_argument("name", nargs="?")
    status.add_argument("--json", action="store_true")

    shape = sub.add_parser("shape", help="limit a host's bandwidth with tbf (or --off)")
    shape.add_argument("name")
    shape.add_argument("host")
    shape.add_argument("rate_mbit", nargs="?", type=float, help="Mbit/s")
    shape.add_argument("--burst", help="bucket: bytes or a tc size such as 64kb (default: 4 ms of rate)")
    shape.add_argument("--latency", default="50ms", help="longest queueing delay, a tc time (default: 50ms)")
    shape.add_argument("--direction", choices=("both", "egress", "ingress"), default="both")
    shape.add_argument("--off", action="store_true", help="remove the limit")

    link = sub.add_parser("link", help="set a host's link up or down")
    link.add_argument("name")
    link.add_argument("host")
    link.add_argument("state", choices=("up", "down"))
    link.add_argument("--side", choices=("both", "host", "bridge"), default="both")

    drop = sub.add_parser("drop", help="drop a percentage of a host's packets at random (0 removes)")
    drop.add_argument("name")
    drop.add_argument("host")
    drop.add_argument("percent", type=float)
    drop.add_argument("--direction", choices=("both", "egress", "ingress"), default="both")

    cpu = sub.add_parser("cpu", help="put a process under a CPU quota (removed with the bed)")
    cpu.add_argument("name")
    cpu.add_argument("pid", type=int)
    cpu.add_argument("fraction", nargs="?", type=float, default=PI4_CPU_FRACTION,
                     help=f"of one core (default: a Raspberry Pi 4, {PI4_CPU_FRACTION})")

    ex = sub.add_parser("exec", help="run a command inside a host's namespace: exec NAME HOST -- CMD ...")
    ex.add_argument("name")
    ex.add_argument("host")
    ex.add_argument("argv", nargs=argparse.REMAINDER)

    clean = sub.add_parser("clean", help="remove leftovers of crashed runs (owner process gone)")
    clean.add_argument("--prefix", default=DEFAULT_BASE)
    clean.add_argument("--detached", action="store_true", help="also beds made by 'up'")

    sub.add_parser("pi4", help="measure the CPU fraction that makes this machine as fast as a Raspberry Pi 4")
    return p


def _describe(bed: Testbed) -> str:
    hosts = " ".join(f"{h}={a} (netns {bed.netns(h)})" for h, a in bed.hosts.items())
    return f"{bed.name}: {hosts}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except TestbedUnavailable as exc:
        print(f"test bed unavailable: {exc}", file=sys.stderr)
        return 2
    except (TestbedError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "up":
        bed = Testbed(dict(args.host) if args.host else None, name=args.name, detached=True).up()
        print(json.dumps(bed.status(), indent=1) if args.json else _describe(bed))
        return 0
    if cmd == "down":
        names = [s.name for s in all_states()] if args.all else args.names
        if not names:
            print("name a bed (see 'status') or pass --all", file=sys.stderr)
            return 1
        missing = [n for n in names if not remove(n)]
        for n in missing:
            print(f"no test bed named {n!r}", file=sys.stderr)
        return 1 if missing else 0
    if cmd == "status":
        return _status(args)
    if cmd == "clean":
        removed = cleanup_stale(args.prefix, include_detached=args.detached)
        print("removed: " + (" ".join(removed) if removed else "nothing"))
        return 0
    if cmd == "pi4":
        seconds = measure_host_seconds()
        print(f"ResNet-18 224x224, one thread, here: {seconds * 1e3:.1f} ms CPU")
        print(f"whole Pi 4 ({PI4_REFERENCE_SECONDS * 1e3:.1f} ms): fraction {seconds / PI4_REFERENCE_SECONDS:.2f}")
        one_core = PI4_REFERENCE_SECONDS * PI4_ONE_CORE_SCALING
        print(f"one Pi 4 core (~{one_core * 1e3:.0f} ms, estimate): fraction {seconds / one_core:.2f}")
        return 0

    bed = Testbed.attach(args.name)
    if cmd == "shape":
        if args.off:
            bed.unshape(args.host, args.direction)
        elif args.rate_mbit is None:
            print("give a rate in Mbit/s, or --off", file=sys.stderr)
            return 1
        else:
            burst = int(args.burst) if args.burst and args.burst.isdigit() else args.burst
            bed.shape(args.host, args.rate_mbit, burst=burst, latency=args.latency, direction=args.direction)
    elif cmd == "link":
        (bed.link_up if args.state == "up" else bed.link_down)(args.host, side=args.side)
    elif cmd == "drop":
        if args.percent == 0:
            bed.undrop(args.host)
        else:
            bed.drop(args.host, args.percent, args.direction)
    elif cmd == "cpu":
        quota = bed.cpu_quota(args.pid, args.fraction)
        print(quota.path)
    elif cmd == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            print("give a command: exec NAME HOST -- CMD ...", file=sys.stderr)
            return 1
        full = [*bed.exec_prefix(args.host), *argv]
        os.execvp(full[0], full)
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.name:
        info = Testbed.attach(args.name).status()
        if args.json:
            print(json.dumps(info, indent=1))
            return 0
        print(f"{info['name']}: owner pid {info['owner_pid']}{' (detached)' if info['detached'] else ''}")
        for host, h in info["hosts"].items():
            flags = []
            if h.get("exists"):
                flags.append("link up" if h.get("link_up") else "LINK DOWN")
                shaped = [d for d, on in h.get("shaped", {}).items() if on]
                if shaped:
                    flags.append("tbf " + "+".join(shaped))
                if h.get("drop"):
                    flags.append("drops")
            else:
                flags.append("MISSING")
            print(f"  {host:<12} {h['address']:<15} {h['netns']:<24} {', '.join(flags)}")
        for path in info["cgroups"]:
            print(f"  cgroup {path}")
        return 0
    states = all_states()
    known = {s.name for s in states}
    rows = [{"name": s.name, "owner_pid": s.owner_pid, "detached": s.detached,
             "owner_alive": s.detached or pid_alive(s.owner_pid, s.owner_start), "hosts": s.hosts} for s in states]
    orphans = sorted({ns.rsplit("-", 1)[0] for ns in netns.list_namespaces() if ns.endswith("-bridge")} - known)
    if args.json:
        print(json.dumps({"beds": rows, "without_state": orphans}, indent=1))
        return 0
    if not rows and not orphans:
        print("no test beds")
    for r in rows:
        kind = "detached" if r["detached"] else f"owner {r['owner_pid']}" + ("" if r["owner_alive"] else " (gone)")
        print(f"{r['name']}: {kind}: " + " ".join(f"{h}={a}" for h, a in r["hosts"].items()))
    for name in orphans:
        print(f"{name}: namespaces without a state file; remove with: down {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
