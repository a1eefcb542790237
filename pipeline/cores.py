"""How many threads a CPU purifier gives torch: the cores its process can run on, shared with the other CPU
purifiers on the same machine.

CPU purifiers reserve no logical CPUs by default (Ray Data's own operators need them on a small machine), so Ray
does not divide the cores among them, and each would start one OpenMP thread per core. Two such processes on the
same cores run many times slower than one thread each. So each purifier registers in a folder of the machine's
temporary directory, counts the live members before every model call, and takes its share of the cores. A
container has its own temporary directory and its own CPU limit, so the share is per container, as it should be.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The container's CPU limit in cores (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process can really run on: its CPU affinity, capped by a container's CPU limit. os.cpu_count()
    counts the node's cores, so a pod limited to 4 CPUs on a 64-core node would start 64 threads and be throttled."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, int(quota)) if quota else cores)


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a live member from a later process
    that was given a dead member's pid; None where /proc cannot say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count fields after its closing parenthesis.
    return stat[stat.rindex(")") + 2:].split()[19]


def _alive(pid: int, started: str) -> bool:
    if started:
        return _start_time(pid) == started
    try:  # no /proc (not Linux): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class CoreShare:
    """This process's membership in the machine's group of CPU purifiers, and its share of the cores."""

    def __init__(self, root: Path | None = None) -> None:
        base = root if root is not None else Path(tempfile.gettempdir())
        # Per user: another user's purifiers cannot be counted (their folder is theirs), and do not write ours.
        self.folder = base / f"bbpurify-cpu-purifiers-{os.getuid() if hasattr(os, 'getuid') else 0}"
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.pid = os.getpid()
        self._entry = self.folder / str(self.pid)
        self._entry.write_text(_start_time(self.pid) or "")

    def members(self) -> int:
        """The live CPU purifiers on this machine, this one included; entries of dead ones are removed."""
        count = 1
        for entry in self.folder.iterdir():
            try:
                pid, started = int(entry.name), entry.read_text()
            except (ValueError, OSError):
                continue
            if pid == self.pid:
                continue
            if _alive(pid, started):
                count += 1
            else:
                entry.unlink(missing_ok=True)
        if not self._entry.exists():  # removed by a member that took this pid for dead: register again
            self._entry.write_text(_start_time(self.pid) or "")
        return count

    def threads(self) -> int:
        """This process's share of the usable cores (at least one thread)."""
        return max(1, usable_cores() // self.members())

    def close(self) -> None:
        """Leave the group now (a process that stays alive after its purifier is done)."""
        self._entry.unlink(missing_ok=True)
