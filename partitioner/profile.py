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
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
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
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{path}: profile schema {data.get('schema')!r}, expected {SCHEMA}; profile again")
        data["seconds"] = {int(k): [float(x) for x in v] for k, v in data["seconds"].items()}
        return cls(**data)


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


def profile_graph(
    graph: ModelGraph,
    example_inputs: tuple[torch.Tensor, ...],
    batches: tuple[int, ...] = (1,),
    repeats: int = 9,
    warmup: int = 3,
    model_name: str = "",
    cpu_quota: float | None = None,
) -> Profile:
    """Median per-node latency at each batch size (inputs repeated along dimension 0)."""
    names = [n.name for n in graph.nodes]
    profile = Profile(model_name or type(graph.module).__name__, platform.node(), torch.__version__,
                      torch.get_num_threads(), os.cpu_count() or 1, names, repeats=repeats, cpu_quota=cpu_quota)
    wanted = set(names)
    with torch.no_grad():
        for batch in batches:
            inputs = tuple(t[:1].expand(batch, *t.shape[1:]).contiguous() if t.dim() else t for t in example_inputs)
            runs: dict[str, list[float]] = {n: [] for n in names}
            for i in range(warmup + repeats):
                timed = _Timed(graph.module, wanted)
                timed.run(*inputs)
                if i >= warmup:
                    for n in names:
                        runs[n].append(timed.times.get(n, 0.0))
            profile.seconds[batch] = [statistics.median(runs[n]) for n in names]
    return profile
