"""The device side of ``edgesplit bench controller``: a DeviceRunner under a plan or the
embedded controller, in the test bed's device namespace under a CPU quota.

JSON commands on stdin, one JSON answer per line on stdout:

- ``{"op": "profile", "repeats": R, "pause_s": P, "edge": [seconds per block], "cuts": [...]}``:
  time the device's own work at each of ``cuts`` (blocks, encoding int8, building the
  request), idling ``P`` before each run; build the controller's plan space from it and
  the edge's per-block times, choosing among ``cuts``; answer the milliseconds per cut;
- ``{"op": "restrict", "cuts": [...]}``: the controller's plan space chooses among these
  cuts only (after ``profile``);
- ``{"op": "static", "plans": [[cut, codec], ...], "repeats": R, "pause_s": P}``: the
  milliseconds of ``R`` requests under each fixed plan over the current link (the table
  the oracle reads);
- ``{"op": "run", "mode": "adaptive" | [cut, codec], "duration_s": D, "pause_s": P}``:
  requests one after another for ``D`` seconds (idling ``P`` before each, like frames of a
  camera), each recorded with its time, latency, plan epoch, cut and where it ran; the
  adaptive mode also reports the controller's decisions;
- ``{"op": "turns", "plans": [[cut, codec], ...], "duration_s": D, "pause_s": P}``: the
  adaptive runner and a runner of each fixed plan take turns (a request of one, idle, a
  request of the next) for ``D`` seconds, so all see the same link and the same host within
  a round; the controller sees only its own runner's answers, and its probes are held off
  while a fixed plan's request runs; answers ``{"adaptive": run, "static": [run, ...]}``;

every idle is jittered (:meth:`Device.idle`);
- ``{"op": "quit"}``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from edgesplit.models import build_model
from edgesplit.partitioner.profile import Profile
from edgesplit.runtime import codec as codecs
from edgesplit.runtime.control.controller import EmbeddedController
from edgesplit.runtime.control.estimators import LinkEstimator
from edgesplit.runtime.control.policy import Hysteresis, LeastLatency, PlanSpace
from edgesplit.runtime.device.runner import DeviceRunner
from edgesplit.runtime.plan import Plan
from edgesplit.runtime.transport.client import EdgeClient
from edgesplit.runtime.transport.oip import build_infer_request

from .commands import answer_commands

CODECS = ("int8",)


class Device:
    def __init__(self, model_name: str, target: str) -> None:
        torch.manual_seed(0)
        self.model = build_model(model_name).eval()
        self.client = EdgeClient(target)
        self.x = torch.randn(1, *self.model.input_shape)
        self.space: PlanSpace | None = None
        self._rng = random.Random(0)

    def idle(self, pause_s: float) -> None:
        """Idle between requests for ``pause_s`` on average, uniformly 0.5-1.5 times it.

        A fixed pause that is a multiple of the CFS period keeps each request starting at
        the same phase of the period, so a run of requests all wait out the same number of
        periods and a run's mean stays off by up to a period; a jittered one samples every
        phase, as a camera's frames would."""
        time.sleep(pause_s * (0.5 + self._rng.random()))

    def runner(self, plan: Plan) -> DeviceRunner:
        return DeviceRunner(self.model, plan=plan, client=self.client, deadline_s=30.0)

    def profile(self, repeats: int, pause_s: float, edge_block_s: list[float], cuts: list[int]) -> dict[str, float]:
        """Milliseconds of the device's work at each candidate cut, as measured here.

        Each candidate's head (blocks, int8 encoding, building the request) is timed whole
        ``repeats`` times after idling ``pause_s``; the mean is kept, as the latency the
        controller predicts is an average. Under a quota single runs jump by whole CFS
        periods, so the means are made monotone in the cut by pooling adjacent violators
        (a longer head cannot take less time), not by carrying an unlucky maximum forward.
        """
        model = self.model
        cuts = sorted(set(cuts) | {0})
        means = [0.0]
        with torch.inference_mode():
            for cut in cuts[1:]:
                times = []
                for i in range(repeats + 1):
                    self.idle(pause_s)
                    started = time.perf_counter()
                    h = model.run(self.x, 0, cut)
                    if cut < model.num_blocks:
                        enc = codecs.encode(h, "int8")
                        build_infer_request(f"{model.name}.from.{cut}", {"input": enc}).SerializeToString()
                    if i:
                        times.append(time.perf_counter() - started)
                means.append(statistics.fmean(times))
        heads = pool_adjacent_violators(means)
        # Per-block times that add up to the measured heads at the candidate cuts (spread
        # evenly between them: only candidate cuts are ever chosen).
        per_block = [0.0] * model.num_blocks
        for (a, ta), (b, tb) in zip(zip(cuts, heads), zip(cuts[1:], heads[1:])):
            for k in range(a, b):
                per_block[k] = (tb - ta) / (b - a)
        names = list(model.block_names)
        device = Profile(model.name, "device", torch.__version__, 1, 1, names, {1: per_block}, statistic="mean",
                         pause_s=pause_s, calibrated_at=cuts)
        edge = Profile(model.name, "edge", torch.__version__, 1, 1, names, {1: edge_block_s})
        shapes = [c.shape for c in model.cut_points()]
        self.space = PlanSpace(device, edge, shapes, codecs=CODECS, allowed_cuts=cuts)
        return {str(c): round(1000 * t, 3) for c, t in zip(cuts, heads)}

    def restrict(self, cuts: list[int]) -> list[int]:
        """The controller's plans from now on: ``cuts`` only (each must have been profiled)."""
        if self.space is None:
            raise ValueError("restrict comes after profile")
        unknown = set(cuts) - self.space.allowed_cuts
        if not cuts or unknown:
            raise ValueError(f"cuts {sorted(unknown) or cuts} are not among the profiled "
                             f"{sorted(self.space.allowed_cuts)}")
        space = self.space
        self.space = PlanSpace(space.device, space.edge, space.shapes, codecs=CODECS, allowed_cuts=cuts)
        return sorted(self.space.allowed_cuts)

    def static(self, plans: list[list], repeats: int, pause_s: float) -> dict[str, list[float]]:
        """Milliseconds of ``repeats`` requests (after one warm-up each) under each fixed plan.

        The plans take turns, a request each, rather than running their requests in a block:
        a slow spell of the host then lands on every plan instead of on one (all on the
        device once measured 174-239 ms in its block at 2 Mbit/s and 82-156 ms in the next)."""
        runners = {f"{cut}:{codec}": self.runner(Plan(cut=cut, codec=codec)) for cut, codec in plans}
        out: dict[str, list[float]] = {label: [] for label in runners}
        for i in range(repeats + 1):
            for label, runner in runners.items():
                self.idle(pause_s)
                answer = runner.infer(self.x)
                if i:
                    out[label].append(round(1000 * answer.latency.total, 3))
        return out

    def adaptive(self) -> tuple[DeviceRunner, EmbeddedController]:
        """A runner under the embedded controller, starting all on the device, probing.

        Probes back off to 2 s at most while they change nothing, not the default 8 times the
        interval: a rise after a long flat stretch is only seen by the next probe, and on an
        amazon trace the controller offloaded 8 s after the link went from 0.9 to 4.5 Mbit/s
        (a probe costs this device a few ms of CPU)."""
        runner = self.runner(Plan(cut=self.model.num_blocks, codec="int8"))
        controller = EmbeddedController(runner, self.space, Hysteresis(LeastLatency(), margin=0.1, hold=2),
                                        estimator=LinkEstimator(initial_mbit=1.0, initial_rtt_s=0.01),
                                        every=2, probe_interval_s=1.0, max_probe_interval_s=2.0,
                                        history=None)  # the run's whole log
        controller.decide()
        controller.start_probing()
        return runner, controller

    def run(self, mode, duration_s: float, pause_s: float) -> dict:
        if mode == "adaptive":
            runner, controller = self.adaptive()
        else:
            runner, controller = self.runner(Plan(cut=int(mode[0]), codec=mode[1])), None
        return self._drive([(runner, controller)], duration_s, pause_s)[0]

    def turns(self, plans: list[list], duration_s: float, pause_s: float) -> dict:
        adaptive = self.adaptive()
        fixed = [(self.runner(Plan(cut=int(cut), codec=codec)), None) for cut, codec in plans]
        runs = self._drive([adaptive, *fixed], duration_s, pause_s, quiet=adaptive[1].probe_lock)
        return {"adaptive": runs[0], "static": runs[1:]}

    def _drive(self, turns, duration_s: float, pause_s: float, quiet=None) -> list[dict]:
        """Requests for ``duration_s``, the runners of ``turns`` ([(runner, controller or
        None)]) taking turns. ``quiet`` (the controller's probe lock) is held through the turns
        of runners without a controller, idles included, from the moment the controller's
        runner has its answer (taken by a first observer, before the controller hears of it)
        until that runner's next turn begins: a probe, due right after an answer, then runs
        in that runner's own pause and beside its own next request, as on a device that runs
        nothing else, and never in a fixed plan's turn (in the run of 13:38 on 2026-12-07,
        which let a probe start in the pause before a fixed plan's turn and made that turn
        wait for it and one CFS period more, the adaptive runner answered 1.4 ms faster on
        average than the fixed plan running the very same plan). Every runner has at least
        one turn, however long the first ones take (a first request slowed by the
        controller's first probe under a 0.05-core quota once used up a short window, and the
        fixed plan beside it had no request to compare)."""
        runs = [{"records": [], "sent": 0} for _ in turns]
        held = False

        def take(_answer=None) -> None:
            nonlocal held
            if not held:
                quiet.acquire()
                held = True

        watched = next((r for r, c in turns if c is not None), None) if quiet is not None else None
        if watched is not None:
            take()
            watched.observers.insert(0, take)
        started = time.monotonic()
        turn = 0
        try:
            while time.monotonic() - started < duration_s or not all(run["records"] for run in runs):
                (runner, controller), run = turns[turn], runs[turn]
                turn = (turn + 1) % len(turns)
                if runner is watched and held:
                    quiet.release()
                    held = False
                self.idle(pause_s)
                run["sent"] += 1
                at = time.monotonic() - started
                answer = runner.infer(self.x)  # the watched runner's answer took the lock again
                record = {"t": round(at, 4), "ms": round(1000 * answer.latency.total, 3),
                          "cut": answer.cut, "epoch": answer.epoch, "where": answer.where,
                          "error": answer.offload_error, "raced": answer.raced, "exit": answer.exit}
                if controller is not None:
                    # what it believed of the link once it had this answer (a probe ending just
                    # then may or may not be in it yet)
                    record["est_mbit"] = round(controller.estimator.bandwidth_mbit, 3)
                run["records"].append(record)
        finally:
            if watched is not None:
                watched.observers.remove(take)
                if held:
                    quiet.release()
            for _, controller in turns:
                if controller is not None:
                    controller.close()
        for (_, controller), run in zip(turns, runs):
            run["probes"] = 0 if controller is None else controller.probes
            run["decisions"] = [] if controller is None else [
                {"t": round(d.at - started, 3), "epoch": d.epoch, "cut": d.cut, "codec": d.codec,
                 "bandwidth_mbit": round(d.bandwidth_mbit, 3), "rtt_ms": round(d.rtt_ms, 2),
                 "predicted_ms": round(d.predicted_ms, 2), "device_scale": round(d.device_scale, 3),
                 "edge_extra_ms": round(d.edge_extra_ms, 2),
                 "explore": d.explore, "ends_trial": d.ends_trial,
                 "offload_deadline_ms": None if d.offload_deadline_s is None else round(1000 * d.offload_deadline_s, 1)}
                for d in controller.decisions]
        return runs


def pool_adjacent_violators(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in least squares (isotonic regression)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--target", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = Device(args.model, args.target)
    hello = {"blocks": device.model.num_blocks, "bytes": [c.numel for c in device.model.cut_points()]}
    return answer_commands(hello, {
        "profile": lambda c: {"heads_ms": device.profile(c["repeats"], c["pause_s"], c["edge"], c["cuts"])},
        "restrict": lambda c: {"cuts": device.restrict(c["cuts"])},
        "static": lambda c: {"samples_ms": device.static(c["plans"], c["repeats"], c["pause_s"])},
        "run": lambda c: device.run(c["mode"], c["duration_s"], c["pause_s"]),
        "turns": lambda c: device.turns(c["plans"], c["duration_s"], c["pause_s"]),
    })

if __name__ == "__main__":
    sys.exit(main())
