"""Cuts of a traced graph, their crossing tensors, and head and tail modules for any cut.

A cut is a prefix of the graph's topological order: the first ``k`` compute nodes run on
the device (the head), the rest on the edge (the tail). The crossing tensors are the values
the head produces (or the graph inputs) that the tail still reads: one between blocks of a
chain, several inside a residual or inception block. A cut whose crossing values are not
all tensors (a tuple, a size) cannot travel and is marked ``transferable=False``.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from edgesplit.partitioner.graph import trace
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> g = trace(model, (torch.zeros(1, 4),))
    >>> [(c.index, c.crossing_shapes) for c in enumerate_cuts(g)]
    [(0, ((1, 4),)), (1, ((1, 8),)), (2, ((1, 8),)), (3, ((1, 2),))]
    >>> head, tail = split(g, 2)
    >>> x = torch.randn(3, 4)
    >>> bool(torch.allclose(tail(*head(x)), model(x)))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .graph import ModelGraph

_COMPUTE = ("call_function", "call_module", "call_method")


@dataclass(frozen=True)
class GraphCut:
    """Cut ``index``: the first ``index`` compute nodes form the head."""

    index: int
    after: str  # the head's last node ("input" for cut 0)
    crossing: tuple[str, ...]  # names of the values that cross, in graph order
    crossing_shapes: tuple[tuple[int, ...], ...]
    crossing_bytes: int  # as float32 on the wire, or as produced
    head_macs: int
    transferable: bool


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in _COMPUTE]


def _crossing(gm: fx.GraphModule, index: int) -> list[fx.Node]:
    compute = _compute_nodes(gm)
    head = {n for n in gm.graph.nodes if n.op == "placeholder"} | set(compute[:index])
    readers = [*compute[index:], *[n for n in gm.graph.nodes if n.op == "output"]]
    needed = {a for r in readers for a in r.all_input_nodes if a in head}
    return [n for n in gm.graph.nodes if n in needed]


def enumerate_cuts(graph: ModelGraph) -> list[GraphCut]:
    """Every prefix of the topological order, from all-on-the-edge (0) to all-on-the-device."""
    gm = graph.module
    compute = _compute_nodes(gm)
    cuts, macs = [], 0
    for index in range(len(compute) + 1):
        if index:
            macs += graph.nodes[index - 1].macs
        crossing = _crossing(gm, index)
        values = [n.meta.get("value") for n in crossing]
        tensors = all(isinstance(v, torch.Tensor) for v in values)
        shapes = tuple(tuple(v.shape) for v in values if isinstance(v, torch.Tensor))
        nbytes = sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
        after = compute[index - 1].name if index else "input"
        cuts.append(GraphCut(index, after, tuple(n.name for n in crossing), shapes, nbytes, macs, tensors))
    return cuts


def split(graph: ModelGraph, index: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Head and tail modules for cut ``index``: ``tail(*head(*inputs))`` equals the model.

    The head takes the model's inputs and returns a tuple of the crossing tensors; the tail
    takes them, in that order, and returns the model's output.
    """
    gm = graph.module
    compute = _compute_nodes(gm)
    if not 0 <= index <= len(compute):
        raise ValueError(f"cut must be in 0..{len(compute)}, not {index}")
    crossing = _crossing(gm, index)
    output = next(n for n in gm.graph.nodes if n.op == "output")

    head_graph, env = fx.Graph(), {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = head_graph.placeholder(n.name)
    for n in compute[:index]:
        _copy(head_graph, n, env)
    head_graph.output(tuple(env[c] for c in crossing))

    tail_graph, tenv = fx.Graph(), {}
    for c in crossing:
        tenv[c] = tail_graph.placeholder(c.name)
    for n in compute[index:]:
        _copy(tail_graph, n, tenv)
    result = output.args[0]
    if graph.tracer == "export" and isinstance(result, (tuple, list)) and len(result) == 1:
        result = result[0]  # export flattens outputs; a model returning one tensor returns it bare
    tail_graph.output(fx.map_arg(result, lambda a: tenv[a]))
    return fx.GraphModule(gm, head_graph), fx.GraphModule(gm, tail_graph)


def _copy(graph: fx.Graph, node: fx.Node, env: dict) -> None:
    for a in node.all_input_nodes:
        if a.op == "get_attr" and a not in env:  # parameters and buffers go wherever they are used
            env[a] = graph.get_attr(a.target)
    env[node] = graph.node_copy(node, lambda a: env[a])


def block_cuts(model, graph: ModelGraph) -> dict[int, int]:
    """Graph cut index of each block boundary of a ``SplitModel`` (its cut ``j`` -> graph cut).

    The traced graph knows nothing of blocks: the boundary after block ``j`` is found as the
    graph cut whose one crossing tensor holds exactly block ``j``'s output on a random
    input. Exits, defined at block cuts, are placed in the graph this way.
    """
    from torch.fx.interpreter import Interpreter

    torch.manual_seed(0)
    x = torch.randn(1, *model.input_shape)
    values: dict[str, torch.Tensor] = {}

    class _Recording(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                values[n.name] = out.clone()  # an in-place op later must not change what this node gave
            return out

    with torch.no_grad():
        _Recording(graph.module).run(x)
        outputs = []
        h = x
        for block in model.blocks:
            h = block(h)
            outputs.append(h)
    found = {0: 0}
    cuts = [c for c in enumerate_cuts(graph) if len(c.crossing) == 1]
    for j, out in enumerate(outputs[:-1], start=1):
        match = [c.index for c in cuts if c.index >= found[j - 1] and c.crossing[0] in values
                 and values[c.crossing[0]].shape == out.shape and torch.equal(values[c.crossing[0]], out)]
        if not match:
            raise ValueError(f"no graph cut carries the output of block {j} ({model.block_names[j - 1]})")
        found[j] = match[0]
    found[model.num_blocks] = len(graph.nodes)
    return found
