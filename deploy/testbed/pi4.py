"""How much of this machine's CPU behaves like a Raspberry Pi 4: the quota for a "device".

The yardstick is one fixed torch workload, ResNet-18 fp32 inference on one 224x224 image
(batch 1), for which a Raspberry Pi 4 Model B (4 x Cortex-A72, 1.5 GHz, 64-bit OS,
PyTorch's aarch64 wheel, torch's default 4 threads) has a published time:
**100.3 ms** model time per frame (PyTorch tutorial "Real Time Inference on Raspberry
Pi 4", benchmark table, row ``resnet18``).

On this machine (AMD EPYC, 2 cores, torch 2.13 CPU build) the same model,
``edgesplit.models`` ``resnet18``, takes **about 60 ms of CPU time on one thread** on an
idle machine (medians of 10 runs, ``time.thread_time``: 59.9, 58.6, 60.8 ms; 57-75 ms
while a training job kept both cores busy). A process limited to a CFS quota of ``f``
CPUs needs about ``t_here / f`` of wall time, so ``f = 0.060 / 0.100 = 0.6`` makes it
take as long as the whole Pi 4 does. Checked: under a 0.6 quota the same ResNet-18 took
a median of 100-103 ms of wall time per image.

``PI4_CPU_FRACTION`` (0.6) thus emulates a whole Pi 4 running torch on all its cores.
``PI4_CORE_FRACTION`` (0.19) is an *estimate* for one Cortex-A72 core (a device process
limited to one thread): the four cores are assumed to scale convolutions about 3.2x, so
one core would need ~320 ms and ``f ≈ 0.060 / 0.32``.
Both are plain module constants and can be overridden by environment variables
(``EDGESPLIT_PI4_CPU_FRACTION``, ``EDGESPLIT_PI4_CORE_FRACTION``); re-measure on other
hardware with :func:`measure_fraction` (``python -m edgesplit.testbed pi4``).

What a quota does not emulate: the Pi's smaller caches and lower memory bandwidth (a
memory-bound workload is faster here than the quota suggests), thermal throttling, and
the 4 cores' parallelism (a quota is time-sliced in 100 ms periods, so short requests
see jitter of up to one period). Give the throttled process one torch thread for the
most predictable timing.

Example::

    with Testbed() as bed:
        runner = bed.exec("device", [sys.executable, "device.py"], cpu=PI4_CPU_FRACTION)
"""

from __future__ import annotations

import os
import statistics
import time

PI4_REFERENCE_SECONDS = 0.1003  # ResNet-18 fp32 224x224 batch 1, Pi 4 Model B, PyTorch, 4 threads
PI4_ONE_CORE_SCALING = 3.2  # assumed speed-up of 4 A72 cores over one for ResNet-18 convolutions
MEASURED_HOST_SECONDS = 0.060  # this machine, one thread (see the module docstring)

PI4_CPU_FRACTION: float = float(os.environ.get("EDGESPLIT_PI4_CPU_FRACTION", "0.6"))
PI4_CORE_FRACTION: float = float(os.environ.get("EDGESPLIT_PI4_CORE_FRACTION", "0.19"))


def measure_host_seconds(repeats: int = 10, warmup: int = 3) -> float:
    """Median CPU seconds of one ResNet-18 inference (224x224, batch 1) on one thread here."""
    import torch

    from edgesplit.models import build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model("resnet18").eval()
        x = torch.randn(1, 3, 224, 224)
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                started = time.thread_time()
                model(x)
                if i >= warmup:
                    times.append(time.thread_time() - started)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def measure_fraction(reference_s: float = PI4_REFERENCE_SECONDS, repeats: int = 10) -> float:
    """The CPU quota that makes ResNet-18 take ``reference_s`` here (the whole Pi 4 by default).

    For one Pi core pass ``reference_s=PI4_REFERENCE_SECONDS * PI4_ONE_CORE_SCALING``.
    """
    return measure_host_seconds(repeats) / reference_s
