"""What a test bed leaves on disk so another process can find, operate and remove it.

One JSON file per bed under ``/run/edgesplit-testbed`` (``$EDGESPLIT_TESTBED_STATE_DIR``
overrides): its hosts and addresses, the owning process (pid and start time, so a reused
pid is not mistaken for the owner), whether it is detached (made by the CLI, lives until
``down``) and the cgroups it made. ``/run`` is a tmpfs, like the namespaces themselves, so
both vanish together on reboot.

Example::

    save(BedState("es42", {"device": "198.18.0.1"}, owner_pid=42))
    load("es42").hosts          # {'device': '198.18.0.1'}
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = Path("/run/edgesplit-testbed")
FALLBACK_STATE_DIR = Path(tempfile.gettempdir()) / "edgesplit-testbed"  # where /run is not writable


def state_dir(override: str | Path | None = None) -> Path:
    chosen = override or os.environ.get("EDGESPLIT_TESTBED_STATE_DIR")
    if chosen:
        return Path(chosen)
    if DEFAULT_STATE_DIR.is_dir() or os.access(DEFAULT_STATE_DIR.parent, os.W_OK):
        return DEFAULT_STATE_DIR
    return FALLBACK_STATE_DIR


@dataclass
class BedState:
    name: str
    hosts: dict[str, str]
    owner_pid: int
    owner_start: int | None = None
    detached: bool = False
    prefix_len: int = 24
    cgroups: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs (and, given ``start_time``, is still the same process)."""
    started = process_start_time(pid)
    if started is None:
        return False
    return start_time is None or started == start_time


def save(state: BedState, directory: str | Path | None = None) -> Path:
    folder = state_dir(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{state.name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    tmp.replace(path)
    return path


def load(name: str, directory: str | Path | None = None) -> BedState | None:
    path = state_dir(directory) / f"{name}.json"
    try:
        return BedState(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def delete(name: str, directory: str | Path | None = None) -> None:
    (state_dir(directory) / f"{name}.json").unlink(missing_ok=True)


def all_states(directory: str | Path | None = None) -> list[BedState]:
    folder = state_dir(directory)
    if not folder.is_dir():
        return []
    states = (load(p.stem, folder) for p in sorted(folder.glob("*.json")))
    return [s for s in states if s is not None]
