"""Failing writes keep the record (issue 23, section 4): a disk that fills up under probes=full, a
read-only csv/ folder, and a stop signal while the synthetic data set is being written. Each
through the CLI (a real process where a signal or a concurrent disk filler needs one, its
entry point in-process otherwise): one line naming where, the exit code the README gives, no
traceback, and the run's record files there (the earlier ones kept). Real file systems (tmpfs,
a read-only bind mount: the tests run as root, as CI does); every wait has a generous timeout
and nothing asserts a duration."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fill_disk_once, in_process

EXE = Path(sys.executable).parent / "autograd-lab"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_full_disk_under_full_probes_ends_in_one_line_with_its_record(small_disk, tmp_path,
                                                                       data_root, monkeypatch,
                                                                       capsys):
    """probes=full logs many values a step through Lightning's TensorBoard logger, which turns
    the disk's OSError into `ValueError: you tried to log ...`: today a traceback, exit 1, and
    no run.json or metrics.parquet. Now: the run's start line and one line naming where and why,
    exit 1; the last checkpoint still loads; run.json says failed with that reason and
    metrics.parquet parses with every step that was run. The CLI's entry point runs in this
    process; a thread fills the disk once the first checkpoint is there."""
    import threading

    import pandas as pd
    import torch

    run_dir = small_disk / "run"
    args = ["train", "data=synthetic", f"data.root={data_root}", "data.train_size=10000",
            "data.test_size=256", "trainer.max_epochs=2", "checkpoint.every_n_steps=20",
            "probes=full", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    ckpt = run_dir / "checkpoints" / "last.ckpt"

    class Running:  # what fill_disk_once polls: None while the run goes on
        code = None

        def poll(self):
            return self.code

    running = Running()
    filler = threading.Thread(target=fill_disk_once, args=(small_disk, ckpt, running, 300))
    filler.start()
    try:
        out = in_process(args, tmp_path, monkeypatch, capsys)
    finally:
        running.code = -1
        filler.join()
    err = out.stderr
    assert out.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].endswith(": starting"), err[-3000:]
    assert len(lines) == 2 and "Traceback" not in err and "you tried to log" not in err, err
    assert lines[1].startswith("autograd-lab: error: cannot write "), lines[1]
    assert "No space left on device" in lines[1] and str(run_dir) in lines[1], lines[1]
    saved = torch.load(ckpt, weights_only=True)  # the last good checkpoint still loads
    assert saved["global_step"] > 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    curve = pd.read_parquet(run_dir / "metrics.parquet")
    steps = curve[curve.name == "train/loss"].step.tolist()
    assert steps == list(range(record["final"]["steps"])) and len(steps) >= saved["global_step"]
    assert not (run_dir / ".autograd_lab.reserve").exists()


def test_a_read_only_csv_folder_stops_a_fresh_start_in_one_line_and_keeps_the_record(
        tmp_path, data_root, monkeypatch, capsys):
    """A run with logger=[tensorboard,csv] completed; its csv/ folder is now on a read-only
    mount. Starting it over (resume=false) must clear the earlier run's files: today the
    clean-up deletes run.json, then dies on csv/metrics.csv with an EROFS traceback. Now: one
    line naming the folder and why, exit 1, and the earlier checkpoint, run.json and
    metrics.parquet byte for byte as they were."""
    run_dir = tmp_path / "run"
    args = ["train", "data=synthetic", f"data.root={data_root}", "data.train_size=64",
            "data.test_size=32", "trainer.max_steps=2", "probes=off", "logger=[tensorboard,csv]",
            "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    first = in_process(args, tmp_path, monkeypatch, capsys)  # the CLI's entry point, in-process
    assert first.returncode == 0, first.stderr
    kept = {name: _sha(run_dir / name) for name in ("run.json", "metrics.parquet",
                                                    "checkpoints/last.ckpt", "csv/metrics.csv")}
    csv = run_dir / "csv"
    subprocess.run(["mount", "--bind", str(csv), str(csv)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(csv)], check=True)
        again = in_process([*args, "resume=false"], tmp_path, monkeypatch, capsys)
    finally:
        subprocess.run(["umount", "-l", str(csv)], check=False)
    assert again.returncode == 1, again.stderr[-3000:]
    lines = [ln for ln in again.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert lines[0].startswith(f"autograd-lab: error: cannot write into {csv}: "), lines[0]
    assert "Read-only file system" in lines[0], lines[0]
    assert {name: _sha(run_dir / name) for name in kept} == kept
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_a_read_only_csv_folder_on_a_fresh_run_fails_in_one_line_with_its_record(
        tmp_path, data_root, monkeypatch, capsys):
    """A new run directory whose (empty) csv/ folder is on a read-only mount, logger=
    [tensorboard,csv]: today the clean-up at start dies with an EROFS traceback (a read-only
    folder refuses even the unlink of an absent file) and writes no run.json. Now: the start
    line and one line naming csv/metrics.csv and why, exit 1, and run.json (failed, with that
    reason) and metrics.parquet written beside it."""
    import pandas as pd

    run_dir = tmp_path / "run"
    csv = run_dir / "csv"
    csv.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(csv), str(csv)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(csv)], check=True)
        out = in_process(["train", "data=synthetic", f"data.root={data_root}",
                          "data.train_size=64", "data.test_size=32", "trainer.max_steps=2",
                          "probes=off", "logger=[tensorboard,csv]", "trainer.progress_bar=false",
                          f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, capsys)
    finally:
        subprocess.run(["umount", "-l", str(csv)], check=False)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[0].endswith(": starting") and len(lines) == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert lines[1].startswith(f"autograd-lab: error: cannot write {csv / 'metrics.csv'}: "
                               f"Read-only file system; make it writable"), lines[1]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "Read-only file system" in record["error"]
    assert set(pd.read_parquet(run_dir / "metrics.parquet").columns) >= {"step", "name", "value"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_synthetic_data_is_written_is_an_interruption(signum, tmp_path,
                                                                         monkeypatch, capsys):
    """SIGINT or SIGTERM while the synthetic data set is being made (a fresh data.root, a size
    that takes seconds to make): today a traceback, exit 1, run.json `failed`. Now as at any
    other moment: exit 128 + the signal, the interrupted line, run.json `interrupted`; the same
    command then makes the data again and completes."""
    data = tmp_path / "fresh_data"
    run_dir = tmp_path / "run"
    args = ["train", "data=synthetic", f"data.root={data}", "data.train_size=20000",
            "data.test_size=32", "trainer.max_steps=2", "probes=off",
            "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([str(EXE), *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    deadline = time.time() + 300  # until the data set's folder exists: it is being made
    while (proc.poll() is None and time.time() < deadline
           and not list(data.glob("synthetic/*/cifar-10-batches-py"))):
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signum)
    try:
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = signal.Signals(signum).name
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("autograd-lab: ") and lines[-1].endswith(
        f"run: interrupted by {name} before training started; the same command starts it "
        f"again"), lines
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and name in record["error"]
    again = in_process(args, tmp_path, monkeypatch, capsys)  # the signal needed a process
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
