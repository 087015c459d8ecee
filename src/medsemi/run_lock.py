"""Which process is training in a run directory: ``run.lock``.

``medsemi train`` writes ``run.lock`` (JSON: pid, host, start time) while it trains and removes it when
training ends, however it ends short of a hard kill. It serves two purposes:

- a second ``medsemi train`` (fresh or ``--resume``) on the same directory, on the same machine, while the
  first still runs, is refused instead of both writing the same checkpoints;
- ``medsemi runs`` can tell a run that is training from one that was interrupted.

A lock left by a process that no longer exists (killed, machine restarted) is stale and is taken over.
A lock written on another machine cannot be checked from here (a shared filesystem, e.g. a cluster job
requeued on another node): training takes it over with a warning, since refusing would block the
requeue. On Windows no pid is probed (``os.kill`` would terminate it), so locks count as uncheckable.
The trainer touches the file at every log line, so its modification time is the run's last sign of life.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process on this machine is training in the run directory."""


@dataclass
class LockHolder:
    pid: int
    host: str
    started: str
    path: Path

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """Whether the holder still runs: True / False on this machine, None where it cannot be checked
        (another machine; Windows, where ``os.kill`` terminates instead of probing)."""
        if not self.here:
            return None
        if self.pid == os.getpid():
            return True
        if os.name == "nt":  # os.kill(pid, 0) would terminate the process there: not checkable
            return None
        try:
            os.kill(self.pid, 0)  # signal 0: existence check only
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by another user
            return True
        return True

    def last_activity(self) -> float | None:
        """Seconds since the trainer last touched the lock (None if it is gone)."""
        try:
            return max(0.0, time.time() - self.path.stat().st_mtime)
        except OSError:
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"


def read_lock(run_dir: Path) -> LockHolder | None:
    """The lock's holder, or None when there is no lock or it is unreadable (a half-written file)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        data = json.loads(path.read_text())
        return LockHolder(int(data["pid"]), str(data["host"]), str(data.get("started", "?")), path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_not_running(run_dir: Path, holder: LockHolder | None = None) -> None:
    """Raise :class:`RunLockedError` when another live process on this machine holds the run's lock
    (``holder``: the lock already read, else it is read here)."""
    holder = read_lock(run_dir) if holder is None else holder
    if holder is not None and holder.pid != os.getpid() and holder.alive():
        raise RunLockedError(
            f"{run_dir}: another `medsemi train` is training in this run ({holder.describe()}); wait for it "
            f"to finish or stop it (Ctrl-C saves a checkpoint), then resume with `medsemi train --resume "
            f"{run_dir}`. If that process is not a medsemi run (its pid was reused), delete {holder.path}"
        )


@contextlib.contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir/run.lock`` for the block (written atomically, removed on exit if still ours)."""
    run_dir = Path(run_dir)
    holder = read_lock(run_dir)
    check_not_running(run_dir, holder)
    if holder is not None and holder.alive() is None:
        print(f"{run_dir}: taking over run.lock ({holder.describe()}), whose process cannot be checked from "
              "here; make sure that run has stopped", file=sys.stderr)
    path = run_dir / LOCK_NAME
    tmp = run_dir / f".{LOCK_NAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    os.replace(tmp, path)
    try:
        yield path
    finally:
        mine = read_lock(run_dir)
        if mine is not None and mine.pid == os.getpid() and mine.here:
            with contextlib.suppress(OSError):
                path.unlink()


def touch_lock(path: Path | None) -> None:
    """Mark the run as alive now (the lock's modification time); a missing lock is left missing."""
    if path is not None:
        with contextlib.suppress(OSError):
            os.utime(path)
