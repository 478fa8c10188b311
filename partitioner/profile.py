"""Per-node latency of a traced graph on this host, saved as JSON with where it was taken.

:func:`profile_graph` runs the graph node by node (an ``fx`` interpreter with a clock around
each node), after ``warmup`` runs, ``repeats`` times per batch size, and keeps each node's
median. A cut's device time is then the sum over the head's nodes, its edge time the sum
over the tail's (on the edge's own profile). A :class:`Profile` records the host, torch
version and thread count it was taken with, so profiles from different machines (a
Pi-class device, a GPU server) can be combined and never confused.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from edgesplit.partitioner.graph import trace
    >>> g = trace(nn.Sequential(nn.Linear(64, 64), nn.ReLU()), (torch.zeros(1, 64),))
    >>> p = profile_graph(g, (torch.zeros(1, 64),), batches=(1, 4), repeats=3, warmup=1)
    >>> sorted(p.seconds), len(p.seconds[1]) == len(g.nodes), p.threads == torch.get_num_threads()
    ([1, 4], True, True)
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.fx.interpreter import Interpreter

from .graph import ModelGraph

SCHEMA = 1


@dataclass
class Profile:
    """Median seconds per node (in graph order) for each batch size, and where they were taken."""

    model: str
    host: str
    torch: str
    threads: int
    cpus: int
    node_names: list[str]
    seconds: dict[int, list[float]] = field(default_factory=dict)  # batch -> per-node medians
    repeats: int = 0
    cpu_quota: float | None = None  # fraction of a core, when measured under a quota
    statistic: str = "median"  # of the repeats; "mean" under a CPU quota (see profile_graph)
    pause_s: float = 0.0  # idle time before each run
    calibrated_at: list[int] = field(default_factory=list)  # cuts whose heads were timed whole (calibrate)
    # Codec cost per crossing element on this host, where measured (the runtime fills them in).
    encode_seconds_per_element: float = 0.0
    decode_seconds_per_element: float = 0.0
    schema: int = SCHEMA

    def segment_seconds(self, start: int, stop: int, batch: int = 1) -> float:
        """Time of nodes ``start..stop`` (cut indices) at ``batch``."""
        return sum(self.seconds[batch][start:stop])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_json(Path(path).read_text(), source=str(path))

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> Profile:
        """A profile from its JSON (a file's contents, or a node's GraphProfile answer).

        Raises ValueError, naming ``source``, unless it is a profile of this schema with one
        finite, non-negative time per node for every batch size."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a JSON {type(data).__name__}, not a profile object")
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{source}: profile schema {data.get('schema')!r}, expected {SCHEMA}; profile again")
        known = {f.name for f in fields(cls)}
        missing = sorted({"model", "host", "torch", "threads", "cpus", "node_names", "seconds"} - set(data))
        unknown = sorted(set(data) - known)
        if missing or unknown:
            raise ValueError(f"{source}: not a profile ({'missing ' + ', '.join(missing) if missing else ''}"
                             f"{'; ' if missing and unknown else ''}"
                             f"{'unknown ' + ', '.join(unknown) if unknown else ''})")
        names = data["node_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{source}: node_names must be a list of node names")
        quota = data.get("cpu_quota")
        if quota is not None and not (isinstance(quota, (int, float)) and math.isfinite(quota) and quota > 0):
            raise ValueError(f"{source}: cpu_quota must be null or a fraction of a core above 0, not {quota!r}")
        for key in ("encode_seconds_per_element", "decode_seconds_per_element", "pause_s"):
            value = data.get(key, 0.0)  # a NaN here won the plan with "nan ms"; a negative one, negative totals
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{source}: {key} must be a finite number >= 0, not {value!r:.40}")
        for key in ("threads", "cpus", "repeats"):
            value = data.get(key, 0)
            if type(value) is not int or value < 0:
                raise ValueError(f"{source}: {key} must be a whole number >= 0, not {value!r:.40}")
        for key in ("model", "host", "torch", "statistic"):
            if key in data and not isinstance(data[key], str):
                raise ValueError(f"{source}: {key} must be a string, not {data[key]!r:.40}")
        data["seconds"] = _checked_seconds(data["seconds"], len(names), source)
        return cls(**data)


