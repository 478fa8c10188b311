"""Multi-host test bed: device, edge nodes and controller in their own network namespaces.

One machine, several emulated hosts joined by a bridge, with the knobs split computing
needs: bandwidth (tbf), link failures (``ip link set down``), random loss (nftables) and
a Raspberry-Pi-like CPU (cgroup quota). Needs root; see ``deploy/testbed/README.md``.

Example::

    from edgesplit.testbed import Testbed

    with Testbed() as bed:                      # namespaces es<pid>-device, -edge1, -edge2, -controller
        bed.shape("device", rate_mbit=20)
        node = bed.exec("edge1", ["edge-node", "--host", bed.address("edge1")])
        bed.link_down("device")
    # everything it made is gone here, also after an exception or Ctrl-C
"""

from .bed import BENCHMARK_NET, DEFAULT_HOSTS, Testbed, cleanup_stale, remove, teardown_all
from .cgroups import CpuQuota
from .commands import check_available, unavailable_reason
from .errors import TestbedError, TestbedUnavailable
from .pi4 import PI4_CORE_FRACTION, PI4_CPU_FRACTION, measure_fraction

__all__ = [
    "BENCHMARK_NET",
    "DEFAULT_HOSTS",
    "PI4_CORE_FRACTION",
    "PI4_CPU_FRACTION",
    "CpuQuota",
    "Testbed",
    "TestbedError",
    "TestbedUnavailable",
    "check_available",
    "cleanup_stale",
    "measure_fraction",
    "remove",
    "teardown_all",
    "unavailable_reason",
]
