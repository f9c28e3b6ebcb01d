"""A busy machine is named: a run whose machine has fewer free cores than its torch threads says
so once, at its start (stderr and train.log), with what it costs and that threads=1 avoids it;
run.json records the load. The real load of the test machine is never relied on."""

from __future__ import annotations

import json
import os

import pytest
from conftest import in_process

from autograd_lab.job.messages import busy_note


@pytest.mark.parametrize("load,cores,threads,busy", [
    (0.0, 2, 2, False),    # an idle machine
    (0.04, 2, 2, False),   # a start-up's flicker: 2.0 free, as the note would print it
    (0.9, 4, 2, False),    # 3.1 cores free for 2 threads
    (1.0, 2, 2, True),     # one core busy: 1 free for 2 threads (2x slower, measured)
    (2.0, 2, 2, True),     # both busy (50x slower, measured)
    (2.0, 2, 1, False),    # one thread waits for no other
    (6.5, 8, 2, True),     # 1.5 cores free: fewer than 2 threads
])
def test_busy_note_compares_free_cores_with_threads(load, cores, threads, busy):
    note = busy_note(load, cores, threads)
    assert (note is not None) == busy
    if note:
        assert f"other processes use {load:.1f} of {cores} cores" in note
        assert f"{max(cores - load, 0):.1f} free for {threads} torch threads" in note
        assert "threads=1 avoids it" in note and "last bits of the curve" in note


def test_no_load_average_says_nothing():
    assert busy_note(None, 2, 2) is None


def test_a_busy_machine_is_named_once_at_the_start(tmp_path, data_root, monkeypatch, capsys):
    """`autograd-lab train` through its entry point in this process, AUTOGRAD_LAB_LOADAVG set
    as the environment would set it; threads=2 sets this process's torch threads: restored."""
    import torch

    threads_before = torch.get_num_threads()
    try:
        _busy_and_idle(tmp_path, data_root, monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads_before)


def _busy_and_idle(tmp_path, data_root, monkeypatch, capsys):
    args = ["train", "data=synthetic", "data.train_size=64", "data.test_size=32",
            "trainer.max_steps=3", "probes=off", f"data.root={data_root}", "threads=2",
            "trainer.progress_bar=false"]
    busy = str(float(os.cpu_count() or 1))  # every core looks busy
    monkeypatch.setenv("AUTOGRAD_LAB_LOADAVG", busy)
    out = in_process([*args, f"hydra.run.dir={tmp_path / 'busy'}"], tmp_path, monkeypatch,
                     capsys)
    assert out.returncode == 0, out.stderr
    notes = [ln for ln in out.stderr.splitlines() if "this machine is busy" in ln]
    assert len(notes) == 1, out.stderr
    assert "threads=1 avoids it" in notes[0]
    lines = out.stderr.splitlines()
    assert lines.index(notes[0]) == 1 and lines[0].endswith(": starting")  # at the start
    log = (tmp_path / "busy" / "train.log").read_text()
    assert log.count("this machine is busy") == 1
    load = json.loads((tmp_path / "busy" / "run.json").read_text())["load"]
    assert load.pop("loadavg_1min") is not None  # the real one, for the record
    assert load == {"busy_cores": float(busy), "cores": os.cpu_count(), "threads": 2,
                    "busy": True}

    monkeypatch.setenv("AUTOGRAD_LAB_LOADAVG", "0")
    quiet = in_process([*args, f"hydra.run.dir={tmp_path / 'idle'}"], tmp_path, monkeypatch,
                       capsys)
    assert quiet.returncode == 0, quiet.stderr
    assert "busy" not in quiet.stderr
    assert json.loads((tmp_path / "idle" / "run.json").read_text())["load"]["busy"] is False


def test_busy_cores_counts_another_process_spinning_and_not_this_ones_past_work():
    """The oracle: a child process that spins on one core for the whole window keeps at least
    most of a core busy (a lower bound: the other test process may add to it). This process's
    own work just before (what the 1-minute load average would still count) is not sampled:
    the window is measured while it sleeps."""
    import subprocess
    import sys
    import time

    from autograd_lab.job.messages import machine_load

    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:  # this process's own earlier work
        pass
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # it is running
        busy = machine_load(threads=2, window_s=0.5)["busy_cores"]
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6, busy
    assert machine_load(threads=1)["busy_cores"] is None  # one thread: nothing to measure
