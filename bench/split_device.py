"""The device side of ``edgesplit bench split``: run heads, send what crosses, time each request.

Started by :mod:`edgesplit.bench.split` inside the test bed's device namespace, under the
CPU quota of a device class, pinned to one core with one torch thread. It loads the same
verified bundle as the edge node and answers one JSON command per stdin line with one JSON
line on stdout:

- ``{"op": "profile", "repeats": R, "quota": q, "pause_s": P}``: this device's per-node
  profile (means under the quota, idling ``P`` s before each run as it will while a request
  is away) and its int8 encode cost per element, as Profile JSON;
- ``{"op": "segments", "cuts": [...], "repeats": R, "pause_s": P}``: median wall seconds
  of the device's own work per cut (compiled head, encoding, building the request; the
  whole graph for the last cut), idling as above, to calibrate the per-node profile
  (:func:`edgesplit.partitioner.profile.calibrate`);
- ``{"op": "edge_profile", "repeats": R}``: the edge node's profile of the graph, asked
  of the node over ``edgesplit.v1`` ``GraphProfile`` (measured there, on its hardware);
- ``{"op": "round_trip", "cut": K, "repeats": R}``: median milliseconds of requests that
  need almost no work (the tail after cut ``K``, the last small one, from a precomputed
  crossing tensor), with the bytes that went each way: the fixed cost of any offload
  (request building, the network round trip, the node's queue and workers);
- ``{"op": "measure", "cuts": [...], "repeats": R, "warmup": W, "codec": "int8"}``: for
  each cut, wall milliseconds of head + encode + request + answer, in rounds so that
  drift spreads over every cut, idling ``pause_s`` before each (a camera's next frame);
  the all-on-device cut runs the whole graph locally;
- ``{"op": "quit"}``.

Cut 0 sends the image as one byte per pixel (int8 with a scale, the size of the uint8
pixels a camera gives); other cuts send every crossing tensor as one input of one request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from edgesplit.partitioner.bundle import load_bundle
from edgesplit.partitioner.cuts import enumerate_cuts, split
from edgesplit.partitioner.profile import profile_graph
from edgesplit.runtime import codec
from edgesplit.runtime.transport.client import EdgeClient, fetch_graph_profile
from edgesplit.runtime.transport.oip import build_infer_request

from .commands import answer_commands

TIMEOUT_S = 120.0


class DeviceSide:
    """Heads of one bundle's graph and a client of the node serving its tails."""

    def __init__(self, bundle_dir: str, target: str, graph_name: str) -> None:
        bundle = load_bundle(bundle_dir)
        self.graph = bundle.graph
        self.cuts = {c.index: c for c in enumerate_cuts(self.graph)}
        self.last = max(self.cuts)
        self.graph_name = graph_name
        torch.manual_seed(0)
        self.x = torch.randn(1, *bundle.model.input_shape)
        self.heads: dict[int, torch.nn.Module] = {}
        self.client = EdgeClient(target)

    def head(self, cut: int) -> torch.nn.Module:
        if cut not in self.heads:
            self.heads[cut] = split(self.graph, cut)[0]
        return self.heads[cut]

    def run(self, cut: int, codec_name: str) -> float:
        """One request at ``cut``: wall seconds from the image to the answer."""
        started = time.perf_counter()
        with torch.inference_mode():
            if cut == self.last:
                self.graph.module(self.x)
                return time.perf_counter() - started
            tensors = self.head(cut)(self.x) if cut else (self.x,)
            names = self.cuts[cut].crossing
            use = "int8" if cut == 0 else codec_name
            encoded = {n: codec.encode(t, use) for n, t in zip(names, tensors)}
        model = self.graph_name if cut == 0 else f"{self.graph_name}.from.{cut}"
        self.client.infer(model, encoded, timeout=TIMEOUT_S, wait_for_ready=True)
        return time.perf_counter() - started

    def measure(self, cuts: list[int], repeats: int, warmup: int, codec_name: str,
                pause_s: float) -> dict[int, list[float]]:
        times: dict[int, list[float]] = {c: [] for c in cuts}
        for round_ in range(warmup + repeats):
            for cut in cuts:
                time.sleep(pause_s)  # each frame finds the device idle, as the profile did
                seconds = self.run(cut, codec_name)
                if round_ >= warmup:
                    times[cut].append(1000 * seconds)
        return times

    def round_trip(self, cut: int, repeats: int, pause_s: float) -> dict:
        with torch.inference_mode():
            tensors = self.head(cut)(self.x)
        encoded = {n: codec.encode(t, "fp32") for n, t in zip(self.cuts[cut].crossing, tensors)}
        samples, answer = [], None
        for _ in range(repeats + 1):
            time.sleep(pause_s)
            started = time.perf_counter()
            answer = self.client.infer(f"{self.graph_name}.from.{cut}", encoded, timeout=TIMEOUT_S,
                                       wait_for_ready=True)
            samples.append(1000 * (time.perf_counter() - started))
        return {"ms": statistics.median(samples[1:]), "sent_bytes": sum(len(e.data) for e in encoded.values()),
                "answer_bytes": 4 * answer.logits.numel()}

    def segments(self, cuts: list[int], repeats: int, pause_s: float, codec_name: str) -> dict[int, float]:
        """Median wall seconds of the device's own work for each cut: the compiled head, encoding
        what crosses and building the request (the whole graph for the last cut).

        Under a CPU quota the device's work per request is not additive: once it spends
        the period's budget it waits for the next period, so the head is timed together
        with everything else the device does before the request leaves.
        """
        times: dict[int, list[float]] = {c: [] for c in cuts if c > 0}
        with torch.inference_mode():
            for round_ in range(repeats + 1):
                for cut in times:
                    time.sleep(pause_s)
                    started = time.perf_counter()
                    if cut == self.last:
                        self.graph.module(self.x)
                    else:
                        tensors = self.head(cut)(self.x)
                        encoded = {n: codec.encode(t, codec_name) for n, t in zip(self.cuts[cut].crossing, tensors)}
                        build_infer_request(f"{self.graph_name}.from.{cut}", encoded).SerializeToString()
                    if round_:
                        times[cut].append(time.perf_counter() - started)
        return {c: statistics.median(v) for c, v in times.items()}

    def profile(self, repeats: int, quota: float | None, pause_s: float) -> str:
        profile = profile_graph(self.graph, (self.x,), repeats=repeats, warmup=1, model_name=self.graph_name,
                                cpu_quota=quota, pause_s=pause_s)
        profile.encode_seconds_per_element, _ = codec.seconds_per_element()
        return profile.to_json()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--target", required=True, help="host:port of the edge node")
    p.add_argument("--graph", required=True, help="the node's name for the graph, e.g. resnet18.graph")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    side = DeviceSide(args.bundle, args.target, args.graph)
    return answer_commands({"last": side.last}, {
        "profile": lambda c: {"profile": side.profile(c["repeats"], c.get("quota"), c.get("pause_s", 0.0))},
        "segments": lambda c: {"seconds": {str(k): v for k, v in side.segments(
            c["cuts"], c["repeats"], c.get("pause_s", 0.0), c.get("codec", "int8")).items()}},
        "edge_profile": lambda c: {"profile": fetch_graph_profile(args.target, args.graph, repeats=c["repeats"])},
        "round_trip": lambda c: side.round_trip(c["cut"], c["repeats"], c.get("pause_s", 0.0)),
        "measure": lambda c: {"ms": {str(k): v for k, v in side.measure(
            c["cuts"], c["repeats"], c.get("warmup", 1), c.get("codec", "int8"), c.get("pause_s", 0.0)).items()}},
    })

if __name__ == "__main__":
    sys.exit(main())
