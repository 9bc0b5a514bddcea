"""The lock that keeps two runs out of one run directory: `run.lock`, holding the pid and host of its run.

The lock is written whole into a temporary file beside it, fsynced, then hard-linked to `run.lock`: the link fails
when the lock exists, so of two runs starting at once exactly one gets it, and no reader ever sees a lock being
written (empty or half). The other run is refused, naming the holder. A lock whose process is gone (same host, no
such pid, or a pid now used by a process that started later) is stale: a killed run leaves one. A stale lock, or one
held on another host (whose process cannot be checked from here), is taken over only when the user says so
(`--take-over-lock`); a live holder on this host never, and neither is a lock that cannot be read (empty or cut
short: nothing here writes one, so it may be another program's lock being written; the user deletes it by hand).

Taking over renames the stale lock aside, checks that the file renamed is the very one judged stale (a run that took
it over meanwhile keeps its lock), then links ours. The lock is removed when the run ends in any way but a kill -9
(opdgraph.runtime.run_directory); temporary lock files a kill left are removed by the next run that gets the lock.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from opdgraph.errors import RunDirectoryError
from opdgraph.runtime.durable import fsync_dir

LOCK_NAME = "run.lock"
TAKE_OVER_FLAG = "--take-over-lock"
# .run.lock.<host>.<pid>.<ns>.new (ours being written) or .stale (a stale lock renamed aside): pid says whose
TEMPORARY = re.compile(rf"\.{re.escape(LOCK_NAME)}\.(?P<host>.+)\.(?P<pid>\d+)\.\d+\.(new|stale)")
ATTEMPTS = 3  # a lock released between our link and our look: try again, a few times


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


def _alive(pid: int, started: str | None = None) -> bool:
    if pid <= 0:
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
    return fields[0] != "Z" and (started is None or fields[19] == started)  # a zombie holds nothing


def _parse(data: bytes) -> dict | None:
    """The holder a lock names, or None when the bytes are not a lock this module wrote."""
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or not isinstance(holder.get("host"),
                                                                                                 str):
        return None
    return holder


class RunLock:
    """Held for the whole run; `release` removes it if it is still ours."""

    def __init__(self, run_dir: Path, *, take_over: bool):
        self.path = Path(run_dir) / LOCK_NAME
        self.host = socket.gethostname()
        self.token = f"{self.host}:{os.getpid()}:{time.time_ns()}"
        self.messages: list[str] = []
        holder = {"pid": os.getpid(), "host": self.host, "process_start": _process_start(os.getpid()),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": sys.argv, "token": self.token}
        self.content = (json.dumps(holder) + "\n").encode()
        temp = self._temporary("new")
        with open(temp, "xb") as handle:
            handle.write(self.content)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            self._acquire(temp, take_over)
        finally:
            temp.unlink(missing_ok=True)
        self._remove_leftovers()

    def _temporary(self, kind: str) -> Path:
        return self.path.with_name(f".{LOCK_NAME}.{self.host}.{os.getpid()}.{time.time_ns()}.{kind}")

    def _link(self, temp: Path) -> bool:
        """Make the whole lock in `temp` ours, atomically; False when a lock exists."""
        try:
            os.link(temp, self.path)
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise
            return self._create_in_two_steps()
        fsync_dir(self.path.parent)
        return True

    def _create_in_two_steps(self) -> bool:
        """For a filesystem without hard links: a reader may see this lock empty for a moment, which is safe only
        because an unreadable lock is never taken over (`_judge`)."""
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(self.content)
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.path.parent)
        return True

    def _acquire(self, temp: Path, take_over: bool) -> None:
        for _ in range(ATTEMPTS):
            if self._link(temp):
                return
            try:
                with open(self.path, "rb") as handle:
                    seen, data = os.fstat(handle.fileno()), handle.read()
            except FileNotFoundError:  # its holder just released it
                continue
            holder = _parse(data)
            who, state = self._judge(holder)
            if not take_over:
                raise RunDirectoryError(f"{self.path}: locked by {who}, {state}. If no run uses this directory, "
                                        f"pass {TAKE_OVER_FLAG} to take the lock over")
            if self._take_over(temp, seen, data):
                self.messages.append(f"took over the lock of {who} ({state})")
                return
        raise RunDirectoryError(f"{self.path}: other runs took and released the lock {ATTEMPTS} times while this "
                                "one tried; check which runs use this directory, then start again")

    def _judge(self, holder: dict | None) -> tuple[str, str]:
        """(who holds it, why it may be taken over); RunDirectoryError when it must not be."""
        if holder is None:
            raise RunDirectoryError(f"{self.path}: the lock file is empty or unreadable (not written by opdgraph "
                                    "as it is, or still being written); if no run uses this directory, delete "
                                    f"{self.path} and start again")
        who = f"pid {holder['pid']} on host {holder['host']} (started {holder.get('started')})"
        if holder["host"] != self.host:
            return who, "held on another host, whose process cannot be checked from here"
        if _alive(holder["pid"], holder.get("process_start")):
            raise RunDirectoryError(f"{self.path}: the run directory is in use by {who}; wait for that run to end or "
                                    f"stop it (kill {holder['pid']}); two runs in one directory would mix their "
                                    "logs and checkpoints")
        return who, "stale: that process is no longer running"

    def _take_over(self, temp: Path, seen: os.stat_result, data: bytes) -> bool:
        """Replace the lock judged stale (`seen`, holding `data`) by ours; False when it was released meanwhile."""
        aside = self._temporary("stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = os.stat(aside)
        if (moved.st_dev, moved.st_ino) != (seen.st_dev, seen.st_ino) or aside.read_bytes() != data:
            try:  # another run took the stale lock over first: give its lock back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink()
            raise RunDirectoryError(f"{self.path}: another run took the lock over at the same time; check which "
                                    "runs use this directory")
        won = self._link(temp)
        aside.unlink()
        if not won:
            raise RunDirectoryError(f"{self.path}: another run took the lock at the same time; check which runs use "
                                    "this directory")
        return True

    def _remove_leftovers(self) -> None:
        """Temporary lock files of killed processes on this host (a kill between writing one and removing it)."""
        for path in self.path.parent.glob(f".{LOCK_NAME}.*"):
            match = TEMPORARY.fullmatch(path.name)
            if match and match["host"] == self.host and not _alive(int(match["pid"])):
                path.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            ours = self.path.read_bytes() == self.content
        except FileNotFoundError:
            return
        if ours:
            self.path.unlink(missing_ok=True)
