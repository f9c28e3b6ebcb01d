"""The files the harness writes are its own (issue 23, section 2): a run or sweep folder where a
file of the harness's (or Hydra's) is a symlink, a FIFO, a device, or a folder where a file goes
(a file where a folder goes) is refused in one line naming it, exit 2, and the thing planted
there (the symlink's target, the FIFO) is left exactly as it was. Through the CLI: the FIFO,
lock, summarize and `python -m` cases run the installed script in its own process, every call
with a timeout, so a regression that blocks on a FIFO fails instead of hanging; the symlink and
wrong-kind cases (nothing there can block) go through its entry point in this process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, in_process, make_cfg

from autograd_lab.disk.lock import LOCK_NAME, RunLock

TINY = ["data=synthetic", "data.train_size=64", "data.test_size=32", "trainer.max_steps=2",
        "trainer.progress_bar=false", "probes=off"]
TIMEOUT = 240  # generous under load; a FIFO that blocks fails the test here, never hangs it


def _one_line(out, *needles: str) -> str:
    """The command exited 2 with exactly one line on stderr, no traceback, naming `needles`."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith("autograd-lab: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _victim(tmp_path: Path) -> tuple[Path, bytes]:
    victim = tmp_path / "victim.txt"
    content = b"a file of the user's, outside the run directory\n"
    victim.write_bytes(content)
    return victim, content


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """One completed run (run.json, metrics.parquet, checkpoints/last.ckpt, .hydra/, train.log),
    made once through the CLI's entry point (in this process: it only makes the files the tests
    copy); tests copy it."""
    from autograd_lab.cli import main

    where = tmp_path_factory.mktemp("done")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        code = main(["train", *TINY, f"data.root={where / 'data'}",
                     f"hydra.run.dir={where / 'run'}"])
    assert code == 0
    assert json.loads((where / "run" / "run.json").read_text())["status"] == "completed"
    return where / "run"


def _copy(done_run: Path, to: Path) -> Path:
    shutil.copytree(done_run, to, symlinks=True)
    return to


# ------------------------------------------------------------------ symlinks: never written through
@pytest.mark.parametrize("name", [LOCK_NAME, "run.json", "metrics.parquet", "train.log",
                                  ".hydra/config.yaml", "checkpoints/last.ckpt"])
