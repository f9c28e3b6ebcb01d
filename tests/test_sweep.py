"""Sweeps through the CLI (its entry point, cli.main, in this process; the real console script
where a kill needs a process of its own): failures don't sink them, finished jobs are skipped,
summaries agree with the run records they came from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli, in_process

from autograd_lab.sweep.runs import load_curves, load_runs
from autograd_lab.text import fmt_number

SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=128", "trainer.max_epochs=1",
         "probes=off"]


def _records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/run.json")}


def test_failing_and_diverging_jobs_do_not_sink_the_sweep(tmp_path, data_root, monkeypatch,
                                                         capsys):
    sweep = tmp_path / "sweep"
    out = in_process(["train", "-m", *SMALL, f"data.root={data_root}", "log.flush_every_s=0.001",
                      f"model.weights_path=null,{tmp_path / 'missing.pt'}", "optim.lr=0.001,1e8",
                      f"hydra.sweep.dir={sweep}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 1  # one line per failed run, non-zero exit
    assert "Traceback" not in out.stderr
    failed_lines = [ln for ln in out.stderr.splitlines() if ln.startswith("failed: ")]
    assert len(failed_lines) == 2 and all("missing.pt" in ln for ln in failed_lines)
    records = _records(sweep)
    statuses = sorted((r["config"]["model"]["weights_path"] is None, r["config"]["optim"]["lr"],
                       r["status"]) for r in records.values())
    assert statuses == [(False, 0.001, "failed"), (False, 1e8, "failed"),
                        (True, 0.001, "completed"), (True, 1e8, "diverged")]
    runs = pd.read_csv(sweep / "summary" / "runs.csv")
    assert sorted(runs.status) == ["completed", "diverged", "failed", "failed"]
    assert "missing.pt" in (sweep / "summary" / "summary.md").read_text()
    # one line a job as it ends; the diverged one says at which step
    (name, record), = [(n, r) for n, r in records.items() if r["status"] == "diverged"]
    step = int(record["error"].rsplit(" ", 1)[1])
    ends = [ln for ln in out.stderr.splitlines() if ln.startswith(f"autograd-lab: {sweep}/{name}")
            or ln.startswith(f"autograd-lab: sweep/{name}")]
    assert ends[-1].endswith(f"(non-finite loss at step {step})") and ": diverged, " in ends[-1]
    table = out.stdout.split("summary: ")[0]  # the end-of-sweep table: a row per run
    assert sum(status in table for status in ("completed", "diverged", "failed")) == 3
    assert len([ln for ln in table.splitlines() if " failed " in ln]) == 2


def test_summary_numbers_come_from_the_run_records(tmp_path, data_root, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    out = in_process(["train", "-m", "experiment=zero_grad_study", *SMALL,
                      f"data.root={data_root}", "seed=0,1", f"hydra.sweep.dir={sweep}"],
                     tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    # the command that opens it, pasteable as is where the sweep was started (the venv's own
    # console script; the folder as the user would type it, relative to where they are)
    exe = Path(sys.executable).parent / "autograd-lab"
    assert f"tensorboard: {exe} tensorboard {sweep.relative_to(tmp_path)}\n" in out.stdout
    records = _records(sweep)
    runs = load_runs(sweep)
    assert runs.attrs["swept"] == ["train.zero_grad"]  # seed is averaged over, not a group
    for _, row in runs.iterrows():
        record = records[row.run]
        assert row.val_acc == record["final"]["val_acc"]
        assert row.images_per_s == record["images_per_s"]
        assert row["train.zero_grad"] == record["config"]["train"]["zero_grad"]
    off = [r["final"]["val_loss"] for r in records.values()
           if not r["config"]["train"]["zero_grad"]]
    md = (sweep / "summary" / "summary.md").read_text()
    mean, std = pd.Series(off).mean(), pd.Series(off).std()
    assert f"{fmt_number(mean)} ± {fmt_number(std, digits=2)}" in md
    curves = load_curves(sweep)
    assert set(curves.run) == set(records)
    assert len(curves[curves.name == "train/loss"]) == 4 * 8
    assert pd.read_parquet(sweep / "summary" / "curves.parquet").equals(curves)
    png = sweep / "summary" / "zero_grad_study_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerunning_an_interrupted_sweep_skips_finished_jobs(tmp_path, data_root, monkeypatch,
                                                           capsys):
    sweep = tmp_path / "sweep"
    args = ["train", "-m", *SMALL, f"data.root={data_root}", "seed=0,1,2,3",
            f"hydra.sweep.dir={sweep}"]
    exe = Path(sys.executable).parent / "autograd-lab"
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not list(sweep.glob("*/run.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # a hard kill between or inside jobs
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/run.json")
            if json.loads(p.read_text())["status"] == "completed"}
    assert 1 <= len(done) < 4
    out = in_process(args, tmp_path, monkeypatch, capsys)  # the kill needed a process; this not
    assert out.returncode == 0, out.stderr
    assert out.stderr.count(": skipped, already completed with this config") == len(done)
    records = _records(sweep)
    assert len(records) == 4 and all(r["status"] == "completed" for r in records.values())
    for name, mtime in done.items():  # finished jobs were not run again
        assert (sweep / name / "run.json").stat().st_mtime_ns == mtime
    again = in_process([*args, "resume=false"], tmp_path, monkeypatch, capsys)
    assert again.returncode == 0 and "skipped" not in again.stderr


@pytest.mark.parametrize("make", ["empty", "unrelated", "newer"])
def test_summarize_refuses_folders_without_runs(make, tmp_path, monkeypatch, capsys):
    target = tmp_path / "d"
    target.mkdir()
    if make == "unrelated":
        (target / "notes.txt").write_text("hello")
    if make == "newer":
        (target / "run").mkdir()
        (target / "run" / "run.json").write_text(json.dumps({"format_version": 99}))
    out = in_process(["summarize", str(target)], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(target) in out.stderr
    assert ("newer" in out.stderr) if make == "newer" else ("no runs found" in out.stderr)
    assert list(target.rglob("summary")) == []


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_complete_and_summarise_with_one_thread_per_job(launcher, tmp_path,
                                                                           data_root, monkeypatch,
                                                                           capsys):
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    out = in_process(["train", "-m", f"hydra/launcher={launcher}", *extra, *SMALL,
                      f"data.root={data_root}", "seed=0,1", f"hydra.sweep.dir={sweep}"],
                     tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    records = _records(sweep)
    assert len(records) == 2 and all(r["status"] == "completed" for r in records.values())
    assert {r["versions"]["threads"] for r in records.values()} == {1}
    assert len({r["versions"]["pid"] for r in records.values()} - {os.getpid()}) >= 1
    assert len(pd.read_csv(sweep / "summary" / "runs.csv")) == 2


def test_the_slurm_launcher_config_composes(tmp_path):
    out = cli("train", "--cfg", "hydra", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
              "hydra.launcher.timeout_min=30", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "SlurmLauncher" in out.stdout and "partition: gpu" in out.stdout
    assert "timeout_min: 30" in out.stdout and "array_parallelism: 32" in out.stdout


def test_a_job_killed_before_its_record_is_listed_as_interrupted(tmp_path):
    """SIGKILL leaves a Hydra job dir without run.json: the summary lists it, with its config
    resolved (interpolations included) and its group choices."""
    job = tmp_path / "sweep" / "seed=1,variant=frozen_early"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(
        "seed: 1\nmodel:\n  name: smallnet\n  early_stages: [conv.*]\n"
        "train:\n  freeze: ${model.early_stages}\n")
    (job / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      variant: frozen_early\n"
        "      hydra/launcher: basic\n")
    runs = load_runs(tmp_path / "sweep")
    row = runs.iloc[0]
    assert row.status == "interrupted" and "killed" in row.error
    assert row["train.freeze"] == "['conv.*']" and row["variant"] == "frozen_early"


def test_rerunning_a_sweep_command_finds_its_folder_and_runs_only_what_is_new(tmp_path,
                                                                             data_root,
                                                                             monkeypatch, capsys):
    """No hydra.sweep.dir: the folder is named from the command, so the same command skips
    every job, and a new value of the swept key runs only its own job."""
    args = ["train", "-m", *SMALL, f"data.root={data_root}", "trainer.max_steps=2"]

    def cli(*args, cwd):
        return in_process(args, cwd, monkeypatch, capsys)

    first = cli(*args, "seed=0,1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (sweep,) = (tmp_path / "multirun").iterdir()
    assert sweep.name == ("data.test_size=128,data.train_size=256,data=synthetic,probes=off,"
                          "trainer.max_epochs=1,trainer.max_steps=2")
    runs = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/run.json")}
    assert sorted(runs) == ["seed=0", "seed=1"]

    again = cli(*args, "seed=0,1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    said = [ln for ln in again.stderr.splitlines() if ln.startswith("autograd-lab: ")]
    assert said == [f"autograd-lab: multirun/{sweep.name}/seed={s}: skipped, already completed "
                    f"with this config (resume=false runs it again)" for s in (0, 1)]
    assert {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/run.json")} == runs

    more = cli(*args, "seed=0,1,2", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert sum("skipped" in ln for ln in more.stderr.splitlines()) == 2
    assert sum(": starting" in ln for ln in more.stderr.splitlines()) == 1
    after = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/run.json")}
    assert sorted(after) == ["seed=0", "seed=1", "seed=2"]
    assert {k: after[k] for k in runs} == runs  # the finished jobs were not touched
    assert list((tmp_path / "multirun").iterdir()) == [sweep]  # still one sweep folder
