"""One writer per run directory: an flock held for the run's life.

Two processes given the same run directory (the same command in two terminals, two cluster jobs
with the same hydra.run.dir) would write into the same event files, checkpoint and run.json. The
first takes an exclusive `flock` on RUN_DIR/.autograd_lab.lock and holds it until it ends; the OS
releases it when the process ends, however it ends, so a lock left by a killed process never
blocks. The file says who holds it. No torch import here: the CLI checks before Hydra runs.
Hand-written on fcntl, not filelock (installed with torch): the lock file names its holder for
the one-line error, a second writer is refused at once, and it is opened without following a
symlink or blocking on a FIFO (open_own).

The files the harness (and Hydra for it) writes in a run directory are its own: `check_entries`
refuses a run directory where one of their names holds a symlink (a write would land in the file
it points to), a FIFO (whoever opens it blocks), a device or socket, a folder where a file goes
or a file where a folder goes, in one line naming it, before anything is written; `open_own`
opens such a file without following a symlink or blocking on a FIFO.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path

from autograd_lab.errors import UserError


def is_rank_zero() -> bool:
    """True in the process that owns the run's files (before Lightning knows the rank, too):
    the other ranks of a DDP job write none of them."""
    return all(os.environ.get(k, "0") == "0" for k in ("LOCAL_RANK", "NODE_RANK", "RANK",
                                                       "SLURM_PROCID"))


LOCK_NAME = ".autograd_lab.lock"

# What autograd-lab, its loggers and Hydra write in a run directory (a job folder of a sweep
# too): each name is absent or a real folder / a plain file, never anything else.
OWN_DIRS = (".hydra", "checkpoints", "csv", "profiler")

OWN_FILES = (LOCK_NAME, ".autograd_lab.reserve", "run.json", "metrics.parquet", "hparams.yaml",
             "train.log", "slurm.json",
             "profile_ops.csv", "profile_fwd_bwd.csv", ".hydra/config.yaml", ".hydra/hydra.yaml",
             ".hydra/overrides.yaml", "checkpoints/last.ckpt", "csv/metrics.csv",
             "csv/hparams.yaml")

# ... and in a sweep folder, beside the job folders
SWEEP_DIRS = ("summary",)

SWEEP_FILES = ("multirun.yaml", f"summary/{LOCK_NAME}")


class ForeignEntry(UserError):
    """A name where autograd-lab writes a file or folder of its own holds something it did not
    make there (a symlink, FIFO, device, socket; a folder for a file or a file for a folder).
    Nothing was written; the folder holding it is left alone (no failed run.json either)."""

    leave_alone = True


def _kind(mode: int) -> str:
    """What a file-system entry is, in words."""
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return what
    return "not a file"


def foreign(path: Path, folder: bool = False) -> ForeignEntry | None:
    """The one-line error for `path` when it exists and is not what autograd-lab writes there
    (a plain file, or with `folder` a real folder), else None. Never follows a symlink."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # absent (or under a file: the entry above it is reported)
        return None
    if (stat.S_ISDIR if folder else stat.S_ISREG)(mode):
        return None
    what = _kind(mode)
    if stat.S_ISLNK(mode):
        try:
            what += f" to {os.readlink(path)}"
        except OSError:
            pass
    own = "a folder" if folder else "a file"
    return ForeignEntry(f"{path}: {what}, where autograd-lab keeps {own} of its own; it never "
                        f"writes through or over one: remove it, or choose another run directory")


def check_entries(run_dir: Path, dirs=OWN_DIRS, files=OWN_FILES) -> None:
    """Raise ForeignEntry for the first of run_dir's harness-owned names that holds something
    else (`foreign`); nothing is created or changed."""
    run_dir = Path(run_dir)
    for names, folder in ((dirs, True), (files, False)):
        for name in names:
            error = foreign(run_dir / name, folder)
            if error is not None:
                raise error


def check_sweep_dir(sweep_dir: Path) -> None:
    """check_entries for a sweep folder: its own names, and each job folder in it. A job folder
    that is a symlink is refused too (Hydra would write the job's files through it)."""
    sweep_dir = Path(sweep_dir)
    check_entries(sweep_dir, SWEEP_DIRS, SWEEP_FILES)
    try:
        children = sorted(os.scandir(sweep_dir), key=lambda e: e.name)
    except OSError:  # no folder yet (or not a folder: Hydra's own error says so)
        return
    for child in children:
        if child.is_symlink():
            raise foreign(Path(child.path), folder=True)
        if child.is_dir(follow_symlinks=False) and child.name not in SWEEP_DIRS:
            check_entries(Path(child.path))


def open_own(path: Path, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """os.open for a file autograd-lab owns: never through a symlink (O_NOFOLLOW), never
    blocking on a FIFO (O_NONBLOCK), and only a plain file (else ForeignEntry, nothing
    written). FileNotFoundError when it is absent and `flags` does not create it."""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError:
        error = foreign(path)
        if error is not None:  # ELOOP (a symlink), EISDIR (a folder), ENXIO (a FIFO, O_WRONLY)
            raise error from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise foreign(path) or ForeignEntry(f"{path}: not a plain file; remove it")
    return fd


class InUse(UserError):
    """Another process holds the run directory: this one writes nothing there (in a sweep, no
    failed run.json into the folder the other process is writing)."""

    leave_alone = True


def _busy(path: Path, fd: int) -> UserError:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    return InUse(f"{path.parent} is in use by another autograd-lab process (pid "
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
        fd = open_own(self.path, os.O_RDWR | os.O_CREAT)  # a symlink, FIFO, folder: one line
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
        fd = open_own(path)  # a symlink, FIFO or folder there: one line, never a hang
    except FileNotFoundError:
        return  # no lock file: nobody has run here
    except ForeignEntry:
        raise
    except OSError:
        return  # unreadable: the run's own lock says what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(path, fd) from None
    finally:
        os.close(fd)  # also releases the probe's shared lock
