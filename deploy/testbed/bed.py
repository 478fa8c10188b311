"""The emulated cluster: device, edge nodes and controller in network namespaces on one bridge.

Each host gets its own namespace with loopback up and one interface, ``eth0``, with an
address from the benchmarking range 198.18.0.0/15. ``eth0`` is one end of a veth pair
whose other end (``v-<host>``) is a port of bridge ``br0``, which lives in a namespace of
its own, so nothing is added to the root namespace. Hosts have no default route: traffic
can only go to the other hosts or to their own loopback.

Every bed has a unique name (``es<pid>`` by default, ``es<pid>n<k>`` for further beds of
the same process), and everything it makes is named after it: namespaces
``<name>-<host>`` and ``<name>-bridge``, cgroups ``<name>-cpu<k>``. A bed is torn down
when its ``with`` block ends (exceptions and Ctrl-C included), at interpreter exit and on
SIGTERM; :func:`cleanup_stale` removes what crashed runs (SIGKILL, power loss of the
process) left behind.

Example::

    with Testbed() as bed:                                  # needs root
        bed.shape("device", rate_mbit=20)                   # tbf both ways
        server = bed.exec("edge1", ["python3", "-m", "http.server", "8000"])
        bed.run("device", ["python3", "-c", "import urllib.request as u; "
                           "print(u.urlopen('http://198.18.0.11:8000', timeout=5).status)"])
        bed.link_down("device")                             # cable cut
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import netns, shaping, state
from .cgroups import DEFAULT_PERIOD_US, CpuQuota, list_cgroups, remove_cgroup
from .commands import check_available
from .errors import TestbedError

log = logging.getLogger("edgesplit.testbed")

DEFAULT_HOSTS: dict[str, str] = {
    "device": "198.18.0.1",
    "edge1": "198.18.0.11",
    "edge2": "198.18.0.12",
    "controller": "198.18.0.20",
}
BENCHMARK_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544: never routed on the Internet
HOST_DEV = "eth0"
BRIDGE = "br0"
BRIDGE_HOST = "bridge"
DEFAULT_BASE = "es"

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_BASE_RE = re.compile(r"[A-Za-z][A-Za-z_]{0,7}")
_HOST_RE = re.compile(r"[a-z][a-z0-9]{0,12}")  # the bridge port "v-<host>" must fit IFNAMSIZ (15)


def _owned_pattern(base: str) -> re.Pattern[str]:
    """Bed names made by :class:`Testbed` for a process: ``<base><pid>`` or ``<base><pid>n<k>``."""
    return re.compile(rf"({re.escape(base)}(\d+)(?:n\d+)?)(?:-|$)")


class Testbed:
    """An emulated multi-host network on this machine; use it as a context manager."""

    __test__ = False  # not a pytest test class, whatever its name
    _counter = 0
    _counter_lock = threading.Lock()

    def __init__(
        self,
        hosts: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        base: str = DEFAULT_BASE,
        prefix_len: int = 24,
        detached: bool = False,
        clean_stale: bool = True,
        state_dir: str | Path | None = None,
    ) -> None:
        self.hosts: dict[str, str] = dict(DEFAULT_HOSTS if hosts is None else hosts)
        self._check_hosts(self.hosts, prefix_len)
        if name is not None and not _NAME_RE.fullmatch(name):
            raise ValueError(f"bed name {name!r} must be a letter then up to 31 letters, digits or '_'")
        if not isinstance(base, str) or not _BASE_RE.fullmatch(base):
            # a digit would blur where the pid starts in "<base><pid>"; a space hid namespaces from down()
            raise ValueError(f"base {base!r} must be 1 to 8 letters or '_', starting with a letter")
        self.base = base
        self.prefix_len = prefix_len
        self.detached = detached
        self.clean_stale = clean_stale
        self.state_dir = state_dir
        self.name = name  # chosen in up() when None
        self._up = False
        self._procs: list[subprocess.Popen] = []
        self._cgroups: list[CpuQuota] = []
        self._state: state.BedState | None = None

    # ----------------------------------------------------------------- life cycle
    @staticmethod
    def _check_hosts(hosts: Mapping[str, str], prefix_len: int) -> None:
        if not hosts:
            raise ValueError("a test bed needs at least one host")
        nets = set()
        for host, addr in hosts.items():
            if not _HOST_RE.fullmatch(host) or host == BRIDGE_HOST:
                raise ValueError(f"host name {host!r} must be 1-13 lowercase letters/digits (not {BRIDGE_HOST!r})")
            ip = ipaddress.ip_address(addr)
            if ip not in BENCHMARK_NET:
                raise ValueError(f"{host}: {addr} is outside the benchmarking range {BENCHMARK_NET}; use 198.18.x.y")
            nets.add(ipaddress.ip_interface(f"{addr}/{prefix_len}").network)
        if len(nets) != 1 or len(set(hosts.values())) != len(hosts):
            raise ValueError(f"host addresses must be distinct and share one /{prefix_len} subnet: {dict(hosts)}")

    def _choose_name(self) -> str:
        taken = set(netns.list_namespaces())
        while True:
            with Testbed._counter_lock:
                k = Testbed._counter
                Testbed._counter += 1
            # A detached bed outlives this process: "<base>d<pid>" keeps it out of the
            # "<base><pid>" pattern that stale cleanup reads as "owned by that process".
            name = f"{self.base}{'d' if self.detached else ''}{os.getpid()}" + (f"n{k}" if k else "")
            if f"{name}-{BRIDGE_HOST}" not in taken and state.load(name, self.state_dir) is None:
                return name

    def up(self) -> Testbed:
        """Create namespaces, bridge, veth pairs and addresses; on any failure undo what was made."""
        if self._up:
            raise TestbedError(f"test bed {self.name} is already up")
        check_available()
        if self.clean_stale:
            cleanup_stale(self.base, state_dir=self.state_dir)
        if self.name is None:
            self.name = self._choose_name()
        bridge_ns = self.netns(BRIDGE_HOST)
        exists = TestbedError(f"a test bed named {self.name} exists; remove it: python -m edgesplit.testbed down "
                              f"{self.name}")
        if bridge_ns in netns.list_namespaces():
            raise exists
        try:  # the claim: of two processes making the same name, only one creates this namespace
            netns.add_namespace(bridge_ns)
        except TestbedError:
            if bridge_ns in netns.list_namespaces():
                raise exists from None  # another process won: nothing of its bed is touched
            raise
        me = os.getpid()
        self._state = state.BedState(self.name, self.hosts, me, state.process_start_time(me), self.detached,
                                     self.prefix_len)
        self._up = True
        try:
            state.save(self._state, self.state_dir)  # right after the claim: a crash later is found and cleaned
            if not self.detached:
                _register(self)
            netns.add_bridge(bridge_ns, BRIDGE)
            for host, addr in self.hosts.items():
                netns.add_namespace(self.netns(host))
                netns.add_port(bridge_ns, BRIDGE, self._port(host), self.netns(host), HOST_DEV,
                               f"{addr}/{self.prefix_len}")
        except BaseException:
            self.down()
            raise
        log.info("test bed %s up: %s", self.name, self.hosts)
        return self

    def down(self) -> None:
        """Tear everything down: processes, cgroups, namespaces (with their links, qdiscs, nft tables), state.

        Idempotent; every step runs even if an earlier one failed, and the first error is raised at the end.
        """
        if not self._up:
            return
        errors: list[BaseException] = []
        for proc in self._procs:
            _attempt(errors, _stop_process, proc)
        names = [self.netns(h) for h in self.hosts] + [self.netns(BRIDGE_HOST)]
        for ns in names:
            _attempt(errors, netns.kill_namespace_processes, ns)
        for quota in self._cgroups:
            _attempt(errors, quota.remove)
        recorded = self._state.cgroups if self._state else []
        for path in _bed_cgroups(self.name, recorded):
            _attempt(errors, remove_cgroup, path)
        for ns in names:
            _attempt(errors, netns.delete_namespace, ns)
        if not errors:
            state.delete(self.name, self.state_dir)
            self._up = False
            self._procs.clear()
            self._cgroups.clear()
            _unregister(self)
            log.info("test bed %s down", self.name)
            return
        raise TestbedError(f"tearing down test bed {self.name} failed: {errors[0]}") from errors[0]

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    @classmethod
    def attach(cls, name: str, state_dir: str | Path | None = None) -> Testbed:
        """The running bed ``name`` (made by another process, e.g. the CLI's ``up``); ``down()`` removes it."""
        found = state.load(name, state_dir)
        if found is None:
            raise TestbedError(f"no test bed named {name!r}; list them with: python -m edgesplit.testbed status")
        bed = cls(found.hosts, name=name, prefix_len=found.prefix_len, detached=True, clean_stale=False,
                  state_dir=state_dir)
        bed._state = found
        bed._up = True
        return bed

    @property
    def is_up(self) -> bool:
        return self._up

    # ----------------------------------------------------------------- naming
    def _require(self, host: str) -> None:
        if host not in self.hosts:
            raise TestbedError(f"unknown host {host!r}; this bed has {sorted(self.hosts)}")

    def _need_up(self) -> None:
        if not self._up:
            raise TestbedError("the test bed is not up: use 'with Testbed() as bed:' or call up()")

    @staticmethod
    def _port(host: str) -> str:
        return f"v-{host}"

    def netns(self, host: str) -> str:
        """The namespace name of ``host`` (or of the bridge, ``"bridge"``)."""
        if host != BRIDGE_HOST:
            self._require(host)
        if self.name is None:
            raise TestbedError("the test bed has no name before up()")
        return f"{self.name}-{host}"

    def address(self, host: str) -> str:
        """The IPv4 address of ``host`` (e.g. ``"198.18.0.11"``)."""
        self._require(host)
        return self.hosts[host]

    def exec_prefix(self, host: str) -> list[str]:
        """argv prefix running a command in ``host``'s namespace (e.g. ``NodeProcess(command_prefix=...)``)."""
        return netns.exec_prefix(self.netns(host))

    # ----------------------------------------------------------------- processes
    def exec(
        self, host: str, argv: Sequence[str], *, cpu: float | CpuQuota | None = None, **popen_kwargs
    ) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace; it is killed when the bed goes down.

        ``cpu`` puts it under a CPU quota (a fraction of one core, or a :class:`CpuQuota`)
        before it runs its first instruction. It starts in a new session (its own process
        group) unless ``start_new_session`` says otherwise.
        """
        self._need_up()
        argv = [*self.exec_prefix(host), *argv]
        if cpu is not None:
            quota = cpu if isinstance(cpu, CpuQuota) else self._new_quota(float(cpu))
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(quota.procs_file), *argv]
        popen_kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(argv, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self, host: str, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run a short command inside ``host``'s namespace and return it (text output captured)."""
        self._need_up()
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        done = subprocess.run([*self.exec_prefix(host), *argv], timeout=timeout, check=False, **kwargs)
        if check and done.returncode != 0:
            raise TestbedError(f"{' '.join(argv)} on {host} exited {done.returncode}: {done.stderr or ''}"[-2000:])
        return done

    # ----------------------------------------------------------------- impairments
    def _ends(self, host: str, direction: str) -> list[tuple[str, str]]:
        """(namespace, device) pairs whose egress carries ``direction`` traffic of ``host``."""
        self._need_up()
        out = (self.netns(host), HOST_DEV)  # leaving the host
        into = (self.netns(BRIDGE_HOST), self._port(host))  # leaving the bridge towards the host
        ends = {"both": [out, into], "egress": [out], "ingress": [into]}
        if direction not in ends:
            raise ValueError(f"direction must be 'both', 'egress' (from the host) or 'ingress' (to it), "
                             f"not {direction!r}")
        return ends[direction]

    def shape(
        self,
        host: str,
        rate_mbit: float,
        burst: int | str | None = None,
        latency: float | str = shaping.DEFAULT_LATENCY_S,
        direction: str = "both",
    ) -> None:
        """Limit ``host``'s link to ``rate_mbit`` Mbit/s with tbf.

        ``direction="both"`` shapes the host's ``eth0`` (upload) and the bridge's port
        towards it (download); ``"egress"`` / ``"ingress"`` shape one of them. ``burst`` is
        the bucket in bytes (default: 4 ms at full rate, at least 32 KiB), ``latency`` the
        longest queueing delay in seconds before tbf drops.
        """
        for ns, dev in self._ends(host, direction):
            shaping.shape(ns, dev, rate_mbit, burst=burst, latency=latency)

    def unshape(self, host: str, direction: str = "both") -> None:
        """Remove the rate limits set by :meth:`shape`."""
        for ns, dev in self._ends(host, direction):
            shaping.unshape(ns, dev)

    def qdisc(self, host: str) -> dict[str, str]:
        """``tc -s qdisc`` of the host's ``eth0`` ("egress") and of the bridge port to it ("ingress")."""
        return {d: shaping.qdisc(*self._ends(host, d)[0]) for d in ("egress", "ingress")}

    def link_down(self, host: str, side: str = "both") -> None:
        """Cut ``host``'s link with ``ip link set down``.

        ``side="host"`` downs the host's ``eth0`` (sends fail at once: no route),
        ``"bridge"`` the bridge port (the host keeps its route; packets vanish, calls time
        out), ``"both"`` (default) both ends.
        """
        for ns, dev in self._sides(host, side):
            netns.set_link(ns, dev, up=False)

    def link_up(self, host: str, side: str = "both") -> None:
        """Restore ``host``'s link (the address and its route come back with it)."""
        for ns, dev in self._sides(host, side):
            netns.set_link(ns, dev, up=True)

    def link_is_up(self, host: str) -> bool:
        return all(netns.link_is_up(ns, dev) for ns, dev in self._sides(host, "both"))

    def _sides(self, host: str, side: str) -> list[tuple[str, str]]:
        sides = {"host": "egress", "bridge": "ingress", "both": "both"}
        if side not in sides:
            raise ValueError(f"side must be 'host', 'bridge' or 'both', not {side!r}")
        return self._ends(host, sides[side])

    def drop(self, host: str, percent: float, direction: str = "both") -> None:
        """Drop ``percent`` % of ``host``'s packets at random with nftables in its namespace (loopback is spared)."""
        self._need_up()
        shaping.drop(self.netns(host), HOST_DEV, percent, direction)

    def undrop(self, host: str) -> bool:
        """Remove the random drops of ``host``; False if there were none."""
        self._need_up()
        return shaping.undrop(self.netns(host))

    def drop_rules(self, host: str) -> str:
        """The drop table of ``host`` as nft lists it ("" if none)."""
        self._need_up()
        return shaping.drop_rules(self.netns(host))

    # ----------------------------------------------------------------- CPU
    def _new_quota(self, fraction: float, suffix: str | None = None, period_us: int = DEFAULT_PERIOD_US) -> CpuQuota:
        self._need_up()
        if suffix is None:
            taken = {q.name for q in self._cgroups} | {p.name for p in _bed_cgroups(self.name, [])}
            k = len(self._cgroups)
            while f"{self.name}-cpu{k}" in taken:
                k += 1
            suffix = f"cpu{k}"
        name = f"{self.name}-{suffix}"
        if self._state is not None and name not in self._state.cgroups:
            self._state.cgroups.append(name)  # recorded before it exists, so a crash cannot leak it
            state.save(self._state, self.state_dir)
        quota = CpuQuota.create(name, fraction, period_us)
        self._cgroups.append(quota)
        return quota

    def cpu_quota(self, pid_or_cgroup: int | str | CpuQuota, fraction: float,
                  period_us: int | None = None) -> CpuQuota:
        """Limit a process, or a cgroup, to ``fraction`` of one CPU (cgroup CFS quota).

        A pid is moved into a new cgroup ``<bed>-cpu<k>`` (children it starts later
        inherit it); a name makes (or updates) cgroup ``<bed>-<name>``; an absolute path or
        a :class:`CpuQuota` changes an existing cgroup. Cgroups made here are removed, their
        processes moved back to the parent, when the bed goes down. See
        :data:`edgesplit.testbed.PI4_CPU_FRACTION` for a Raspberry Pi 4. ``period_us`` sets
        the CFS period (default: unchanged, or the kernel's 100 ms for a new cgroup);
        :func:`~edgesplit.testbed.cgroups.smooth_period_us` gives one that slows short work evenly.
        """
        if isinstance(pid_or_cgroup, CpuQuota):
            pid_or_cgroup.set(fraction, period_us)
            return pid_or_cgroup
        if isinstance(pid_or_cgroup, bool) or isinstance(pid_or_cgroup, int) and pid_or_cgroup <= 0:
            # 0 would move this very process under the quota, True is pid 1 (init)
            raise ValueError(f"pid must be a process id (a positive integer), not {pid_or_cgroup!r}")
        if isinstance(pid_or_cgroup, int):
            quota = self._new_quota(fraction, period_us=period_us or DEFAULT_PERIOD_US)
            try:
                quota.add(pid_or_cgroup)
            except BaseException:  # no such process: no empty cgroup left until down()
                self._cgroups.remove(quota)
                quota.remove()
                raise
            return quota
        if pid_or_cgroup.startswith("/"):
            quota = CpuQuota.open(pid_or_cgroup)
            quota.set(fraction, period_us)
            return quota
        suffix = pid_or_cgroup.removeprefix(f"{self.name}-")
        for quota in self._cgroups:
            if quota.name == f"{self.name}-{suffix}":
                quota.set(fraction, period_us)
                return quota
        return self._new_quota(fraction, suffix, period_us or DEFAULT_PERIOD_US)

    # ----------------------------------------------------------------- status
    def status(self) -> dict:
        """What exists of this bed now: namespaces, link states, qdiscs, drop rules, cgroups."""
        existing = set(netns.list_namespaces()) if self.name else set()
        hosts = {}
        for host, addr in self.hosts.items():
            ns = self.netns(host) if self.name else None
            info: dict = {"netns": ns, "address": addr, "exists": ns in existing}
            if info["exists"] and f"{self.name}-{BRIDGE_HOST}" in existing:
                info["link_up"] = self.link_is_up(host)
                info["shaped"] = {d: "tbf" in q for d, q in self.qdisc(host).items()}
                info["drop"] = bool(self.drop_rules(host))
            hosts[host] = info
        owner = self._state.owner_pid if self._state else None
        return {
            "name": self.name,
            "up": self._up,
            "detached": self.detached,
            "owner_pid": owner,
            "bridge_netns": f"{self.name}-{BRIDGE_HOST}" if self.name else None,
            "hosts": hosts,
            "cgroups": [str(p) for p in _bed_cgroups(self.name, self._state.cgroups if self._state else [])]
            if self.name else [],
        }

    def __repr__(self) -> str:
        return f"Testbed(name={self.name!r}, hosts={self.hosts!r}, up={self._up})"


# --------------------------------------------------------------------- helpers
def _attempt(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # keep tearing down; report the first failure at the end
        log.warning("test bed teardown: %s", exc)
        errors.append(exc)


def _stop_process(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the process group of ``proc`` (or the process), then SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _bed_cgroups(name: str, recorded: Sequence[str]) -> list[Path]:
    found = list_cgroups(rf"{re.escape(name)}-cpu\d+$")
    if recorded:
        names = set(recorded)
        found += [p for p in list_cgroups(r".") if p.name in names and p not in found]
    return found


def _remove_by_name(name: str, found: state.BedState | None, state_dir) -> None:
    """Remove bed ``name`` (namespaces, their processes, cgroups, state file) without a Testbed object."""
    if found is not None:
        hosts = {**found.hosts}
        bed = Testbed(hosts, name=name, prefix_len=found.prefix_len, detached=True, clean_stale=False,
                      state_dir=state_dir)
        bed._state, bed._up = found, True
        bed.down()
        return
    pattern = re.compile(rf"{re.escape(name)}-[a-z][a-z0-9]*$")
    names = [ns for ns in netns.list_namespaces() if pattern.match(ns)]
    names.sort(key=lambda ns: ns.endswith(f"-{BRIDGE_HOST}"))  # hosts first, the bridge last
    for ns in names:
        netns.kill_namespace_processes(ns)
    for path in _bed_cgroups(name, []):
        remove_cgroup(path)
    for ns in names:
        netns.delete_namespace(ns)
    state.delete(name, state_dir)


def remove(name: str, state_dir: str | Path | None = None) -> bool:
    """Remove test bed ``name`` whoever made it; False if nothing of it was found."""
    check_available()
    found = state.load(name, state_dir)
    present = any(ns.startswith(f"{name}-") for ns in netns.list_namespaces()) or _bed_cgroups(name, [])
    if found is None and not present:
        return False
    _remove_by_name(name, found, state_dir)
    return True


def cleanup_stale(
    prefix: str = DEFAULT_BASE, *, include_detached: bool = False, state_dir: str | Path | None = None
) -> list[str]:
    """Remove leftovers of crashed runs: beds named ``<prefix><pid>...`` whose owner process is gone.

    Namespaces, their processes, cgroups and state files are removed. Beds made by the CLI
    (detached) stay unless ``include_detached``. Returns the names of the beds removed.
    """
    check_available()
    pattern = _owned_pattern(prefix)
    candidates: dict[str, int | None] = {}
    for item in [*netns.list_namespaces(), *(p.name for p in list_cgroups(pattern.pattern))]:
        m = pattern.match(item)
        if m:
            candidates[m.group(1)] = int(m.group(2))
    for recorded in state.all_states(state_dir):  # any name, custom ones too: the state names the owner
        candidates.setdefault(recorded.name, None)
    removed = []
    for name, pid in sorted(candidates.items()):
        found = state.load(name, state_dir)
        if found is not None:
            if found.detached and not include_detached:
                continue
            if not found.detached and state.pid_alive(found.owner_pid, found.owner_start):
                continue
        elif pid is None or state.pid_alive(pid):
            continue
        try:
            _remove_by_name(name, found, state_dir)
            removed.append(name)
        except Exception as exc:
            log.warning("could not remove stale test bed %s: %s", name, exc)
    return removed


# --------------------------------------------------------------------- teardown on exit / SIGTERM
_live: list[Testbed] = []
_live_lock = threading.RLock()
_handlers_installed = False
_previous_sigterm = signal.SIG_DFL


_owner_pid: int | None = None  # the process whose beds _live lists (a forked child has none)


def _forget_in_child() -> None:
    """In a forked child: the parent's beds are not the child's to tear down."""
    _live.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def _register(bed: Testbed) -> None:
    global _handlers_installed, _previous_sigterm, _owner_pid
    with _live_lock:
        _live.append(bed)
        _owner_pid = os.getpid()
        if _handlers_installed:
            return
        _handlers_installed = True
        atexit.register(teardown_all)
        if threading.current_thread() is threading.main_thread():
            _previous_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _on_sigterm)


def _unregister(bed: Testbed) -> None:
    with _live_lock:
        if bed in _live:
            _live.remove(bed)


def teardown_all() -> None:
    """Tear down every bed this process has up (runs at exit and on SIGTERM)."""
    if os.getpid() != _owner_pid:  # a forked child inherited the hooks, not the beds
        return
    with _live_lock:
        beds = list(reversed(_live))
    for bed in beds:
        try:
            bed.down()
        except Exception as exc:
            log.error("could not tear down test bed %s: %s", bed.name, exc)


def _on_sigterm(signum, frame) -> None:
    teardown_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default: die of SIGTERM, as without us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
