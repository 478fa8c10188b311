"""The multi-host test bed, for real: namespaces, a bridge, tbf, nftables, cgroup quotas.

Needs root and iproute2 (CI runs as root); skipped otherwise, with the reason.
"""

from __future__ import annotations

import doctest
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgesplit.testbed import Testbed, TestbedError, TestbedUnavailable, cleanup_stale, unavailable_reason
from edgesplit.testbed.cgroups import smooth_period_us

REASON = unavailable_reason()  # None when root and `ip netns` work

NODE_PORT = 8001  # inside edge1's namespace: no clash with anything on the host

DEVICE_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from edgesplit.models import load_trained
from edgesplit.runtime.transport.client import EdgeClient
from edgesplit.runtime.device.runner import DeviceRunner

model = load_trained("resnet_fm")
runner = DeviceRunner(model, cut=4, thresholds=1.01, client=EdgeClient(sys.argv[1]), deadline_s=float(sys.argv[2]))
torch.manual_seed(0)
x = torch.rand(1, 1, 28, 28)
with torch.inference_mode():
    local = model(x)
print("ready", flush=True)
for _ in sys.stdin:
    a = runner.infer(x)
    print(json.dumps({
        "where": a.where, "prediction": a.prediction, "local": int(local.argmax()),
        "close": bool(torch.allclose(a.logits, local, atol=1e-4)), "error": a.offload_error,
        "seconds": a.latency.total,
    }), flush=True)
"""

SINK_SCRIPT = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        n += len(d)
    c.sendall(str(n).encode())
    c.close()
"""

SEND_SCRIPT = r"""
import json, socket, sys, time
n = int(sys.argv[3])
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
started = time.perf_counter()
c.sendall(b"x" * n)
c.shutdown(socket.SHUT_WR)
got = int(c.recv(64))
print(json.dumps({"bytes": got, "seconds": time.perf_counter() - started}))
"""

CONNECT_SCRIPT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)
    print("connected")
except ConnectionRefusedError:
    print("refused")   # the SYN got there and the RST came back
except OSError as exc:
    print(type(exc).__name__)
"""

BUSY_SCRIPT = r"""
import sys, time
sys.stdin.readline()
wall, cpu = time.perf_counter(), time.process_time()
x = 0
for i in range(4_000_000):
    x += i
print(time.perf_counter() - wall, time.process_time() - cpu, flush=True)
"""


class Lines:
    """Lines of a child's stdout, read by a thread, with a timeout per line."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def next(self, timeout: float, what: str, log: Path | None = None) -> str:
        try:
            line = self.q.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:
            detail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"no {what} from the child (exit {self.proc.poll()}):\n{detail}")
        return line


def _set_then_pause(event) -> None:
    event.set()
    signal.pause()


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def of_bed(name: str) -> set[str]:
    return {ns for ns in namespaces() if ns.startswith(f"{name}-")}


def test_unavailable_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(TestbedUnavailable, match="root"):
        Testbed().up()


