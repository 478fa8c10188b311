"""Graph analysis, cost counting and (later) cuts, pruning, quantization and bundle I/O."""
