"""Chaos benchmark: thousands of requests over the multi-host test bed while things break.

A device (own network namespace, link shaped with tbf) sends requests to two edge nodes
(each in its own namespace) through a failover client. Meanwhile links go down and up at
random (outages of 0.2 to 3 s: the device's own link, or one edge's) and edge1 is killed
with SIGKILL and restarted. Reported: requests sent, answered, lost and duplicated (both
must be 0), answers that differ from a purely local computation beyond the codec's
tolerance (must be 0), p50/p99 latency, the share offloaded, and the time from each link
restoration to the first offloaded answer (goal: under 2 s). Needs root (namespaces).

The kill is triggered by progress, not by the clock: the device writes one JSON line per
answer (line-buffered), the orchestrator counts those lines, and edge1 is killed as soon
as a third of the requests (:data:`KILL_AT_FRACTION`) have been answered. The kill runs in
its own thread, so the random outages cannot delay it; the result records the answered
count at the kill (``node_killed_at_request``) next to the total (``sent``). A failure in
either chaos thread fails the benchmark.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgesplit.bench import machine_info, table
from edgesplit.runtime.demo import percentile

EDGE_PORT = 8001
FP16_LOGIT_TOLERANCE = 0.05  # fp16 crossing tensor: logits agree to about 1e-2
KILL_HOST = "edge1"
KILL_AT_FRACTION = 1 / 3  # kill edge1 once this share of the requests has been answered
POLL_S = 0.005  # how often the kill thread counts the answers
LINK_LOCK_TIMEOUT_S = 15.0  # an outage lasts at most 3 s; waiting longer than this is a bug
RESTART_TIMEOUT_S = 90.0  # NodeProcess.start waits up to 60 s for the node to serve


class AnswerCount:
    """How many answers the device has written so far: newlines in its JSON-lines file.

    Reads only what was appended since the last call, so polling every few milliseconds
    stays cheap; a line being written (no newline yet) is not counted. Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._count = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
            except FileNotFoundError:
                return 0
            self._offset += len(chunk)
            self._count += chunk.count(b"\n")
            return self._count


class ChaosError(RuntimeError):
    """A chaos thread failed, or the kill could not be done as planned."""


