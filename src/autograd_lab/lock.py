"""One writer per run directory: an flock held for the run's life.

Two processes given the same run directory (the same command in two terminals, two cluster jobs
with the same hydra.run.dir) would write into the same event files, checkpoint and run.json. The
first takes an exclusive `flock` on RUN_DIR/.autograd_lab.lock and holds it until it ends; the OS
releases it when the process ends, however it ends, so a lock left by a killed process never
blocks. The file says who holds it. No torch import here: the CLI checks before Hydra runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .config import UserError

LOCK_NAME = ".autograd_lab.lock"


def _busy(path: Path, fd: int) -> UserError:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        holder = {}
    return UserError(f"{path.parent} is in use by another autograd-lab process (pid "
                     f"{holder.get('pid', '?')} on {holder.get('host', '?')}, since "
                     f"{holder.get('since', '?')}); wait for it to end or use another run "
                     f"directory")


class RunLock:
    """`with RunLock(run_dir):` the run's files are this process's alone, or a one-line
    UserError naming the process that holds them (nothing is changed then)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = _busy(self.path, fd)
            os.close(fd)
            raise error from None
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def check_free(run_dir: Path) -> None:
    """Raise the UserError RunLock would, without taking the lock or creating anything."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody has run here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(path, fd) from None
    finally:
        os.close(fd)  # also releases the probe's shared lock
