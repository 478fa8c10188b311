"""Chaos benchmark: the analysis counts what it should; the chaos threads kill at a given
progress whatever the outages do and surface their failures; a short real run over the test
bed kills and restarts edge1 mid-run and loses nothing (root only: it builds network namespaces)."""

import os
import shutil
import threading
import time

import pytest

from edgesplit.bench.chaos import AnswerCount, Chaos, ChaosError, analyse, render


def rec(i, t, where, diff=0.0, error=None):
    return {"id": i, "t": t, "where": where, "exit": "final", "prediction": 1, "label": 1, "latency": 0.01,
            "device": 0.005, "transfer": 0.003, "edge": 0.002, "error": error, "max_abs_diff": diff}


def test_analysis_counts_losses_duplicates_differences_and_recoveries():
    records = [rec(0, 1.0, "edge"), rec(1, 2.0, "device-fallback", error="UNAVAILABLE"), rec(1, 2.1, "edge"),
               rec(3, 3.5, "edge", diff=0.2), rec(4, 4.0, "edge")]
    events = [{"t": 1.5, "kind": "link_down", "target": "device"}, {"t": 3.0, "kind": "link_up", "target": "device"}]
    r = analyse(records, sent=5, events=events)
    assert r["lost"] == 1 and r["duplicated"] == 1  # id 2 missing, id 1 twice
    assert r["differing_from_local"] == 1
    assert r["recovery_to_first_offload_s"] == [pytest.approx(0.5)]
    assert r["offload_errors"] == {"UNAVAILABLE": 1}
    assert r["node_killed_at_request"] is None and r["node_restarted"] is False
    assert "lost" in render(r)


def test_analysis_takes_the_kill_point_from_the_answered_count():
    records = [rec(i, float(i), "edge") for i in range(6)]
    events = [{"t": 1.5, "kind": "node_killed", "target": "edge1", "answered": 2, "kill_at": 2},
              {"t": 3.5, "kind": "node_restarted", "target": "edge1", "answered": 4}]
    r = analyse(records, sent=6, events=events)
    assert r["node_killed"] == "edge1" and r["node_killed_at_request"] == 2 and r["node_kill_at"] == 2
    assert r["node_restarted"] is True
    assert "after 2 of 6 answers" in render(r)


def test_answer_count_counts_complete_lines_only(tmp_path):
    path = tmp_path / "answers.jsonl"
    count = AnswerCount(path)
    assert count() == 0  # not written yet
    with open(path, "w", buffering=1) as f:
        f.write('{"id": 0}\n{"id": 1}\n{"id"')
        assert count() == 2
        f.write(': 2}\n')
        assert count() == 3


class FakeNode:
    def __init__(self, fail_kill=False):
        self.calls, self.fail_kill = [], fail_kill

    def kill(self):
        if self.fail_kill:
            raise OSError("cannot kill")
        self.calls.append("kill")

    def start(self):
        self.calls.append("start")


class HeldLinkBed:
    """A bed whose link restorations block until released (``hold``): an outage in progress."""

    def __init__(self, hold=False, fail_down=False):
        self.down, self.release, self.fail_down = threading.Event(), threading.Event(), fail_down
        if not hold:
            self.release.set()
        self.log = []

    def link_down(self, host):
        if self.fail_down:
            raise RuntimeError("ip link failed")
        self.log.append(("down", host))
        self.down.set()

    def link_up(self, host):
        assert self.release.wait(30), "test never released the link"
        self.log.append(("up", host))


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


class Counter:
    def __init__(self):
        self.n = 0

    def __call__(self):
        return self.n


def test_kill_fires_at_the_answered_count_while_an_outage_is_under_way():
    bed, node, answered = HeldLinkBed(hold=True), FakeNode(), Counter()
    chaos = Chaos(bed, {"edge1": node, "edge2": FakeNode()}, seed=3)
    chaos.start(answered, kill_at=10, device_done=lambda: False)
    try:
        assert bed.down.wait(10), "no outage started"
        answered.n = 9
        assert not any(e["kind"] == "node_killed" for e in chaos.events)
        answered.n = 12
        # The outage thread is stuck restoring a link; the kill must not wait for it.
        assert wait_for(lambda: chaos.killed), "edge1 was not killed while an outage was under way"
        assert not bed.log or bed.log[-1][0] == "down"  # the outage is still under way
        assert [e for e in chaos.events if e["kind"] == "node_killed"][0]["answered"] == 12
    finally:
        bed.release.set()
        chaos.stop()
    chaos.wait_kill(10)
    assert chaos.join(10) == []
    chaos.check()
    assert node.calls == ["kill", "start"] and chaos.restarted


def test_a_crashed_outage_thread_fails_the_run():
    chaos = Chaos(HeldLinkBed(fail_down=True), {"edge1": FakeNode(), "edge2": FakeNode()}, seed=0)
    chaos.start(Counter(), kill_at=10, device_done=lambda: False)
    assert chaos.join(10) == []  # the failure stops both threads
    with pytest.raises(ChaosError, match="ip link failed"):
        chaos.check()
    assert not chaos.killed


def test_a_crashed_kill_thread_fails_the_run():
    answered = Counter()
    answered.n = 5
    chaos = Chaos(HeldLinkBed(), {"edge1": FakeNode(fail_kill=True), "edge2": FakeNode()}, seed=0)
    chaos.start(answered, kill_at=1, device_done=lambda: False)
    chaos.wait_kill(10)
    with pytest.raises(ChaosError, match="cannot kill"):
        chaos.check()
    chaos.stop()


def test_a_device_that_finishes_before_the_kill_point_fails_the_run():
    chaos = Chaos(HeldLinkBed(), {"edge1": FakeNode(), "edge2": FakeNode()}, seed=0)
    chaos.start(Counter(), kill_at=10, device_done=lambda: True)
    chaos.wait_kill(10)
    chaos.stop()
    with pytest.raises(ChaosError, match="before the kill point"):
        chaos.check()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip"), reason="needs root and iproute2 (network namespaces)")
def test_short_chaos_run_loses_nothing():
    from edgesplit.bench.chaos import run

    requests = 400
    r = run(requests=requests, progress=False, seed=1)
    assert r["sent"] == r["answered"] == requests
    assert r["lost"] == 0 and r["duplicated"] == 0
    assert r["differing_from_local"] == 0
    assert r["where"].get("edge", 0) > 0
    kills = [e for e in r["events"] if e["kind"] == "node_killed"]
    assert [e["target"] for e in kills] == ["edge1"]
    # Killed while the device was still working: at about a third of the answers, not after the end.
    assert r["node_killed_at_request"] is not None
    assert r["node_kill_at"] <= r["node_killed_at_request"] < requests
    restarts = [e for e in r["events"] if e["kind"] == "node_restarted" and e["target"] == "edge1"]
    assert restarts and restarts[0]["t"] > kills[0]["t"] and r["node_restarted"]