class Chaos:
    """Breaks links at random, kills one node at a given progress, records when things came back.

    Two threads: one takes links down and up at random (every wait interruptible by
    :meth:`stop`, a downed link is always restored), one waits until ``answered()`` reaches
    ``kill_at``, then SIGKILLs ``kill_host`` and restarts it. A per-host lock keeps an outage
    of the killed host's link from overlapping its restart (the restart waits, bounded, for
    a running outage to end; no new outage of that host starts meanwhile); the kill itself
    never waits. Exceptions in either thread are kept and re-raised by :meth:`check`.
    """

    def __init__(self, bed, nodes: dict, seed: int = 0, kill_host: str = KILL_HOST) -> None:
        self.bed = bed
        self.nodes = nodes
        self.kill_host = kill_host
        self.rng = random.Random(seed)  # outages
        self._kill_rng = random.Random(f"{seed}-kill")  # restart delay; independent of the outage draws
        self.events: list[dict] = []
        self.errors: list[BaseException] = []
        self._events_lock = threading.Lock()
        self._link_locks = {h: threading.Lock() for h in ("device", *nodes)}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._kill_thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, answered: Callable[[], int], kill_at: int, device_done: Callable[[], bool]) -> None:
        """Start both threads: outages now, the kill once ``answered() >= kill_at``."""
        outages = threading.Thread(target=self._guarded, args=(self._outages,), name="chaos-outages", daemon=True)
        kill = threading.Thread(target=self._guarded, args=(self._kill_when, answered, kill_at, device_done),
                                name="chaos-kill", daemon=True)
        self._threads = [outages, kill]
        self._kill_thread = kill
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop the outages (a downed link is restored at once); a pending restart happens without delay."""
        self._stop.set()

    def wait_kill(self, timeout: float) -> None:
        """Wait (bounded) until the kill thread is done: edge killed and restarted, or failed."""
        if self._kill_thread is not None:
            self._kill_thread.join(timeout)
            if self._kill_thread.is_alive():
                raise ChaosError(f"killing and restarting {self.kill_host} did not finish within {timeout} s")

    def join(self, timeout: float) -> list[str]:
        """Join both threads, ``timeout`` in all; returns the names of threads still running."""
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        return [t.name for t in self._threads if t.is_alive()]

    def check(self) -> None:
        """Raise the first exception of a chaos thread, if any."""
        if self.errors:
            raise ChaosError(f"a chaos thread failed: {self.errors[0]!r}") from self.errors[0]

    @property
    def killed(self) -> bool:
        return any(e["kind"] == "node_killed" for e in self.events)

    @property
    def restarted(self) -> bool:
        return any(e["kind"] == "node_restarted" for e in self.events)

    # -- threads ------------------------------------------------------------------------
    def _guarded(self, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # kept for check(): a crashed chaos thread must fail the run
            self.errors.append(exc)
            self._stop.set()

    def _sleep(self, seconds: float) -> bool:
        return not self._stop.wait(seconds)

    def _record(self, kind: str, target: str, **extra) -> None:
        with self._events_lock:
            self.events.append({"t": time.monotonic(), "kind": kind, "target": target, **extra})

    def _outages(self) -> None:
        while self._sleep(self.rng.uniform(0.3, 1.5)):
            host = self.rng.choice(["device", "device", "edge1", "edge2"])
            outage = self.rng.uniform(0.2, 3.0)
            lock = self._link_locks[host]
            if not lock.acquire(blocking=False):
                continue  # that host's node is being restarted: leave its link alone
            try:
                self.bed.link_down(host)
                self._record("link_down", host, outage_s=outage)
                try:
                    self._stop.wait(outage)  # cut short by stop(); the link is restored either way
                finally:
                    self.bed.link_up(host)
                    self._record("link_up", host)
            finally:
                lock.release()

    def _kill_when(self, answered: Callable[[], int], kill_at: int, device_done: Callable[[], bool]) -> None:
        while (n := answered()) < kill_at:
            if self._stop.is_set():
                return  # stopped early (another thread failed, or the run was aborted)
            if device_done() and (n := answered()) < kill_at:
                raise ChaosError(f"the device exited after {n} answers, before the kill point ({kill_at})")
            time.sleep(POLL_S)
        node = self.nodes[self.kill_host]
        n = answered()
        node.kill()
        self._record("node_killed", self.kill_host, answered=n, kill_at=kill_at)
        lock = self._link_locks[self.kill_host]
        if not lock.acquire(timeout=LINK_LOCK_TIMEOUT_S):
            raise ChaosError(f"{self.kill_host}'s link outage did not end within {LINK_LOCK_TIMEOUT_S} s")
        try:
            self._stop.wait(self._kill_rng.uniform(0.5, 2.0))  # stays down a while; not past the run's end
            node.start()
            self._record("node_restarted", self.kill_host, answered=answered())
        finally:
            lock.release()


def analyse(records: list[dict], sent: int, events: list[dict]) -> dict:
    ids = [r["id"] for r in records]
    where = [r["where"] for r in records]
    edge = [r for r in records if r["where"] == "edge"]
    latencies = [r["latency"] for r in records]
    differing = [r for r in edge if r["max_abs_diff"] > FP16_LOGIT_TOLERANCE]
    times = [r["t"] for r in records]
    # Time from each restoration of the device's link to its first offloaded answer; outages of
    # an edge link alone leave the other edge reachable, so they are not counted here.
    recoveries = []
    downs = [e for e in events if e["kind"] == "link_down"]
    for e in events:
        if e["kind"] != "link_up" or e["target"] != "device":
            continue
        next_down = min((d["t"] for d in downs if d["t"] > e["t"]), default=float("inf"))
        first = next((r["t"] for r in edge if r["t"] > e["t"]), None)
        if first is not None and first < next_down:
            recoveries.append(first - e["t"])
    kills = [e for e in events if e["kind"] == "node_killed"]
    kill = kills[0] if kills else None
    if kill is not None and "answered" in kill:
        killed_at = kill["answered"]  # counted by the orchestrator when it sent SIGKILL
    else:  # events without a count (older results): the first answer after the kill
        killed_at = next((i for i, t in enumerate(times) if kill and t >= kill["t"]), None)
    return {
        "sent": sent,
        "answered": len(records),
        "lost": sent - len(set(ids)),
        "duplicated": len(ids) - len(set(ids)),
        "differing_from_local": len(differing),
        "max_abs_logit_diff_offloaded": max((r["max_abs_diff"] for r in edge), default=0.0),
        "logit_tolerance": FP16_LOGIT_TOLERANCE,
        "accuracy": sum(r["prediction"] == r["label"] for r in records) / max(1, len(records)),
        "latency_p50_ms": 1000 * percentile(latencies, 50),
        "latency_p99_ms": 1000 * percentile(latencies, 99),
        "latency_mean_ms": 1000 * statistics.fmean(latencies) if latencies else 0.0,
        "share_offloaded": len(edge) / max(1, len(records)),
        "where": {w: where.count(w) for w in sorted(set(where))},
        "offload_errors": {k: sum(1 for r in records if r["error"] == k)
                           for k in sorted({r["error"] for r in records if r["error"]})},
        "duration_s": (max(times) - min(times)) if times else 0.0,
        "link_outages": len(downs),
        "device_link_restorations": sum(1 for e in events if e["kind"] == "link_up" and e["target"] == "device"),
        "recovery_to_first_offload_s": recoveries,
        "recovery_median_s": statistics.median(recoveries) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None,
        "recovery_goal_s": 2.0,
        "node_killed": kill["target"] if kill else None,
        "node_killed_at_request": killed_at,  # answers produced when the kill happened (of "sent")
        "node_kill_at": kill.get("kill_at") if kill else None,  # the answered count that triggered it
        "node_restarted": any(e["kind"] == "node_restarted" and kill and e["target"] == kill["target"]
                              for e in events),
    }


def run(quick: bool = False, progress: bool = True, requests: int | None = None, seed: int = 0) -> dict:
    from edgesplit.runtime.node.launcher import NodeProcess
    from edgesplit.testbed.bed import Testbed

    if os.geteuid() != 0:
        raise SystemExit("the chaos benchmark builds network namespaces: run it as root")
    requests = requests or (1000 if quick else 5000)
    kill_at = max(1, int(requests * KILL_AT_FRACTION))
    # A bound on the whole device loop, far above a normal run (2 to 10 ms a request):
    # every request is bounded by the offload deadline plus a local completion.
    device_timeout_s = 120.0 + 0.2 * requests
    work = Path(tempfile.mkdtemp(prefix="edgesplit-chaos-"))
    out_path = work / "answers.jsonl"
    answered = AnswerCount(out_path)
    with Testbed() as bed:
        bed.shape("device", rate_mbit=50)
        nodes = {
            h: NodeProcess(model="resnet_fm", host=bed.address(h), port=EDGE_PORT, metrics_port=-1, threads=1,
                           command_prefix=bed.exec_prefix(h), log_path=work / f"{h}.log")
            for h in ("edge1", "edge2")
        }
        chaos = Chaos(bed, nodes, seed)
        device = None
        try:
            for node in nodes.values():
                node.start()
            targets = ",".join(f"{bed.address(h)}:{EDGE_PORT}" for h in nodes)
            device = bed.exec("device", [
                sys.executable, "-m", "edgesplit.bench.chaos_device", "--targets", targets,
                "--requests", str(requests), "--out", str(out_path), "--codec", "fp16",
            ], stdout=subprocess.PIPE, text=True)
            line = device.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"device loop failed to start (said {line!r}); see {work}")
            chaos.start(answered, kill_at, device_done=lambda: device.poll() is not None)
            deadline = time.monotonic() + device_timeout_s
            shown = 0.0
            while True:
                try:
                    device.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    pass
                chaos.check()  # a crashed chaos thread fails the run now, not after it
                if time.monotonic() > deadline:
                    raise TimeoutError(f"device loop still running after {device_timeout_s:.0f} s; see {work}")
                if progress and time.monotonic() - shown >= 0.5:
                    shown = time.monotonic()
                    print(f"\rchaos: {answered()}/{requests} answered, {len(chaos.events)} events",
                          end="", flush=True)
            if progress:
                print()
            if device.returncode != 0:
                raise RuntimeError(f"device loop exited {device.returncode}; see {work}")
            chaos.wait_kill(RESTART_TIMEOUT_S)  # the restart may still be under way
            chaos.stop()
            alive = chaos.join(LINK_LOCK_TIMEOUT_S)
            chaos.check()
            if alive:
                raise ChaosError(f"chaos threads did not stop: {alive}")
            if not chaos.killed:
                raise ChaosError(f"{KILL_HOST} was never killed (kill point {kill_at} of {requests} answers)")
            if not chaos.restarted:
                raise ChaosError(f"{KILL_HOST} was killed but not restarted")
        finally:
            chaos.stop()
            chaos.join(LINK_LOCK_TIMEOUT_S)  # links restored before the bed goes down
            if device is not None and device.poll() is None:
                device.kill()
                device.wait()
            for node in nodes.values():
                node.close()
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    events = sorted(chaos.events, key=lambda e: e["t"])
    result = analyse(records, requests, events)
    result.update(events=[{**e, "t": round(e["t"] - records[0]["t"], 3)} for e in events],
                  codec="fp16", cut=4, threshold=0.9, device_link_mbit=50, seed=seed, machine=machine_info())
    return result


def render(r: dict) -> str:
    rec = r["recovery_to_first_offload_s"]
    rows = [
        ["requests sent", r["sent"], ""],
        ["answered", r["answered"], "goal: = sent"],
        ["lost", r["lost"], "goal: 0"],
        ["duplicated", r["duplicated"], "goal: 0"],
        ["differing from local", r["differing_from_local"],
         f"goal: 0 (max |Δlogit| offloaded {r['max_abs_logit_diff_offloaded']:.4f}, tolerance {r['logit_tolerance']})"],
        ["latency p50", f"{r['latency_p50_ms']:.1f} ms", ""],
        ["latency p99", f"{r['latency_p99_ms']:.1f} ms", ""],
        ["share offloaded", f"{100 * r['share_offloaded']:.1f}%", ", ".join(f"{k} {v}" for k, v in r["where"].items())],
        ["accuracy", f"{100 * r['accuracy']:.2f}%", ""],
        ["link outages", r["link_outages"], f"{r['device_link_restorations']} of the device's own link"],
        ["restore → first offload", f"median {r['recovery_median_s'] or 0:.2f} s, max {r['recovery_max_s'] or 0:.2f} s"
         if rec else "n/a", f"goal: < {r['recovery_goal_s']} s; {len(rec)} restorations measured"],
        ["edge1 SIGKILL", f"after {r['node_killed_at_request']} of {r['sent']} answers"
         if r["node_killed_at_request"] is not None else "not killed",
         "restarted on the same port" if r.get("node_restarted") else "not restarted"],
        ["run time", f"{r['duration_s']:.1f} s", ""],
    ]
    return "chaos benchmark over the multi-host test bed\n" + table(["measure", "value", "note"], rows)
