"""Faults researchers hit that are not typos: two processes on one run directory, a write that
fails half-way, signals other than Ctrl-C. Each through the real CLI where it matters."""

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
from conftest import SMALL, cli, fill_disk_once, in_process, losses, make_cfg

from autograd_lab.disk.lock import LOCK_NAME, RunLock


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("explicit_dir", [True, False])
def test_a_second_process_on_a_run_directory_is_refused_and_changes_nothing(
        explicit_dir, tmp_path, data_root, monkeypatch, capsys):
    """While this process holds a run directory's lock, `autograd-lab train` on the same
    directory exits 2 with one line naming the holder (pid, host) and leaves every file as it
    was, for an explicit hydra.run.dir (checked before Hydra runs) and for the directory the
    overrides name (runs/<overrides>)."""
    args = ["train", *SMALL, f"data.root={data_root}", "trainer.max_steps=2"]
    first = in_process([*args, *([f"hydra.run.dir={tmp_path / 'run'}"] if explicit_dir else [])],
                       tmp_path, monkeypatch, capsys)  # the first run needs no process of its own
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "run" if explicit_dir else next((tmp_path / "runs").iterdir())
    before = _digests(run_dir)
    with RunLock(run_dir):
        second = cli(*args, "resume=false",
                     *([f"hydra.run.dir={tmp_path / 'run'}"] if explicit_dir else []),
                     cwd=tmp_path)
        held = _digests(run_dir)
    assert second.returncode == 2, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"pid {os.getpid()}" in lines[0] and "in use by another autograd-lab process" \
        in lines[0]
    changed = {k for k in before if held.get(k) != before[k]} - {LOCK_NAME}
    # Hydra rewrites its own .hydra/ record of the (identical) command before the job starts
    assert changed <= ({".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"}
                       if not explicit_dir else set()), changed
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path, data_root, monkeypatch, capsys):
    """The OS drops a dead process's flock: a lock file that names a long-gone pid is no
    obstacle, and the run completes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "since": "x"}))
    out = in_process(["train", *SMALL, f"data.root={data_root}", "trainer.max_steps=2",
                      f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_two_processes_started_on_one_directory_one_trains(tmp_path, data_root):
    """The race as it happens: the same command started twice. The second is refused while the
    first trains; the first's curve is complete and equals an in-process run of the config."""
    args = ["train", *SMALL, f"data.root={data_root}", "data.train_size=10000",
            "trainer.max_epochs=4", "probes=off", f"hydra.run.dir={tmp_path / 'run'}"]
    exe = Path(sys.executable).parent / "autograd-lab"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([str(exe), *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "run" / LOCK_NAME
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (
            lock.exists() and lock.read_text()):
        time.sleep(0.05)
    second = cli(*args, cwd=tmp_path)
    first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err
    assert second.returncode == 2 and "in use by another autograd-lab process" in second.stderr
    assert "Traceback" not in second.stderr
    reference = tmp_path / "reference"
    from autograd_lab.train import run

    run(make_cfg("data.root=" + str(data_root), "data.train_size=10000", "trainer.max_epochs=4",
                 "probes=off", "threads=1"), reference)
    assert losses(tmp_path / "run") == losses(reference)
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
def test_every_stop_signal_saves_at_a_step_and_resumes_exactly(signum, tmp_path, data_root,
                                                             tmp_path_factory):
    """A closed terminal (SIGHUP) and the schedulers' time-limit warnings (SIGUSR1, SIGUSR2)
    stop the run at the next step boundary with a checkpoint, status interrupted and exit
    128 + the signal; the same call again ends with the uninterrupted curve, bit for bit."""
    import lightning as L

    from autograd_lab.train import run

    overrides = ("data.train_size=320", "data.test_size=128", "trainer.max_epochs=2",
                 "log.flush_every_s=1000", "train.zero_grad=false")

    class Send(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                os.kill(os.getpid(), signum)

    reference = tmp_path / "reference"
    run(make_cfg(*overrides, data_root=data_root), reference)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run(make_cfg(*overrides, data_root=data_root), run_dir, callbacks=[Send()])
    assert stop.value.code == 128 + signum
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and "at step 7" in record["error"]
    assert signal.Signals(signum).name in record["error"]
    resumed = run(make_cfg(*overrides, data_root=data_root), run_dir)
    assert resumed["resumed"]["from_step"] == 7
    assert losses(run_dir) == losses(reference)


def test_a_disk_that_fills_up_fails_in_one_line_and_the_same_command_continues(
        small_disk, tmp_path, data_root, monkeypatch, capsys):
    """The run directory's file system fills up after the first periodic checkpoint: the run
    ends failed, exit 1, one line naming where and why; the checkpoint it had still loads.
    Once space is back, the same command (through the CLI's entry point, in-process) continues
    from it to the uninterrupted curve."""
    import torch

    from autograd_lab.train import run

    args = ["train", "data=synthetic", f"data.root={data_root}", "data.train_size=10000",
            "data.test_size=256", "trainer.max_epochs=2", "checkpoint.every_n_steps=50",
            "trainer.progress_bar=false", f"hydra.run.dir={small_disk / 'run'}"]
    exe = Path(sys.executable).parent / "autograd-lab"
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = small_disk / "run" / "checkpoints" / "last.ckpt"
    fill_disk_once(small_disk, ckpt, proc, timeout=120)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].endswith(": starting"), err  # the run's start line, then one line
    lines = lines[1:]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "No space left on device" in lines[0] and str(small_disk / "run") in lines[0]
    assert "same command again" in lines[0]
    saved = torch.load(ckpt, weights_only=True)  # the last good checkpoint still loads
    assert 0 < saved["global_step"] < 626

    (small_disk / "filler").unlink()
    again = in_process(args, tmp_path, monkeypatch, capsys)
    assert again.returncode == 0, again.stderr
    record = json.loads((small_disk / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed"]["from_step"] > 0
    reference = tmp_path / "reference"
    run(make_cfg("data=synthetic", f"data.root={data_root}", "data.train_size=10000",
                 "data.test_size=256", "trainer.max_epochs=2", "threads=1", small=False),
        reference)
    assert losses(small_disk / "run") == losses(reference)


def test_a_second_signal_during_the_last_writes_still_leaves_the_record(tmp_path, data_root,
                                                                       monkeypatch):
    """A SIGTERM that lands while the run writes metrics.parquet and run.json (a second Ctrl-C,
    a scheduler's follow-up signal) does not cut them short: both are written, and then the
    signal is obeyed (exit 143: in a sweep, the next job does not start)."""
    import autograd_lab.job.record as records  # the module that writes metrics.parquet
    from autograd_lab.train import run

    original = records.write_parquet

    def signalled(path, frame):
        os.kill(os.getpid(), signal.SIGTERM)
        original(path, frame)

    monkeypatch.setattr(records, "write_parquet", signalled)
    with pytest.raises(SystemExit) as stop:
        run(make_cfg("trainer.max_steps=3", data_root=data_root), tmp_path / "run")
    assert stop.value.code == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "completed"
    assert len(losses(tmp_path / "run")) == 3


def test_a_resume_under_another_thread_count_says_it_is_not_bitwise(tmp_path, data_root,
                                                                    capsys):
    """Threads change floating-point sums, so a run continued under another thread count (on
    another node, under another launcher) is not bitwise equal to an uninterrupted one: it
    continues, says so on stderr, and run.json records both values."""
    import lightning as L

    from autograd_lab.train import run

    overrides = ("data.train_size=320", "data.test_size=128", "trainer.max_epochs=1")

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        run(make_cfg(*overrides, "threads=2", data_root=data_root), run_dir, callbacks=[Stop()])
    capsys.readouterr()
    record = run(make_cfg(*overrides, "threads=1", data_root=data_root), run_dir)
    assert record["status"] == "completed"
    assert record["resumed"]["bitwise"] is False
    assert record["resumed"]["changed"] == {"threads": [2, 1]}
    note = capsys.readouterr().err
    assert "threads 2 -> 1" in note and "not be bitwise" in note
    same = tmp_path / "same"
    with pytest.raises(SystemExit):
        run(make_cfg(*overrides, "threads=1", data_root=data_root), same, callbacks=[Stop()])
    assert "bitwise" not in run(make_cfg(*overrides, "threads=1", data_root=data_root),
                                same)["resumed"]


def test_workers_of_a_parallel_sweep_stop_with_their_parent(tmp_path, data_root):
    """SIGTERM to a joblib sweep's parent: its worker processes do not train on orphaned; each
    gets SIGTERM in turn (PR_SET_PDEATHSIG), saves its job at a step and records it
    interrupted, so the same sweep command can continue them."""
    import psutil

    sweep = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "data=synthetic",
            f"data.root={data_root}", "data.train_size=10000", "data.test_size=128",
            "trainer.max_epochs=20", "probes=off", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    exe = Path(sys.executable).parent / "autograd-lab"
    parent = subprocess.Popen([str(exe), *args], cwd=tmp_path, stderr=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(sweep.glob("*/checkpoints/last.ckpt"))) < 2:
        assert parent.poll() is None, parent.communicate()[1][-2000:]
        time.sleep(0.1)
    workers = [p for p in psutil.Process(parent.pid).children(recursive=True)
               if "popen_loky" in " ".join(p.cmdline())]  # joblib's loky workers
    assert workers, "no worker processes found"
    parent.send_signal(signal.SIGTERM)
    parent.wait(60)
    gone, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    records = [json.loads(p.read_text()) for p in sweep.glob("*/run.json")]
    assert len(records) == 2 and all(r["status"] == "interrupted" for r in records), records


def test_a_moved_data_folder_with_the_same_content_continues(tmp_path, data_root):
    """data.root does not change results (config.NON_RESULT_KEYS): an interrupted run whose
    data folder was copied elsewhere continues in the same run directory to the same curve."""
    import shutil

    import lightning as L

    from autograd_lab.train import run

    overrides = ("data.train_size=320", "data.test_size=128", "trainer.max_epochs=1")
    old, new = tmp_path / "old_data", tmp_path / "new_data"

    class Stop(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    reference = run(make_cfg(*overrides, data_root=old), tmp_path / "reference")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit):
        run(make_cfg(*overrides, data_root=old), run_dir, callbacks=[Stop()])
    shutil.copytree(old, new)
    shutil.rmtree(old)
    record = run(make_cfg(*overrides, data_root=new), run_dir)
    assert record["status"] == "completed" and record["resumed"]["from_step"] == 4
    assert losses(run_dir) == losses(tmp_path / "reference")
    assert record["final"] == reference["final"]


def test_a_summary_being_written_is_not_written_twice_at_once(tmp_path, data_root):
    """`autograd-lab summarize DIR` while another process writes DIR/summary: one line naming
    the holder, exit 2, the folder as it was."""
    from autograd_lab.train import run

    for seed in (0, 1):
        run(make_cfg(f"seed={seed}", "trainer.max_steps=2", data_root=data_root),
            tmp_path / "sweep" / f"seed={seed}")
    (tmp_path / "sweep" / "summary").mkdir()
    with RunLock(tmp_path / "sweep" / "summary"):
        out = cli("summarize", str(tmp_path / "sweep"), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0], out.stderr
    assert [p.name for p in (tmp_path / "sweep" / "summary").iterdir()] == [LOCK_NAME]
    assert cli("summarize", str(tmp_path / "sweep"), cwd=tmp_path).returncode == 0


def test_temporary_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path, data_root):
    """A SIGKILL in the middle of an atomic write leaves `.NAME.xxxx.tmp` (117 MB for a
    ResNet18 checkpoint); the next run in that directory removes such leftovers, and only them."""
    from autograd_lab.train import run

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    leftovers = [run_dir / "checkpoints" / ".last.ckpt.k2j4.tmp", run_dir / ".run.json.a8.tmp",
                 run_dir / ".metrics.parquet.zz.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (run_dir / "notes.tmp").write_text("a user's own file")
    run(make_cfg("trainer.max_steps=2", data_root=data_root), run_dir)
    assert not any(p.exists() for p in leftovers)
    assert (run_dir / "notes.tmp").exists()