def _checked_seconds(seconds: object, nodes: int, source: str) -> dict[int, list[float]]:
    """``seconds`` as {batch: per-node times}, or ValueError unless every list has ``nodes`` finite times >= 0."""
    if not isinstance(seconds, dict) or not seconds:
        raise ValueError(f"{source}: seconds must map batch sizes to per-node times")
    out: dict[int, list[float]] = {}
    for key, times in seconds.items():
        try:
            batch = int(key)
        except (TypeError, ValueError):
            batch = 0
        if batch < 1:
            raise ValueError(f"{source}: batch size {key!r} in seconds is not an integer >= 1")
        if not isinstance(times, list) or len(times) != nodes:
            count = len(times) if isinstance(times, list) else "no list of"
            raise ValueError(f"{source}: batch {batch} has {count} node times for {nodes} nodes; profile again")
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
                   for t in times):
            raise ValueError(f"{source}: batch {batch} holds node times that are not finite numbers >= 0")
        out[batch] = [float(t) for t in times]
    return out


class _Timed(Interpreter):
    def __init__(self, gm, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.times: dict[str, float] = {}

    def run_node(self, n):
        if n.name not in self.names:
            return super().run_node(n)
        started = time.perf_counter()
        out = super().run_node(n)
        self.times[n.name] = time.perf_counter() - started
        return out


def median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    """Median wall seconds of ``run()`` over ``repeats`` calls, after one untimed warm-up call."""
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        run()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def profile_graph(
    graph: ModelGraph,
    example_inputs: tuple[torch.Tensor, ...],
    batches: tuple[int, ...] = (1,),
    repeats: int = 9,
    warmup: int = 3,
    model_name: str = "",
    cpu_quota: float | None = None,
    pause_s: float = 0.0,
) -> Profile:
    """Per-node latency at each batch size (inputs repeated along dimension 0).

    Each node's median over ``repeats``; with ``cpu_quota`` (the process runs under a CFS
    quota of that fraction of a core) the mean instead: the quota stalls whichever node is
    running when the period's budget runs out, a median would drop those stalls and
    predict the unthrottled speed, while means add up to the stretched time. ``pause_s``
    idles between runs, as a device does while its request is on the network: under a
    quota each run then starts with the period's budget unspent, as it will when deployed.
    """
    names = [n.name for n in graph.nodes]
    statistic = "mean" if cpu_quota else "median"
    profile = Profile(model_name or type(graph.module).__name__, platform.node(), torch.__version__,
                      torch.get_num_threads(), os.cpu_count() or 1, names, repeats=repeats, cpu_quota=cpu_quota,
                      statistic=statistic, pause_s=pause_s)
    summarise = statistics.fmean if cpu_quota else statistics.median
    wanted = set(names)
    with torch.no_grad():
        for batch in batches:
            inputs = tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() if t.dim() else t for t in example_inputs)
            runs: dict[str, list[float]] = {n: [] for n in names}
            for i in range(warmup + repeats):
                if pause_s:
                    time.sleep(pause_s)
                timed = _Timed(graph.module, wanted)
                timed.run(*inputs)
                if i >= warmup:
                    for n in names:
                        runs[n].append(timed.times.get(n, 0.0))
            profile.seconds[batch] = [summarise(runs[n]) for n in names]
    return profile


def calibrate(profile: Profile, segments: dict[int, float], batch: int = 1) -> Profile:
    """``profile`` rescaled so that the time of nodes ``0..k`` equals ``segments[k]`` for every anchor ``k``.

    Node-by-node timing has its own overhead, and under a CPU quota a whole run's timing
    depends on where the period's budget runs out, which the sum of per-node means cannot
    tell for a shorter head. Timing the real heads (compiled, not interpreted) at a few
    cuts and spreading each measured difference over the nodes between them in proportion
    to their profiled times keeps the per-node shape and makes those heads exact.
    """
    seconds = list(profile.seconds[batch])
    anchors = sorted((k, s) for k, s in segments.items() if 0 < k <= len(seconds))
    out = list(seconds)
    start, before = 0, 0.0
    for k, measured in anchors:
        span = seconds[start:k]
        share = sum(span)
        gained = max(0.0, measured - before)
        out[start:k] = ([t * gained / share for t in span] if share > 0 else [gained / len(span)] * len(span))
        start, before = k, before + gained
    calibrated = {**profile.seconds, batch: out}
    return replace(profile, seconds=calibrated, calibrated_at=sorted(segments))
