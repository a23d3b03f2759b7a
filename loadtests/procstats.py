"""What a benchmark reads about processes from /proc: CPU time, memory, fds, children.

Linux only, no dependencies. CPU time is ``utime + stime`` of ``/proc/<pid>/stat`` (in
clock ticks, so a reading is good to 1/``SC_CLK_TCK`` s); memory is ``VmRSS`` (now) and
``VmHWM`` (the peak) of ``/proc/<pid>/status``, in KiB. A process that is gone raises
``ProcessGone``.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


class ProcessGone(OSError):
    """The process exited (or never existed) before it could be read."""


def _read(pid: int, name: str) -> str:
    try:
        return (PROC / str(pid) / name).read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(f"process {pid} is gone") from exc


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` from field 3 (state) on: the command name may hold spaces."""
    raw = _read(pid, "stat")
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far, in seconds."""
    fields = _stat_fields(pid)
    # Fields 14 (utime) and 15 (stime) of proc(5); the list starts at field 3.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def parent_pid(pid: int) -> int:
    """The process's parent pid."""
    return int(_stat_fields(pid)[1])


def _status_kib(pid: int, key: str) -> int:
    for line in _read(pid, "status").splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])  # "VmHWM:	   51234 kB"
    raise ProcessGone(f"process {pid} has no {key} (a zombie?)")


def rss_kib(pid: int) -> int:
    """Resident memory now (``VmRSS``), KiB."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    """The most resident memory the process ever had (``VmHWM``), KiB."""
    return _status_kib(pid, "VmHWM")


def open_fds(pid: int) -> int:
    """How many file descriptors the process has open (needs the same user, or root)."""
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(f"process {pid} is gone") from exc


def fd_limit(pid: int) -> tuple[int | None, int | None]:
    """The process's (soft, hard) open-files limit; None stands for unlimited."""
    for line in _read(pid, "limits").splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return _limit(soft), _limit(hard)
    raise ProcessGone(f"process {pid} shows no open-files limit")


def _limit(text: str) -> int | None:
    return None if text == "unlimited" else int(text)


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (an nginx master's workers, say), sorted."""
    found: list[int] = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if parent_pid(int(entry.name)) == pid:
                found.append(int(entry.name))
        except (ProcessGone, OSError, ValueError, IndexError):
            continue  # exited while we looked, or unreadable
    return sorted(found)


@dataclass(frozen=True)
class FdLimit:
    """This process's open-files limit before and after ``raise_fd_limit``."""

    soft_before: int
    soft: int
    hard: int


def raise_fd_limit() -> FdLimit:
    """Raise this process's soft open-files limit to its hard limit.

    Children started afterwards (``lbstack up``, and through it every child) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return FdLimit(soft_before=soft, soft=new_soft, hard=new_hard)


@dataclass(frozen=True)
class Proc:
    """One process a benchmark watches: a readable name and its pid."""

    name: str
    pid: int


def cpu_snapshot(procs: Iterable[Proc]) -> dict[int, float | None]:
    """Every process's CPU seconds so far; None for one that is gone."""
    snapshot: dict[int, float | None] = {}
    for proc in procs:
        try:
            snapshot[proc.pid] = cpu_seconds(proc.pid)
        except ProcessGone:
            snapshot[proc.pid] = None
    return snapshot


def cpu_used(
    tiers: Mapping[str, Sequence[Proc]],
    before: Mapping[int, float | None],
    after: Mapping[int, float | None],
) -> dict[str, float | None]:
    """CPU seconds each tier used between two snapshots; None if one of its processes went."""
    used: dict[str, float | None] = {}
    for tier, procs in tiers.items():
        total = 0.0
        for proc in procs:
            start, end = before.get(proc.pid), after.get(proc.pid)
            if start is None or end is None:
                used[tier] = None
                break
            total += end - start
        else:
            used[tier] = total
    return used
