"""Partitioner: trace any model into a graph (``graph``), enumerate its cuts and build head
and tail modules (``cuts``), profile per-node latency (``profile``), predict latency and
device energy (``cost``), choose the split (``optimise``: least latency or energy, Pareto
set, DADS minimum cut), count MACs (``flops``). Bundles and ``edgesplit plan`` come next."""
