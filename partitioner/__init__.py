"""Partitioner: trace any model into a graph (``graph``), enumerate its cuts and build head
and tail modules (``cuts``), profile per-node latency (``profile``), count MACs (``flops``);
the cost model, the optimiser and bundles come next (issue: partitioner)."""