def test_a_symlink_where_a_run_writes_is_refused_and_its_target_untouched(name, tmp_path,
                                                                          monkeypatch, capsys):
    """A file of the harness's (the lock, run.json, ...) or of Hydra's (.hydra/config.yaml,
    train.log) that is a symlink to another file: `train` refuses in one line naming it, before
    anything is written; the target keeps its bytes. Today the lock's target is truncated and
    gets JSON, and Hydra writes its config and log through the symlink."""
    victim, content = _victim(tmp_path)
    run_dir = tmp_path / "run"
    (run_dir / name).parent.mkdir(parents=True)
    (run_dir / name).symlink_to(victim)
    out = in_process(["train", *TINY, f"data.root={tmp_path / 'data'}",
                      f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, capsys)
    _one_line(out, str(run_dir / name), ": a symlink")
    assert victim.read_bytes() == content
    assert (run_dir / name).is_symlink() and os.readlink(run_dir / name) == str(victim)
    assert not (run_dir / "run.json").exists() or name == "run.json"


def test_the_run_folder_the_overrides_name_is_checked_before_hydra_writes(tmp_path, monkeypatch,
                                                                          capsys):
    """Without hydra.run.dir (runs/<overrides>), on both entry points (`autograd-lab train` and
    `python -m autograd_lab.train`): Hydra's train.log and .hydra/ files are checked before Hydra
    opens them (a Hydra callback), so a symlink there is refused and its target untouched. (The
    first run, which only makes the folder, goes through the entry point in this process.)"""
    victim, content = _victim(tmp_path)
    first = in_process(["train", *TINY, f"data.root={tmp_path / 'data'}"], tmp_path, monkeypatch,
                       capsys)
    assert first.returncode == 0, first.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    shutil.rmtree(run_dir)
    run_dir.mkdir()
    (run_dir / "train.log").symlink_to(victim)
    again = cli("train", *TINY, f"data.root={tmp_path / 'data'}", "resume=false", cwd=tmp_path,
                timeout=TIMEOUT)
    _one_line(again, "train.log", ": a symlink")
    module = subprocess.run([sys.executable, "-m", "autograd_lab.train", *TINY,
                             f"data.root={tmp_path / 'data'}", "resume=false"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=TIMEOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _one_line(module, "train.log", ": a symlink")
    assert victim.read_bytes() == content
    assert sorted(p.name for p in run_dir.iterdir()) == ["train.log"]  # no .hydra/, no lock


def test_a_symlinked_summary_lock_is_refused_and_its_target_untouched(done_run, tmp_path):
    """`summarize` takes a lock in DIR/summary/: a symlink there is refused in one line, its
    target keeps its bytes (today it is truncated and gets JSON)."""
    victim, content = _victim(tmp_path)
    _copy(done_run, tmp_path / "sweep" / "seed=0")
    (tmp_path / "sweep" / "summary").mkdir()
    (tmp_path / "sweep" / "summary" / LOCK_NAME).symlink_to(victim)
    out = cli("summarize", str(tmp_path / "sweep"), cwd=tmp_path, timeout=TIMEOUT)
    _one_line(out, LOCK_NAME, ": a symlink")
    assert victim.read_bytes() == content


def test_a_symlinked_summary_folder_is_refused_and_its_target_untouched(done_run, tmp_path):
    """DIR/summary that is a symlink to another folder: `summarize` refuses in one line, and
    writes nothing into the folder it points to (today: the lock, tables and figures land
    there, replacing files of the same names)."""
    _copy(done_run, tmp_path / "sweep" / "seed=0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "runs.csv").write_text("the user's own table\n")
    (tmp_path / "sweep" / "summary").symlink_to(elsewhere)
    out = cli("summarize", str(tmp_path / "sweep"), cwd=tmp_path, timeout=TIMEOUT)
    _one_line(out, str(tmp_path / "sweep" / "summary"), ": a symlink")
    assert [p.name for p in elsewhere.iterdir()] == ["runs.csv"]
    assert (elsewhere / "runs.csv").read_text() == "the user's own table\n"


def test_a_sweep_job_folder_holding_a_symlink_is_refused_before_any_job_runs(tmp_path,
                                                                             monkeypatch, capsys):
    """In a multirun, each existing job folder of the sweep is checked before Hydra writes into
    any of them: a job folder whose .hydra/config.yaml is a symlink stops the sweep in one line,
    exit 2, and the target keeps its bytes (today Hydra writes the job's config into it)."""
    victim, content = _victim(tmp_path)
    sweep = tmp_path / "sweep"
    (sweep / "seed=1" / ".hydra").mkdir(parents=True)
    (sweep / "seed=1" / ".hydra" / "config.yaml").symlink_to(victim)
    out = in_process(["train", "-m", *TINY, f"data.root={tmp_path / 'data'}", "seed=0,1",
                      f"hydra.sweep.dir={sweep}"], tmp_path, monkeypatch, capsys)
    _one_line(out, str(sweep / "seed=1" / ".hydra" / "config.yaml"), ": a symlink")
    assert victim.read_bytes() == content
    assert sorted(p.name for p in sweep.iterdir()) == ["seed=1"]  # no job ran, no multirun.yaml


# ------------------------------------------------------------------ FIFOs: never block
@pytest.mark.parametrize("name", [LOCK_NAME, "run.json", "metrics.parquet"])
def test_a_fifo_in_a_run_folder_is_refused_without_hanging(name, tmp_path):
    """A FIFO where the lock, run.json or metrics.parquet goes: `train` exits 2 in one line
    naming it, at once (today: blocks forever opening it, or replaces it), and the FIFO is still
    there."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.mkfifo(run_dir / name)
    out = cli("train", *TINY, f"data.root={tmp_path / 'data'}", f"hydra.run.dir={run_dir}",
              cwd=tmp_path, timeout=TIMEOUT)
    _one_line(out, str(run_dir / name), ": a FIFO")
    assert stat.S_ISFIFO(os.lstat(run_dir / name).st_mode)
    assert sorted(p.name for p in run_dir.iterdir()) == [name]


@pytest.mark.parametrize("name", ["run.json", "metrics.parquet"])
def test_summarize_refuses_a_fifo_in_a_run_without_hanging(name, done_run, tmp_path):
    """`summarize` over a folder where one run's run.json or metrics.parquet is a FIFO: one line
    naming it, exit 2, nothing written (today it blocks forever reading it)."""
    _copy(done_run, tmp_path / "sweep" / "seed=0")
    run_dir = _copy(done_run, tmp_path / "sweep" / "seed=1")
    (run_dir / name).unlink()
    os.mkfifo(run_dir / name)
    out = cli("summarize", str(tmp_path / "sweep"), cwd=tmp_path, timeout=TIMEOUT)
    _one_line(out, str(run_dir / name), ": a FIFO")
    assert stat.S_ISFIFO(os.lstat(run_dir / name).st_mode)
    assert not (tmp_path / "sweep" / "summary").exists()


# ------------------------------------------------------------------ the wrong kind of entry
@pytest.mark.parametrize("name,make,what", [
    (LOCK_NAME, "dir", "a folder"),
    ("run.json", "dir", "a folder"),
    ("checkpoints/last.ckpt", "dir", "a folder"),
    ("checkpoints", "file", "a file"),
])
def test_the_wrong_kind_of_entry_is_refused_and_left_as_it_is(name, make, what, done_run,
                                                              tmp_path, monkeypatch, capsys):
    """A folder where the lock, run.json or last.ckpt goes, a file where checkpoints/ goes: one
    line naming it, exit 2, and the user's folder (with a file in it) or file left as it was
    (today a traceback, or the folder deleted). For a run that completed before, too: its
    run.json and metrics.parquet stay as they were."""
    run_dir = _copy(done_run, tmp_path / "run")
    target = run_dir / name
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    if make == "dir":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    else:
        target.write_text("mine")
    kept = {p: p.read_bytes() for p in (run_dir / "run.json", run_dir / "metrics.parquet")
            if p.is_file()}
    out = in_process(["train", *TINY, f"data.root={tmp_path / 'data'}",
                      f"hydra.run.dir={run_dir}", "resume=false"], tmp_path, monkeypatch, capsys)
    _one_line(out, f"{target}: {what}")
    if make == "dir":
        assert (target / "notes.txt").read_text() == "mine"
    else:
        assert target.read_text() == "mine"
    assert all(p.read_bytes() == b for p, b in kept.items())


def test_an_atomic_write_never_replaces_what_it_did_not_make(tmp_path):
    """records.atomic_write_bytes (every record file, checkpoint and summary): a symlink or FIFO
    at the path is refused (one line naming it) and left as it is; the symlink's target is not
    written. A plain file is replaced as before."""
    from autograd_lab.disk.files import atomic_write_bytes
    from autograd_lab.disk.lock import ForeignEntry

    victim, content = _victim(tmp_path)
    (tmp_path / "link").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(ForeignEntry, match=f"{tmp_path / name}: a (symlink|FIFO)"):
            atomic_write_bytes(tmp_path / name, b"new")
    assert victim.read_bytes() == content and (tmp_path / "link").is_symlink()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "victim.txt"]
    atomic_write_bytes(victim, b"new")
    assert victim.read_bytes() == b"new"


# ------------------------------------------------------------------ the loser of the lock
def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sweep_job_that_loses_the_lock_writes_nothing_into_the_holders_folder(tmp_path):
    """Two identical sweeps into one hydra.sweep.dir: while another process holds a job folder
    (here: this test, as the first sweep's job would), the second sweep's job says in one line who
    holds it and writes no run.json ("failed") there; the holder's files keep their bytes
    (Hydra's own .hydra/ record of the identical job aside)."""
    sweep = tmp_path / "sweep"
    job = sweep / "seed=0"
    (job / "checkpoints").mkdir(parents=True)
    (job / "checkpoints" / "last.ckpt").write_bytes(b"the holder's checkpoint")
    with RunLock(job):
        before = _digests(job)
        out = cli("train", "-m", *TINY, f"data.root={tmp_path / 'data'}", "seed=0,1",
                  f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=TIMEOUT)
        after = _digests(job)
    held = [ln for ln in out.stderr.splitlines() if "in use by another autograd-lab" in ln]
    assert len(held) == 1 and f"pid {os.getpid()}" in held[0], out.stderr[-3000:]
    assert held[0].startswith(f"autograd-lab: error: {job}")
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert not (job / "run.json").exists()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml",
                       "train.log"}, changed
    assert (job / "checkpoints" / "last.ckpt").read_bytes() == b"the holder's checkpoint"
    assert json.loads((job / LOCK_NAME).read_text())["pid"] == os.getpid()
    other = json.loads((sweep / "seed=1" / "run.json").read_text())  # the sweep went on
    assert other["status"] == "completed"


def test_a_run_called_from_python_checks_too(tmp_path, data_root):
    """train.run (notebooks, tests) takes the same lock and checks: a symlinked run.json is a
    one-line UserError naming it, and its target is untouched."""
    from autograd_lab.errors import UserError
    from autograd_lab.train import run

    victim, content = _victim(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").symlink_to(victim)
    with pytest.raises(UserError, match="run.json: a symlink"):
        run(make_cfg("trainer.max_steps=2", data_root=data_root), run_dir)
    assert victim.read_bytes() == content
