"""Partitioner: trace any model into a graph (``graph``), enumerate its cuts and build head
and tail modules (``cuts``), profile per-node latency (``profile``), predict latency and
device energy (``cost``), choose the split (``optimise``: least latency or energy, Pareto
set, DADS minimum cut), explain it (``explain``: ``edgesplit plan``), count MACs
(``flops``). Bundles and the measured split benchmark come next."""
