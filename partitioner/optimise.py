"""Split choice: the cut with least latency or least device energy, the Pareto set, and the
DADS-style minimum s-t cut over the whole DAG.

:func:`choose` and :func:`pareto` work on the predictions of the enumerated cuts (prefixes
of one topological order). :func:`min_cut_latency` solves the placement as a minimum s-t
cut of the graph (DADS): every node either stays on the device (source side) or goes to the
edge (sink side); a node on the edge costs its edge time, one on the device its device
time, and a value produced on the device and read on the edge costs its transfer once
(bytes / bandwidth; the round trip is added once to any split, which is then compared with
running everything on the device).
Infinite reverse edges forbid sending anything back from the edge to the device, so the
device side is closed under predecessors, a valid cut even where no single topological
prefix matches it.

Example::

    >>> from edgesplit.partitioner.cost import Prediction
    >>> ps = [Prediction(0, "int8", 0.0, 0.05, 0.01, 784, 0.1), Prediction(5, "int8", 0.2, 0.0, 0.0, 0, 0.7)]
    >>> choose(ps).cut, choose(ps, "energy").cut, [p.cut for p in pareto(ps)]
    (0, 0, [0])
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import networkx as nx

from .cost import ANSWER_BYTES_PER_ELEMENT, CODEC_BYTES, INPUT_BYTES_PER_ELEMENT, Link, Prediction, cut_bytes
from .cuts import GraphCut
from .graph import ModelGraph
from .profile import Profile

OBJECTIVES = ("latency", "energy")


def choose(predictions: list[Prediction], objective: str = "latency") -> Prediction:
    """The prediction with least latency (or least device energy); ties go to the later cut."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    key = (lambda p: (p.total_s, -p.cut)) if objective == "latency" else (lambda p: (p.energy_j, p.total_s))
    # A prediction that is not a finite number must not win (NaN compares as neither less nor more)
    finite = [p for p in predictions if math.isfinite(p.total_s) and math.isfinite(p.energy_j)]
    if not finite:
        raise ValueError("no cut has a finite predicted cost: check the profiles and the link")
    return min(finite, key=key)


def undominated_cuts(cuts: list[GraphCut], codec: str = "int8") -> list[int]:
    """Cuts that can be the fastest when every node runs slower on the device than on the edge.

    Moving a node from the edge to the device then only costs time, so a cut sending at
    least as many bytes as an earlier cut never beats it: what is left is cut 0, every
    cut sending fewer bytes than all before it, and the all-on-device cut. For ResNet-18
    that is 6 of 70 cuts; a benchmark measures these instead of every prefix.
    """
    last = cuts[-1].index
    sizes = {c.index: cut_bytes(c, codec, last) for c in cuts[:-1] if c.transferable}
    return [*fewer_bytes_than_before(sizes), last]


def fewer_bytes_than_before(sizes: Mapping[int, int]) -> list[int]:
    """The cuts (in order) that send fewer bytes than every cut before them."""
    keep, fewest = [], math.inf
    for cut in sorted(sizes):
        if sizes[cut] < fewest:
            keep.append(cut)
            fewest = sizes[cut]
    return keep


def pareto(predictions: list[Prediction]) -> list[Prediction]:
    """Cuts not beaten on both latency and device energy by another cut, fastest first."""
    front = []
    for p in sorted(predictions, key=lambda p: (p.total_s, p.energy_j)):
        if not front or p.energy_j < front[-1].energy_j:
            front.append(p)
    return front


def min_cut_latency(graph: ModelGraph, device: Profile, edge: Profile, link: Link, codec: str = "int8",
                    batch: int = 1) -> tuple[float, set[str]]:
    """Least predicted latency over every device/edge placement closed under predecessors,
    and the names of the nodes that run on the device."""
    index = {name: i for i, name in enumerate(device.node_names)}
    inf = math.inf
    g = nx.DiGraph()
    source, sink = "__device__", "__edge__"
    inputs = set(graph.input_names)
    for name in inputs:  # the input is on the device
        g.add_edge(source, name, capacity=inf)
    for node in graph.nodes:
        i = index[node.name]
        g.add_edge(source, node.name, capacity=edge.seconds[batch][i])  # paid if it runs on the edge
        g.add_edge(node.name, sink, capacity=device.seconds[batch][i])  # paid if it runs on the device
    producers = {n.name: n for n in graph.nodes}
    consumers: dict[str, list[str]] = {}
    for node in graph.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node.name)
    per_element = device.encode_seconds_per_element + edge.decode_seconds_per_element
    for src, readers in consumers.items():
        if src in inputs:
            elements = sum(math.prod(s) for s in _input_shapes(graph, src))
            shape_bytes = elements * INPUT_BYTES_PER_ELEMENT
        else:
            elements = sum(math.prod(s) for s in producers[src].out_shapes)
            shape_bytes = elements * CODEC_BYTES[codec]
        relay = f"{src}__sent"  # the value is sent once, however many edge nodes read it
        g.add_edge(src, relay, capacity=batch * (shape_bytes * 8 * link.framing / (link.bandwidth_mbit * 1e6)
                                                 + elements * per_element))
        for r in readers:
            g.add_edge(relay, r, capacity=inf)
            g.add_edge(r, src, capacity=inf)  # nothing goes back from the edge to the device
    value, (device_side, _) = nx.minimum_cut(g, source, sink)
    on_device = {n for n in device_side if n in producers}
    # The round trip is paid once for any split; a cut cannot carry that fixed cost, so
    # compare with running everything on the device afterwards.
    all_device = sum(device.seconds[batch][index[n.name]] for n in graph.nodes)
    answer = batch * _output_elements(graph) * ANSWER_BYTES_PER_ELEMENT
    fixed = link.rtt_s + max(0.0, answer * link.framing - link.burst_bytes) * 8 / (link.bandwidth_mbit * 1e6)
    if len(on_device) < len(producers) and value + fixed < all_device:
        return value + fixed, on_device
    return all_device, set(producers)


def _input_shapes(graph: ModelGraph, name: str) -> list[tuple[int, ...]]:
    node = next(n for n in graph.module.graph.nodes if n.name == name)
    value = node.meta.get("value")
    return [tuple(value.shape)] if value is not None else []


def _output_elements(graph: ModelGraph) -> int:
    output = next(n for n in graph.module.graph.nodes if n.op == "output")
    values = [a.meta.get("value") for a in output.all_input_nodes]
    return sum(math.prod(v.shape) for v in values if v is not None and hasattr(v, "shape"))
