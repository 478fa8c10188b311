"""Partitioner: trace any model into a graph (``graph``), enumerate its cuts and build head
and tail modules (``cuts``), count MACs (``flops``); profiles, the cost model, the optimiser
and bundles come next (issue: partitioner)."""