@pytest.mark.parametrize("module", ["edgesplit.testbed.errors", "edgesplit.testbed.shaping"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_device_class_periods_give_every_period_a_five_millisecond_budget():
    assert [smooth_period_us(f) for f in (2.0, 1.0, 0.6, 0.15, 0.05, 0.001)] == \
        [5000, 5000, 8334, 33334, 100000, 1000000]
    with pytest.raises(ValueError):
        smooth_period_us(0)


def test_bad_addresses_are_refused():
    with pytest.raises(ValueError, match="benchmarking range"):
        Testbed({"device": "10.0.0.1"})


@pytest.mark.parametrize("base", ["e s", "x/y", "es1", "", "a" * 300, 7])
def test_a_bad_base_is_refused(base):
    # "e s" made a bed whose namespaces down() could not see (ip lists names up to a space)
    with pytest.raises(ValueError, match="base"):
        Testbed(base=base)


@pytest.mark.parametrize("kwargs, words", [
    ({"rate_mbit": float("inf")}, "rate_mbit"), ({"rate_mbit": float("nan")}, "rate_mbit"),
    ({"rate_mbit": -1}, "rate_mbit"), ({"rate_mbit": 0}, "unshape"), ({"rate_mbit": True}, "rate_mbit"),
    ({"rate_mbit": 1e-9}, "rate_mbit"), ({"rate_mbit": 5, "burst": 1.5}, "burst"),
    ({"rate_mbit": 5, "burst": 0}, "burst"), ({"rate_mbit": 5, "latency": -1}, "latency"),
    ({"rate_mbit": 5, "latency": float("nan")}, "latency"), ({"rate_mbit": 5, "latency": 1e9}, "latency"),
])
def test_shaping_numbers_out_of_range_are_refused_before_tc_runs(kwargs, words):
    """inf was an OverflowError, NaN a conversion error, -1 s of latency became 1 us and a
    1.5-byte burst 1 byte: refused here, before any tc command."""
    from edgesplit.testbed import shaping

    with pytest.raises(ValueError, match=words):
        shaping.shape("no-such-namespace", "eth0", **kwargs)


@pytest.mark.parametrize("fraction", [float("inf"), float("nan"), 0, -1, 1e20, True])
def test_cpu_fractions_out_of_range_are_refused(fraction):
    from edgesplit.testbed.cgroups import CpuQuota

    quota = CpuQuota(Path("/nonexistent"), 1, owned=False)
    with pytest.raises(ValueError, match="fraction"):
        quota.set(fraction)


@pytest.mark.root
@pytest.mark.skipif(REASON is not None, reason=f"multi-host test bed not available: {REASON}")
class TestTestbed:
    def test_topology_is_private_and_torn_down(self):
        links_before = root_links()
        with Testbed() as bed:
            name = bed.name
            assert of_bed(name) == {f"{name}-{h}" for h in ("device", "edge1", "edge2", "controller", "bridge")}
            assert root_links() == links_before  # nothing added to the root namespace
            routes = bed.run("device", ["ip", "route"]).stdout
            assert "198.18.0.0/24" in routes and "default" not in routes  # nowhere else to go
            assert "inet 127.0.0.1" in bed.run("edge2", ["ip", "addr", "show", "lo"]).stdout
            reply = bed.run("device", [sys.executable, "-c", CONNECT_SCRIPT, bed.address("controller"), "9"]).stdout
            assert reply.strip() == "refused"  # reached the controller over the bridge
            sleeper = bed.exec("edge1", ["sleep", "60"])
        assert of_bed(name) == set()
        assert sleeper.poll() is not None
        assert root_links() == links_before

    def test_teardown_after_an_exception_inside_with(self):
        with pytest.raises(RuntimeError, match="boom"):
            with Testbed() as bed:
                name = bed.name
                sleeper = bed.exec("edge2", ["sleep", "60"])
                quota = bed.cpu_quota(sleeper.pid, 0.5)
                raise RuntimeError("boom")
        assert of_bed(name) == set()
        assert sleeper.poll() is not None
        assert not quota.path.exists()

    def test_tbf_limits_throughput(self):
        n = 2_000_000
        with Testbed() as bed:
            sink = bed.exec("edge1", [sys.executable, "-u", "-c", SINK_SCRIPT, bed.address("edge1"), "9000"],
                            stdout=subprocess.PIPE, text=True)
            assert Lines(sink).next(20, "listening line") == "listening"
            send = [sys.executable, "-c", SEND_SCRIPT, bed.address("edge1"), "9000", str(n)]
            fast = json.loads(bed.run("device", send).stdout)
            bed.shape("device", rate_mbit=8)
            assert "tbf" in bed.qdisc("device")["egress"] and "tbf" in bed.qdisc("device")["ingress"]
            slow = json.loads(bed.run("device", send).stdout)
            bed.unshape("device")
            assert "tbf" not in bed.qdisc("device")["egress"]
        assert fast["bytes"] == slow["bytes"] == n
        # 2 MB at 8 Mbit/s is 2 s; the bucket lets ~32 KiB through at once
        assert slow["seconds"] >= 1.5, slow
        assert slow["seconds"] > 2 * fast["seconds"], (fast, slow)

    def test_nft_drop_installs_and_removes(self):
        with Testbed() as bed:
            target = [sys.executable, "-c", CONNECT_SCRIPT, bed.address("edge1"), "9"]
            bed.drop("device", 30)
            assert "numgen random mod 1000 < 300 drop" in bed.drop_rules("device")
            bed.drop("device", 100)  # replaces the rule
            rules = bed.drop_rules("device")
            assert 'oifname "eth0" drop' in rules and "< 300" not in rules
            assert bed.run("device", target).stdout.strip() != "refused"  # nothing gets out
            assert bed.undrop("device") is True
            assert bed.drop_rules("device") == ""
            assert bed.undrop("device") is False
            assert bed.run("device", target).stdout.strip() == "refused"

    def test_cpu_quota_slows_a_busy_loop_and_is_removed(self):
        with Testbed() as bed:
            free = bed.exec("device", [sys.executable, "-c", BUSY_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
            free_wall, _ = map(float, free.communicate("go\n", timeout=60)[0].split())
            busy = bed.exec("device", [sys.executable, "-c", BUSY_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
            quota = bed.cpu_quota(busy.pid, 0.2, period_us=smooth_period_us(0.2))
            assert busy.pid in quota.pids()
            assert quota.path.name == f"{bed.name}-cpu0"
            if quota.version == 1:  # the period asked for is the one the kernel enforces
                assert (quota.path / "cpu.cfs_period_us").read_text().strip() == "25000"
                assert (quota.path / "cpu.cfs_quota_us").read_text().strip() == "5000"
            wall, cpu = map(float, busy.communicate("go\n", timeout=60)[0].split())
            path = quota.path
            assert path.exists()
        assert not path.exists()
        assert cpu / wall < 0.4, (wall, cpu)  # quota 0.2 of a core; loose bound
        assert wall > 1.5 * free_wall, (free_wall, wall)

    def test_stale_beds_are_cleaned_and_sigterm_tears_down(self):
        start = "from edgesplit.testbed import Testbed; import time; b = Testbed().up(); print(b.name, flush=True); " \
                "time.sleep(60)"
        crashed = subprocess.Popen([sys.executable, "-c", start], stdout=subprocess.PIPE, text=True)
        name = Lines(crashed).next(30, "bed name")
        assert len(of_bed(name)) == 5
        crashed.kill()  # SIGKILL: no chance to clean up
        crashed.wait()
        assert len(of_bed(name)) == 5
        assert name in cleanup_stale()
        assert of_bed(name) == set()

        terminated = subprocess.Popen([sys.executable, "-c", start], stdout=subprocess.PIPE, text=True)
        name = Lines(terminated).next(30, "bed name")
        terminated.send_signal(signal.SIGTERM)
        assert terminated.wait(30) == -signal.SIGTERM
        assert of_bed(name) == set()

    def test_a_forked_child_terminated_leaves_the_parents_bed_up(self):
        """The child inherited the SIGTERM handler and the list of live beds, and tore down
        its parent's bed when it was terminated."""
        import multiprocessing

        context = multiprocessing.get_context("fork")
        with Testbed({"device": "198.18.0.2"}) as bed:
            running = context.Event()
            child = context.Process(target=_set_then_pause, args=(running,))
            child.start()
            try:
                # a SIGTERM that comes before the child runs Python is dropped by CPython's fork handling
                assert running.wait(30), "the child never started"
                child.terminate()
                child.join(30)
                assert child.exitcode == -signal.SIGTERM
                assert len(of_bed(bed.name)) == 2 and bed.is_up
            finally:
                if child.is_alive():
                    child.kill()
                    child.join(30)
        assert of_bed(bed.name) == set()

    def test_another_state_folder_leaves_a_detached_bed_alone(self, tmp_path):
        """A bed made with another state folder found a detached bed's namespaces without a
        state file, read the dead pid of the command that made it in its name and removed it."""
        from edgesplit.testbed import remove

        make = ("import sys; from edgesplit.testbed import Testbed; "
                "print(Testbed({'device': '198.18.0.2'}, detached=True, state_dir=sys.argv[1]).up().name)")
        name = subprocess.run([sys.executable, "-c", make, str(tmp_path / "a")], capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip()  # made, and its maker gone, like 'up'
        try:
            with Testbed({"device": "198.18.0.2"}, state_dir=tmp_path / "b"):
                assert of_bed(name) == {f"{name}-device", f"{name}-bridge"}
        finally:
            remove(name, state_dir=tmp_path / "a")
        assert of_bed(name) == set()

    def test_losing_the_race_for_a_name_leaves_the_winners_bed_up(self, tmp_path, monkeypatch):
        """Two processes passed the name check, the loser failed to make the namespace and its
        rollback deleted the winner's whole bed and state."""
        from edgesplit.testbed import netns as netns_module

        winner = Testbed({"device": "198.18.0.2"}, name="racebed", state_dir=tmp_path).up()
        try:
            loser = Testbed({"device": "198.18.0.2"}, name="racebed", state_dir=tmp_path, clean_stale=False)
            real_list, real_add = netns_module.list_namespaces, netns_module.add_namespace
            tried = []

            def listed():  # the winner's namespaces stay unseen until the loser tries to make one, as in the race
                return [n for n in real_list() if tried or not n.startswith("racebed-")]

            def add(name):
                tried.append(name)
                real_add(name)

            monkeypatch.setattr(netns_module, "list_namespaces", listed)
            monkeypatch.setattr(netns_module, "add_namespace", add)
            with pytest.raises(TestbedError, match="exists"):
                loser.up()
            monkeypatch.undo()
            assert tried == ["racebed-bridge"]
            assert of_bed("racebed") == {"racebed-device", "racebed-bridge"} and winner.is_up
            assert (tmp_path / "racebed.json").exists()  # its state is kept
        finally:
            winner.down()
        assert of_bed("racebed") == set()

    def test_a_quota_for_no_process_or_pid_0_is_refused_and_leaves_no_cgroup(self):
        from edgesplit.testbed.cgroups import cpu_root

        root, _ = cpu_root()
        with Testbed({"device": "198.18.0.2"}) as bed:
            for pid in (0, True, -1):  # 0 moved the caller itself under the quota; True is init
                with pytest.raises(ValueError, match="pid"):
                    bed.cpu_quota(pid, 0.5)
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            with pytest.raises(TestbedError):
                bed.cpu_quota(dead.pid, 0.5)
            assert not [p for p in root.iterdir() if p.name.startswith(f"{bed.name}-cpu")]
            with pytest.raises(TestbedError, match="not a cgroup directory"):
                bed.cpu_quota("/tmp", 0.5)  # wrote /tmp/cpu.max
            assert not Path("/tmp/cpu.max").exists()

    def test_a_crashed_bed_with_a_custom_name_is_cleaned(self):
        start = ("from edgesplit.testbed import Testbed; import time; "
                 "b = Testbed({'device': '198.18.0.2'}, name='crashbed').up(); print(b.name, flush=True); "
                 "time.sleep(60)")
        crashed = subprocess.Popen([sys.executable, "-c", start], stdout=subprocess.PIPE, text=True)
        assert Lines(crashed).next(30, "bed name") == "crashbed"
        crashed.kill()
        crashed.wait()
        assert len(of_bed("crashbed")) == 2
        assert "crashbed" in cleanup_stale()  # its state names a dead owner
        assert of_bed("crashbed") == set()

    def test_offload_answered_then_link_cut_answered_locally(self, tmp_path):
        """Device in one namespace, node in another, a shaped link, an offloaded request
        answered, the link cut, the request answered locally."""
        from edgesplit.runtime.node.launcher import NodeProcess

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with Testbed() as bed:
            bed.shape("device", rate_mbit=20)
            node = NodeProcess(host=bed.address("edge1"), port=NODE_PORT, metrics_port=0, threads=1,
                               command_prefix=bed.exec_prefix("edge1"), startup_timeout=60)
            with node:
                log = tmp_path / "device.log"
                with open(log, "w") as err:
                    device = bed.exec(
                        "device", [sys.executable, "-c", DEVICE_SCRIPT, node.address, "3.0"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                    )
                lines = Lines(device)
                assert lines.next(60, "ready line", log) == "ready"

                device.stdin.write("go\n")
                device.stdin.flush()
                first = json.loads(lines.next(30, "first answer", log))
                assert first["where"] == "edge", first
                assert first["prediction"] == first["local"]
                sent = int(bed.qdisc("device")["egress"].split("Sent ", 1)[1].split()[0])
                assert sent > 0  # the request went through the shaped link

                bed.link_down("device")
                assert not bed.link_is_up("device")
                device.stdin.write("go\n")
                device.stdin.flush()
                second = json.loads(lines.next(30, "second answer", log))
                assert second["where"] == "device-fallback", second
                assert second["error"]
                assert second["prediction"] == second["local"] and second["close"], second
                device.stdin.close()
                device.wait(10)
        assert of_bed(bed.name) == set()
