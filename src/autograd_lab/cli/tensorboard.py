"""`autograd-lab tensorboard [DIR ...]`: TensorBoard on 127.0.0.1 with every step kept, stopped
with the command (Ctrl-C, SIGTERM, SIGHUP, or the parent's death)."""

from __future__ import annotations

import sys
from pathlib import Path

from autograd_lab.errors import UserError

# TensorBoard keeps 1,000 points a scalar tag unless told otherwise: every step is the point.
# Not scalars=0: TensorBoard's documented "keep all" returns no points at all from the fast
# (Rust) data server of tensorboard 2.21 (tests/test_cli.py shows all 1,500 of a run's steps).
SAMPLES = "scalars=10000000,images=100,histograms=500"


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Linux: this (child) process gets SIGTERM when its parent ends, even by SIGKILL, so a
    TensorBoard never outlives the command that started it. (run.distributed.die_with_parent does
    the same for DDP ranks; that module imports Lightning, which this command must not.)"""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Stopped(Exception):
    """SIGTERM or SIGHUP reached `autograd-lab tensorboard`: stop the server, as Ctrl-C does."""


def _logdir_args(dirs: list[Path], links: Path) -> list[str]:
    """TensorBoard's arguments for the folders: one folder is the logdir; several are symlinks
    in `links` (a fresh temporary folder), one per folder, named by its last part, and `links`
    is the logdir. Not --logdir_spec, which splits on commas and colons: a sweep's job folders
    (`seed=0,train.zero_grad=true`) would show no runs at all."""
    if len(dirs) == 1:
        return ["--logdir", str(dirs[0])]
    used: set[str] = set()
    for d in dirs:
        name = d.resolve().name or "root"
        shown, n = name, 2
        while shown in used:  # two folders of one name: the second is name-2
            shown, n = f"{name}-{n}", n + 1
        used.add(shown)
        (links / shown).symlink_to(d.resolve(), target_is_directory=True)
    return ["--logdir", str(links)]


def tensorboard(args: list[str]) -> int:
    """`autograd-lab tensorboard [DIR ...] [--port N]`: this venv's TensorBoard on 127.0.0.1 with
    every scalar kept, on a free port from N (6006) up; prints the URL. Ctrl-C, SIGTERM or
    SIGHUP stops it, and so does the end of this process by any means (SIGKILL included): the
    server never outlives the command."""
    import argparse
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    parser = argparse.ArgumentParser(prog="autograd-lab tensorboard")
    parser.add_argument("dirs", nargs="*", type=Path,
                        help="folders of runs (default: runs and multirun, where they exist)")
    parser.add_argument("--port", type=int, default=6006)
    opts = parser.parse_args(args)
    dirs = opts.dirs or [d for d in (Path("runs"), Path("multirun")) if d.is_dir()]
    if not dirs:
        raise UserError("no runs here (no runs/ or multirun/ folder); give a folder: "
                        "autograd-lab tensorboard multirun/<study>/<sweep>")
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise UserError(f"{missing[0]}: no such folder; give a folder of runs")
    if not 1 <= opts.port <= 65535:
        raise UserError(f"--port {opts.port}: must be in 1..65535")
    port = next((p for p in range(opts.port, min(opts.port + 100, 65536))
                 if not _listening(p)), None)
    if port is None:
        raise UserError(f"--port {opts.port}: it and the next 99 ports are taken")

    def stop(signum, frame):
        raise _Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    links = Path(tempfile.mkdtemp(prefix="autograd-lab-tensorboard-")) if len(dirs) > 1 \
        else None
    server = errors = None
    try:
        command = [sys.executable, "-m", "tensorboard.main", "--host", "127.0.0.1",
                   *_logdir_args(dirs, links), "--port", str(port), "--samples_per_plugin", SAMPLES]
        # its stderr goes to a file, not a pipe: a pipe nobody reads once it serves would fill
        # up and block it, and once this process is gone (SIGKILL) its "caught SIGTERM" line
        # would meet a closed pipe and could keep it from exiting
        errors = tempfile.TemporaryFile(mode="w+")
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors,
                                  text=True, preexec_fn=_die_with_parent)
        deadline = time.time() + 60
        while not _listening(port):
            if server.poll() is not None:
                errors.seek(0)
                error = errors.read().strip().splitlines()
                raise UserError(f"tensorboard did not start: "
                                f"{error[-1] if error else f'exit {server.returncode}'}")
            if time.time() > deadline:
                raise UserError(f"tensorboard did not listen on port {port} within 60 s")
            time.sleep(0.1)
        print(f"TensorBoard: http://127.0.0.1:{port}/ ({', '.join(map(str, dirs))}; every step "
              f"kept). Ctrl-C stops it.", flush=True)
        server.wait()
        return server.returncode or 0
    except (KeyboardInterrupt, _Stopped):
        print("TensorBoard stopped.", file=sys.stderr)
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if errors is not None:
            errors.close()  # an unlinked temporary file: gone with it
        if links is not None:
            shutil.rmtree(links, ignore_errors=True)  # the symlinks only, never their targets
        for sig, handler in previous.items():
            signal.signal(sig, handler)
