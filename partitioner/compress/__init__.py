"""Compression of split models: structured pruning (``prune``) with knowledge distillation
(``distill``), int8 post-training quantization (``quantize``), a learned bottleneck at a cut
(``bottleneck``), calibrated early exits (``exits``), and the ``edgesplit compress CONFIG``
pipeline that runs them (``pipeline``, ``config``)."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
