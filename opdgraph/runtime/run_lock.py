"""The lock that keeps two runs out of one run directory: `run.lock`, holding the pid and host of its run.

It is created with O_CREAT | O_EXCL, so of two runs starting at once exactly one gets it. The other is refused,
naming the holder. A lock whose process is gone (same host, no such pid, or a pid now used by a process that
started later) is stale: a killed run leaves one. A stale lock, or one held on another host (whose process cannot be
checked from here), is taken over only when the user says so (`--take-over-lock`); a live holder on this host never.
The lock is removed when the run ends in any way but a kill -9 (opdgraph.runtime.run_directory).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from opdgraph.errors import RunDirectoryError

LOCK_NAME = "run.lock"
TAKE_OVER_FLAG = "--take-over-lock"


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (Linux): [0] the state, [19] the start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid`, which tells a reused pid from the original process."""
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    fields = _stat_fields(pid)
    if fields is None:  # no /proc here: the pid exists, so count it as alive
        return True
    started = holder.get("process_start")
    return fields[0] != "Z" and (started is None or fields[19] == started)  # a zombie holds nothing


class RunLock:
    """Held for the whole run; `release` removes it if it is still ours."""

    def __init__(self, run_dir: Path, *, take_over: bool):
        self.path = Path(run_dir) / LOCK_NAME
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self.messages: list[str] = []
        try:
            self._create()
        except FileExistsError:
            self._handle_existing(take_over)

    def _create(self) -> None:
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv, "token": self.token}
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(holder) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _handle_existing(self, take_over: bool) -> None:
        holder = self._read()
        if not holder and not self.path.exists():  # its holder just released it
            self._create()
            return
        who = (f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
               if holder else "an unknown process (the lock file is empty or unreadable)")
        same_host = holder.get("host") == socket.gethostname()
        if same_host and _alive(holder):
            raise RunDirectoryError(f"{self.path}: the run directory is in use by {who}; wait for that run to end or "
                                    f"stop it (kill {holder.get('pid')}); two runs in one directory would mix their "
                                    "logs and checkpoints")
        state = ("stale: that process is no longer running" if same_host or not holder
                 else "held on another host, whose process cannot be checked from here")
        if not take_over:
            raise RunDirectoryError(f"{self.path}: locked by {who}, {state}. If no run uses this directory, pass "
                                    f"{TAKE_OVER_FLAG} to take the lock over")
        self.path.unlink(missing_ok=True)
        try:
            self._create()
        except FileExistsError:
            raise RunDirectoryError(f"{self.path}: another run took the lock at the same time; check which runs use "
                                    "this directory") from None
        self.messages.append(f"took over the lock of {who} ({state})")

    def _read(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        if self._read().get("token") == self.token:
            self.path.unlink(missing_ok=True)
