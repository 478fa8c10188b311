"""Trace any ``nn.Module`` into a graph of operations, with shapes, bytes, MACs and parameters.

:func:`trace` tries ``torch.export`` first (ATen-level operations, robust to Python-level
code) and falls back to ``torch.fx`` symbolic tracing (module-level calls). Either way the
result is a :class:`ModelGraph`: the traced ``GraphModule`` and, in topological order, its
compute nodes with their output shapes and bytes, MACs (convolutions and matrix products)
and parameter counts. A model whose control flow depends on tensor values cannot be traced
by either; :class:`GraphError` then names the module where tracing stopped.

Example::

    >>> import torch
    >>> from torch import nn
    >>> g = trace(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), (torch.zeros(1, 1, 8, 8),))
    >>> g.tracer, [n.macs for n in g.nodes], g.nodes[0].out_bytes
    ('export', [2304, 0], 1024)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn


class GraphError(ValueError):
    """A model that cannot be traced into a graph; the message names the module and what to do."""


@dataclass
class GraphNode:
    """One operation of the traced graph."""

    name: str
    op: str  # fx opcode: call_function, call_module or call_method
    target: str
    inputs: tuple[str, ...]  # names of the nodes (or graph inputs) it reads
    out_shapes: tuple[tuple[int, ...], ...]
    out_bytes: int
    macs: int = 0
    params: int = 0


@dataclass
class ModelGraph:
    """A traced model: the graph module, its inputs and its compute nodes in topological order."""

    module: fx.GraphModule
    tracer: str  # "export" or "fx"
    input_names: tuple[str, ...]
    nodes: list[GraphNode] = field(default_factory=list)

    @property
    def total_macs(self) -> int:
        return sum(n.macs for n in self.nodes)


def trace(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ModelGraph:
    """Trace ``model`` on ``example_inputs`` (torch.export, falling back to torch.fx)."""
    model = model.eval()
    try:
        # The batch dimension stays dynamic, so head and tail run on batches of any size; a
        # batch of 1 would be specialised, so export sees the example twice.
        dynamic = tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in example_inputs)
        batched = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in example_inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(model, batched, dynamic_shapes=dynamic, strict=False)
        gm, tracer = exported.module(), "export"
        _drop_input_guards(gm)
    except Exception as export_error:  # export could not: try symbolic tracing, which names modules
        gm, tracer = _fx_trace(model, export_error), "fx"
    _propagate_shapes(gm, example_inputs)
    inputs = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    graph = ModelGraph(gm, tracer, inputs)
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_module", "call_method"):
            graph.nodes.append(_describe(gm, node))
    return graph


def _drop_input_guards(gm: fx.GraphModule) -> None:
    """Remove export's input-shape assertions: they are not computation, and a head built
    from them would refuse batch sizes other than the example's."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


class _NamingTracer(fx.Tracer):
    """Symbolic tracer that remembers which module it is inside, to name it in errors."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None  # the innermost module being traced when tracing failed

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(f"{self.path_of_module(m) or '<root>'} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _fx_trace(model: nn.Module, export_error: Exception) -> fx.GraphModule:
    tracer = _NamingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_in or f"<root> ({type(model).__name__})"
        raise GraphError(
            f"cannot trace {type(model).__name__}: module {where} has control flow that depends on tensor values "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). torch.export failed first with "
            f"{type(export_error).__name__}. Make the branch a tensor operation (torch.where, masking) or "
            "split the model by hand before that module."
        ) from None
    return fx.GraphModule(tracer.root, graph)


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Record every node's output value (as meta 'value') by running the graph once."""
    from torch.fx.interpreter import Interpreter

    class Recorder(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["value"] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*example_inputs)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _describe(gm: fx.GraphModule, node: fx.Node) -> GraphNode:
    outs = _tensors(node.meta.get("value"))
    shapes = tuple(tuple(t.shape) for t in outs)
    nbytes = sum(t.numel() * t.element_size() for t in outs)
    inputs = tuple(a.name for a in node.all_input_nodes if a.op != "get_attr")
    macs, params = _cost(gm, node, outs)
    return GraphNode(node.name, node.op, _target_name(node), inputs, shapes, nbytes, macs, params)


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _cost(gm: fx.GraphModule, node: fx.Node, outs: list[torch.Tensor]) -> tuple[int, int]:
    """MACs (per the whole example batch) and parameters of one node."""
    params = sum(math.prod(a.meta["value"].shape) for a in node.all_input_nodes
                 if a.op == "get_attr" and isinstance(a.meta.get("value"), torch.Tensor))
    if not outs:
        return 0, params
    out = outs[0]
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, nn.Conv2d):
            return out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size), params
        if isinstance(m, nn.Linear):
            return out.numel() * m.in_features, params
        return 0, params
    name = _target_name(node)
    if node.op == "call_function" and name.startswith(("conv2d", "convolution")):
        weight = node.args[1].meta["value"]
        return out.numel() * math.prod(weight.shape[1:]), params
    if node.op == "call_function" and name.startswith(("linear", "addmm", "mm", "matmul", "bmm")):
        first = node.args[1 if name.startswith("addmm") else 0].meta["value"]
        return out.numel() * first.shape[-1], params
    if node.op == "call_function" and node.target in (torch.nn.functional.conv2d, torch.conv2d):
        weight = node.args[1].meta["value"]
        return out.numel() * math.prod(weight.shape[1:]), params
    if node.op == "call_function" and node.target in (torch.nn.functional.linear,):
        return out.numel() * node.args[1].meta["value"].shape[-1], params
    return 0, params
