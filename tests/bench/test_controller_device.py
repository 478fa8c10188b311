"""The controller benchmark's device driver: how the adaptive runner's probes are kept out
of the fixed plans' turns (stand-in runners: only the turn-taking is under test here; the
real runners, link and node run in tests/bench/test_controller.py's short run)."""

import random
import threading
from types import SimpleNamespace

from edgesplit.bench.controller_device import Device


class TurnRunner:
    """Answers at once and notes whether the probe lock was held as its request ran."""

    def __init__(self, name: str, lock: threading.Lock, seen: list) -> None:
        self.name, self.lock, self.seen = name, lock, seen
        self.observers = []

    def infer(self, _x):
        self.seen.append((self.name, self.lock.locked()))
        answer = SimpleNamespace(latency=SimpleNamespace(total=0.001), cut=1, epoch=0, where="device",
                                 offload_error=None, raced=False, exit="final")
        for observe in self.observers:
            observe(answer)
        self.seen.append((f"{self.name} answered", self.lock.locked()))
        return answer


class StandInController:
    """Hears its runner's answers after whatever the driver put first, as the real one does
    (it appends its observer when made), and notes whether the probe lock was held then."""

    probes = 0
    decisions = ()

    def __init__(self, runner: TurnRunner) -> None:
        self.estimator = SimpleNamespace(bandwidth_mbit=1.5)
        self.heard_locked: list[bool] = []
        runner.observers.append(lambda _answer: self.heard_locked.append(runner.lock.locked()))

    def close(self) -> None:
        pass


def test_the_probe_lock_is_held_from_the_adaptive_answer_until_its_next_turn():
    lock, seen = threading.Lock(), []
    device = Device.__new__(Device)  # no model, no node: the turns alone
    device.x, device._rng = None, random.Random(0)
    adaptive = TurnRunner("adaptive", lock, seen)
    controller = StandInController(adaptive)
    fixed = [TurnRunner(f"fixed{i}", lock, seen) for i in range(2)]
    runs = device._drive([(adaptive, controller), *((r, None) for r in fixed)], duration_s=0.05,
                         pause_s=0.0, quiet=lock)
    assert all(run["records"] for run in runs)
    assert {r.get("est_mbit") for r in runs[0]["records"]} == {1.5}  # the adaptive runner's records only
    assert not any("est_mbit" in r for run in runs[1:] for r in run["records"])
    requests = [(name, locked) for name, locked in seen if not name.endswith("answered")]
    assert {name for name, _ in requests} == {"adaptive", "fixed0", "fixed1"}
    # A probe may run in the adaptive runner's own pause and beside its request, never in a fixed turn.
    assert all(locked for name, locked in requests if name != "adaptive")
    assert not any(locked for name, locked in requests if name == "adaptive")
    # Taken again before the controller hears the answer: a probe it starts waits for the next turn.
    assert controller.heard_locked and all(controller.heard_locked)
    assert all(locked for name, locked in seen if name == "adaptive answered")
    assert not lock.locked() and len(adaptive.observers) == 1  # the driver's own observer is gone


def test_restrict_leaves_the_controller_only_the_given_cuts():
    import pytest

    from edgesplit.runtime.control.policy import State

    device = Device("resnet_fm", "127.0.0.1:1")  # no node needed: nothing is sent
    blocks = device.model.num_blocks
    with pytest.raises(ValueError):
        device.restrict([blocks])  # before any profile
    device.profile(repeats=1, pause_s=0.0, edge_block_s=[0.001] * blocks, cuts=[4, 8, blocks])
    assert device.space.allowed_cuts == {0, 4, 8, blocks}
    assert device.restrict([8, blocks]) == [8, blocks]
    assert {o.cut for o in device.space.options(State(2.0, 0.01))} == {8, blocks}
    with pytest.raises(ValueError):
        device.restrict([5])  # not profiled
    assert device.space.allowed_cuts == {8, blocks}
