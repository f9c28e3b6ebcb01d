"""`autograd-lab tensorboard` behaves like a server a user can trust, checked with a real
TensorBoard on 127.0.0.1: SIGTERM and SIGHUP stop it (port closed, no TensorBoard process
left), so does the death of the command by SIGKILL; several folders whose names hold commas
(a sweep's job folders) all show their runs; the `tensorboard:` command a run prints pastes
into a shell as is when its folder has a space and non-ASCII characters."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import cli

EXE = Path(sys.executable).parent / "autograd-lab"


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _start(args: list[str], cwd: Path, env: dict | None = None, shell: str | None = None):
    """Start the server (`autograd-lab tensorboard ARGS`, or the shell line `shell`); returns
    (process, port, get) once it has printed its URL."""
    full_env = {**os.environ, **(env or {})}
    command = ["bash", "-c", f"exec {shell}"] if shell else [str(EXE), "tensorboard", *args]
    proc = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("TensorBoard: http://127.0.0.1:"):
        proc.kill()
        pytest.fail(f"no URL: {line!r} {proc.stderr.read()[-2000:]}")
    base = line.split()[1].rstrip("/")
    port = int(base.rsplit(":", 1)[1])

    def get(path):
        with urllib.request.urlopen(base + path, timeout=30) as resp:
            return json.loads(resp.read())

    return proc, port, get


def _wait(condition, seconds: float = 60) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _run_dir(folder: Path, source: Path) -> Path:
    """A copy of the run `source` (events, run.json) at `folder`."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("checkpoints", "*.lock"))
    return folder


@pytest.fixture(scope="module")
def one_run(tmp_path_factory, data_root) -> Path:
    """One tiny real run (its TensorBoard events), made once."""
    cwd = tmp_path_factory.mktemp("tb_run")
    out = cli("train", "data=synthetic", "data.train_size=64", "data.test_size=32",
              "trainer.max_epochs=1", "probes=off", "threads=1", f"data.root={data_root}",
              "hydra.run.dir=run", cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    return cwd / "run"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_server_and_closes_its_port(sig, one_run, tmp_path):
    proc, port, get = _start([str(one_run)], tmp_path)
    try:
        (child,) = _children(proc.pid)
        assert get("/data/runs") is not None and _alive(child)
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        assert _wait(lambda: not _alive(child)), "TensorBoard outlived the command"
        assert _wait(lambda: not _listening(port)), f"port {port} still open"
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_server_dies_with_the_command_even_by_sigkill(one_run, tmp_path):
    proc, port, _ = _start([str(one_run)], tmp_path)
    (child,) = _children(proc.pid)
    proc.kill()  # SIGKILL: no handler runs; the kernel tells the child (PR_SET_PDEATHSIG)
    proc.wait(30)
    assert _wait(lambda: not _alive(child)), "TensorBoard orphaned, still serving"
    assert _wait(lambda: not _listening(port)), f"port {port} still open"


def test_several_folders_with_commas_in_their_names_all_show(one_run, tmp_path):
    """`--logdir_spec` splits on commas: two sweep folders named like job folders showed no
    runs at all. Each folder's runs are listed, under the folder's name; the temporary folder
    of links is gone once the server stops."""
    folders = [tmp_path / "sweeps" / "data=synthetic,seed=0", tmp_path / "other" /
               "optim.lr=0.1,train.zero_grad=false"]
    _run_dir(folders[0] / "train.zero_grad=true", one_run)
    _run_dir(folders[1] / "seed=1,model=smallnet", one_run)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc, _, get = _start([str(f) for f in folders], tmp_path, env={"TMPDIR": str(scratch)})
    try:
        want = {"data=synthetic,seed=0/train.zero_grad=true",
                "optim.lr=0.1,train.zero_grad=false/seed=1,model=smallnet"}
        assert _wait(lambda: set(get("/data/runs")) >= want), get("/data/runs")
        scalars = get("/data/plugin/scalars/tags")
        for run in want:
            assert "train/loss" in scalars[run]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    left = [p.name for p in scratch.iterdir() if p.name != ".tensorboard-info"]  # TB's own
    assert left == [], "the links folder was left behind"
    assert all(f.is_dir() for f in folders)  # the links went, never what they pointed at


def test_the_printed_command_pastes_into_a_shell_with_spaces_and_unicode(tmp_path, data_root):
    """The run's last line `tensorboard: <command>`, pasted into bash as is, starts TensorBoard
    on that run's folder."""
    folder = "my runs/été 1"
    out = cli("train", "data=synthetic", "data.train_size=64", "data.test_size=32",
              "trainer.max_epochs=1", "probes=off", "threads=1", f"data.root={data_root}",
              f"hydra.run.dir='{folder}'", cwd=tmp_path)  # quoted, as Hydra needs
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stderr.splitlines() if ln.strip().startswith("tensorboard: "))
    pasted = line.strip().removeprefix("tensorboard: ")
    proc, _, get = _start([], tmp_path, shell=pasted)
    try:
        assert _wait(lambda: "." in get("/data/runs")), get("/data/runs")  # the logdir's run
        assert "train/loss" in get("/data/plugin/scalars/tags")["."]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
