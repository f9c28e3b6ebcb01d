"""Shared fixtures: configs composed through Hydra's compose API, small synthetic data written
once per session in the CIFAR-10 on-disk format, and helpers to run the harness or its CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from autograd_lab.config.compose import compose

REPO = Path(__file__).resolve().parents[1]
# The suite runs offline on any machine: data.download's CIFAR-10 URL is a closed local port, so
# a test that asks for missing CIFAR-10 gets the "cannot be downloaded" line, networked or not.
os.environ.setdefault("AUTOGRAD_LAB_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
# Tests that press Ctrl-C on a child (`autograd-lab tensorboard`, a training run) need the child
# to start with SIGINT at its default, as a terminal's foreground job does. A shell that starts
# `make test` in the background (`make test &`, a CI runner's job) starts it with SIGINT ignored,
# and an ignored signal stays ignored through fork and exec: the child would never see the Ctrl-C.
# A handled signal is reset to its default on exec, so the workers handle it as Python does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
SMALL = ["data=synthetic", "data.train_size=512", "data.test_size=256",
         "trainer.max_epochs=1", "trainer.progress_bar=false"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def make_cfg(*overrides: str, data_root: Path | None = None, small: bool = True):
    """Compose the harness config exactly as `autograd-lab train` would (small synthetic data
    unless `small=False`)."""
    extra = [f"data.root={data_root}"] if data_root is not None else []
    return compose([*(SMALL if small else []), *extra, *overrides])


@pytest.fixture
def cfg_factory(data_root):
    return lambda *overrides: make_cfg(*overrides, data_root=data_root)


@pytest.fixture
def train_run(cfg_factory, tmp_path):
    """Run the harness in-process; returns (record, run_dir)."""
    from autograd_lab.train import run

    counter = iter(range(1000))

    def _run(*overrides: str, callbacks=()):
        run_dir = tmp_path / f"run{next(counter)}"
        return run(cfg_factory(*overrides), run_dir, callbacks=callbacks), run_dir

    return _run


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300):
    """Run the real `autograd-lab` console script."""
    exe = Path(sys.executable).parent / "autograd-lab"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def losses(run_dir: Path) -> list[float]:
    import pandas as pd

    frame = pd.read_parquet(run_dir / "metrics.parquet")
    curve = frame[frame.name == "train/loss"].sort_values("step")
    assert list(curve.step) == list(range(len(curve))), "every step, in order, no gaps"
    return curve.value.tolist()


def in_process(args, cwd, monkeypatch, capsys):
    """Run `autograd-lab ARGS` through its entry point (cli.main) in this process: exit code and
    output as a process's, without a second torch import."""
    from types import SimpleNamespace

    from autograd_lab.cli import main

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@pytest.fixture
def small_disk(tmp_path):
    """A real 8 MiB file system (tmpfs; the tests run as root, as CI does)."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk_once(disk: Path, appears: Path, proc, timeout: float) -> None:
    """When `appears` exists (or `proc` ended, or `timeout` s passed), take every byte left on
    the file system `disk` (a small_disk) with one filler file."""
    import time

    deadline = time.time() + timeout
    while not appears.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass


def project_copy(source: Path) -> Path:
    """The project's sources (pyproject.toml, README.md, src/, conf/) copied into `source`: pip
    builds a local folder in place, which would leave build/ and egg-info in the repo."""
    import shutil

    source.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    return source


# The longest test files first: `make test` runs two processes that take whole files in
# collection order (pytest-xdist's --dist loadfile with --no-loadscope-reorder: its default
# orders files by their number of tests), so starting the long ones first keeps one
# process from running a long file alone at the end. Order only: every test still runs.
LONGEST_FIRST = ("test_slurm.py", "test_cli.py", "test_ddp.py", "test_sweep.py",
                 "test_notebooks.py", "test_faults.py", "test_readme.py", "test_reliability.py",
                 "test_failing_writes.py", "test_resume.py", "test_file_safety.py",
                 "test_preflight.py", "test_schema.py", "test_bad_input.py",
                 "test_summary_scale.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep
