"""CPU quotas with cgroups: make a process (and its children) run on a fraction of a CPU.

cgroup v1 (``/sys/fs/cgroup/cpu``, ``cpu.cfs_period_us`` / ``cpu.cfs_quota_us``) is used when
it is mounted; otherwise cgroup v2 (``cpu.max``) when its ``cpu`` controller is available.
A quota of ``fraction`` lets the group run ``fraction x period`` of CPU time per period in
total over all its threads: 0.5 is half of one core, 2.0 two full cores.

Example::

    quota = CpuQuota.create("es42-cpu0", fraction=0.25)
    quota.add(pid)            # the process and the threads/children it starts later
    quota.remove()            # members go back to the parent cgroup, the directory is removed
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from .errors import TestbedError, TestbedUnavailable

V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PERIOD_US = 100_000  # the kernel's default CFS period
MIN_QUOTA_US = 1_000  # the kernel refuses a smaller cfs_quota_us
BUDGET_PER_PERIOD_US = 5_000
MAX_FRACTION = 1024.0  # cores: a quota beyond any machine's is a mistake


def smooth_period_us(fraction: float) -> int:
    """The CFS period for emulating a slower CPU with a quota of ``fraction`` of a core.

    Two effects pull against each other. Under a long period (the kernel's 100 ms) a
    process limited to 0.6 of a core runs a 45 ms inference at full speed, since it never
    uses up its 60 ms budget. Under a very short one the budget per period drops below the
    scheduler tick, which enforces it: a 1 ms budget (0.05 of a core, 20 ms period) was
    overrun erratically, MobileNetV2 taking 560-640 ms instead of ~320 ms and a 3 ms model
    3-80 ms. The period here gives every period a budget of 5 ms (at least 5 ms long):
    8.3 ms at 0.6, 33 ms at 0.15, 100 ms at 0.05 (docs/partitioner.md, "device classes").
    """
    if not fraction > 0:
        raise ValueError(f"fraction must be positive, not {fraction!r}")
    return min(1_000_000, max(BUDGET_PER_PERIOD_US, math.ceil(BUDGET_PER_PERIOD_US / min(fraction, 1.0))))


def cpu_root() -> tuple[Path, int]:
    """Where CPU cgroups are made and the cgroup version: (path, 1) or (path, 2)."""
    override = os.environ.get("EDGESPLIT_CGROUP_CPU_ROOT")
    if override:
        root = Path(override)
        return root, 1 if (root / "cpu.cfs_quota_us").exists() else 2
    if (V1_ROOT / "cpu.cfs_quota_us").exists():
        return V1_ROOT, 1
    controllers = V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return V2_ROOT, 2
    raise TestbedUnavailable(
        "no CPU cgroup controller: neither cgroup v1 /sys/fs/cgroup/cpu nor a cgroup v2 'cpu' controller is available"
    )


class CpuQuota:
    """One cgroup with a CPU quota, made by this module (``create``) or an existing one (``open``)."""

    def __init__(self, path: Path, version: int, owned: bool) -> None:
        self.path = Path(path)
        self.version = version
        self.owned = owned  # made here: remove() deletes it
        self.fraction: float | None = None
        self.period_us = DEFAULT_PERIOD_US

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, name: str, fraction: float, period_us: int = DEFAULT_PERIOD_US) -> CpuQuota:
        """Make cgroup ``name`` under the CPU root (or reuse it) with quota ``fraction``."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"cgroup name {name!r} must be letters, digits, '.', '_' or '-'")
        root, version = cpu_root()
        path = root / name
        try:
            if version == 2:
                _enable_v2_cpu(root)
            path.mkdir(exist_ok=True)
        except PermissionError:
            raise TestbedUnavailable(f"cannot create {path}: CPU quotas need root") from None
        quota = cls(path, version, owned=True)
        try:
            quota.set(fraction, period_us)
        except BaseException:
            quota.remove()  # a refused setting leaves no empty cgroup behind
            raise
        return quota

    @classmethod
    def open(cls, path: str | Path) -> CpuQuota:
        """An existing cgroup directory (not removed by ``remove``)."""
        path = Path(path)
        root, _ = cpu_root()
        if not path.is_dir() or not path.resolve().is_relative_to(root.resolve()) or path.resolve() == root.resolve():
            raise TestbedError(f"{path} is not a cgroup directory under {root}")
        return cls(path, 1 if (path / "cpu.cfs_quota_us").exists() else 2, owned=False)

    def set(self, fraction: float, period_us: int | None = None) -> None:
        """Allow ``fraction`` of one CPU per period, summed over all threads (2.0 = two cores)."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= MAX_FRACTION:
            raise ValueError(f"fraction must be a number above 0 and at most {MAX_FRACTION} cores "
                             f"(0.5 = half a core), not {fraction!r}")
        period = int(period_us or self.period_us)
        if not 1000 <= period <= 1_000_000:
            raise ValueError(f"period_us must be within 1000..1000000, not {period}")
        quota = max(MIN_QUOTA_US, round(fraction * period))
        if self.version == 1:
            (self.path / "cpu.cfs_period_us").write_text(str(period))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (self.path / "cpu.max").write_text(f"{quota} {period}")
        self.fraction, self.period_us = fraction, period

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup; its future children follow."""
        # 0 would move the writer itself (the calling process) and True is pid 1, init
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"pid must be a process id (a positive integer), not {pid!r}")
        try:
            (self.path / "cgroup.procs").write_text(str(int(pid)))
        except ProcessLookupError:
            raise TestbedError(f"no process {pid} to put under a CPU quota") from None

    def pids(self) -> list[int]:
        """Processes in this cgroup now."""
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def remove(self) -> None:
        """Move members back to the parent cgroup and delete the directory (only if made here)."""
        if not self.owned:
            return
        remove_cgroup(self.path)


def remove_cgroup(path: Path, timeout_s: float = 5.0) -> bool:
    """Empty ``path`` into its parent and rmdir it; False if it did not exist."""
    path = Path(path)
    if not path.is_dir():
        return False
    deadline = time.monotonic() + timeout_s
    while True:
        for pid in _read_pids(path):
            try:
                (path.parent / "cgroup.procs").write_text(str(pid))
            except (ProcessLookupError, OSError):
                pass  # exited meanwhile, or a zombie: it leaves on its own
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:  # EBUSY while members exit
            if time.monotonic() > deadline:
                raise TestbedError(f"cannot remove cgroup {path}: {exc}; processes left: {_read_pids(path)}") from None
            time.sleep(0.05)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def _enable_v2_cpu(root: Path) -> None:
    control = root / "cgroup.subtree_control"
    if "cpu" not in control.read_text().split():
        control.write_text("+cpu")


def list_cgroups(pattern: str) -> list[Path]:
    """Cgroup directories directly under the CPU root whose name matches regex ``pattern``."""
    try:
        root, _ = cpu_root()
    except TestbedUnavailable:
        return []
    regex = re.compile(pattern)
    return sorted(p for p in root.iterdir() if p.is_dir() and regex.match(p.name))
