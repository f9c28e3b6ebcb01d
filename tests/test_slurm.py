"""`hydra/launcher=slurm` against a real one-node SLURM (scripts/slurm_local.sh), started once for
these tests and stopped after them: a sweep completes with the basic launcher's curves bit for
bit; jobs preempted by submitit's signal and by SLURM itself are requeued and resume to the
uninterrupted curve; a failing job is not requeued; fire-and-forget returns at once and a re-run
submits only what is missing or failed.

The oracle for every curve is the same config run in this process (`train.run`, one thread, as
each SLURM job has one CPU): metrics.parquet rows equal, not close (wall-clock timings left out).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, cli, make_cfg

from autograd_lab.sweep.runs import load_runs
from autograd_lab.sweep.slurm_queue import slurm_job_state
from autograd_lab.train import run

pytestmark = pytest.mark.slurm

TINY = ["data=synthetic", "data.train_size=256", "data.test_size=64", "trainer.max_epochs=1",
        "probes=off"]
# long enough to be stopped mid-run: 256 steps an epoch, a checkpoint every 100 steps
LONG = ["data=synthetic", "data.train_size=2048", "data.test_size=64", "data.batch_size=8",
        "trainer.max_epochs=8", "probes=off", "checkpoint.every_n_steps=100"]


class Cluster:
    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {"SLURM_CONF": str(folder / "etc" / "slurm.conf")}

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, env={**os.environ, **self.env}, capture_output=True,
                              text=True, timeout=60)

    def wait_idle(self, timeout: float = 180) -> None:
        """Until SLURM has no job left (pending, running or completing)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("squeue", "-h", "-o", "%i %T")
            assert out.returncode == 0, out.stderr
            if not out.stdout.strip():
                return
            assert time.monotonic() < deadline, f"jobs still there: {out.stdout}"
            time.sleep(0.2)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The local cluster for this session; installs the Debian packages if missing. Skipped
    (with the reason) only when they cannot be installed, and never on CI."""
    folder = tmp_path_factory.mktemp("slurm")
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "start", str(folder)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode == 3 and not os.environ.get("CI"):
        reason = (out.stderr.strip().splitlines() or ["exit 3"])[-1]
        pytest.skip(f"no local SLURM: {reason}")
    assert out.returncode == 0, f"the local SLURM did not start:\n{out.stderr}"
    cluster = Cluster(folder)
    yield cluster
    subprocess.run(["bash", str(REPO / "scripts" / "slurm_local.sh"), "stop", str(folder)],
                   capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def _held(cluster: Cluster):
    """The node drained (it starts no job; submitted jobs stay pending) for the block's length."""
    node = cluster.run("sinfo", "-h", "-o", "%N").stdout.strip()
    out = cluster.run("scontrol", "update", f"NodeName={node}", "State=DRAIN",
                      "Reason=held by a test")
    assert out.returncode == 0, out.stderr
    try:
        yield
    finally:
        out = cluster.run("scontrol", "update", f"NodeName={node}", "State=RESUME")
        assert out.returncode == 0, out.stderr


def _rows(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    frame = frame[~frame.name.str.startswith("time/")]  # wall-clock timings differ by nature
    return frame.sort_values(["step", "name"]).reset_index(drop=True)


def _reference(overrides: list[str], data_root: Path, run_dir: Path) -> Path:
    """The uninterrupted run of this config in this process, one torch thread."""
    record = run(make_cfg(*overrides, data_root=data_root, small=False), run_dir, threads=1)
    assert record["status"] == "completed"
    return run_dir


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _log(record: dict) -> str:
    return Path(record["slurm"]["stderr"]).read_text()


def test_a_sweep_completes_with_the_basic_launchers_curves_bit_for_bit(slurm, data_root,
                                                                        tmp_path):
    names = [f"seed={s},train.zero_grad={z}" for s in (0, 1) for z in ("false", "true")]
    references = {name: _reference([*TINY, *name.split(",")], data_root, tmp_path / "ref" / name)
                  for name in names}
    sweep = tmp_path / "sweep"
    out = cli("train", "-m", "hydra/launcher=slurm", *TINY, f"data.root={data_root}",
              "seed=0,1", "train.zero_grad=true,false", f"hydra.sweep.dir={sweep}",
              cwd=tmp_path, env=slurm.env)
    assert out.returncode == 0, out.stderr
    records = {name: _record(sweep / name) for name in names}
    assert all(r["status"] == "completed" for r in records.values())
    # one SLURM array, one task per job; each run.json says which, and the command said so
    ids = {name: r["slurm"]["job_id"] for name, r in records.items()}
    assert all(re.fullmatch(r"\d+_[0-3]", i) for i in ids.values()) and len(set(ids.values())) == 4
    assert len({i.split("_")[0] for i in ids.values()}) == 1
    for name, job_id in ids.items():
        assert f"submitted {name}: SLURM job {job_id}" in out.stdout
        record = records[name]
        assert record["slurm"]["restarts"] == 0 and record["slurm"]["partition"] == "local"
        assert record["versions"]["threads"] == 1  # torch threads = the job's CPUs per task
        # the job's stdout/stderr sit in the sweep directory, beside the job directories
        assert Path(record["slurm"]["stdout"]).parent == sweep / "slurm"
        assert f"{name}: completed" in _log(record)
    runs = pd.read_csv(sweep / "summary" / "runs.csv")
    assert sorted(runs.run) == sorted(names) and set(runs.status) == {"completed"}
    for name in names:
        pd.testing.assert_frame_equal(_rows(sweep / name), _rows(references[name]),
                                      check_exact=True)


def test_preempted_jobs_are_requeued_and_resume_to_the_same_curve(slurm, data_root, tmp_path):
    """seed=0 gets submitit's preemption signal (scancel --signal=USR2: the job asks to be
    requeued); seed=1 is requeued by SLURM itself (scontrol requeue: SIGTERM, SLURM requeues)."""
    references = {s: _reference([*LONG, f"seed={s}"], data_root, tmp_path / "ref" / f"seed={s}")
                  for s in (0, 1)}
    sweep = tmp_path / "sweep"
    command = [str(Path(sys.executable).parent / "autograd-lab"), "train", "-m",
               "hydra/launcher=slurm", *LONG, f"data.root={data_root}", "seed=0,1",
               f"hydra.sweep.dir={sweep}"]
    sweeping = subprocess.Popen(command, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **slurm.env})
    how = {0: ("scancel", "--signal=USR2"), 1: ("scontrol", "requeue")}
    stopped = set()
    deadline = time.monotonic() + 120
    while len(stopped) < 2 and sweeping.poll() is None and time.monotonic() < deadline:
        for seed in set(how) - stopped:  # stop each job once it has a checkpoint (step 100)
            job = sweep / f"seed={seed}"
            if (job / "checkpoints" / "last.ckpt").is_file():
                job_id = json.loads((job / "slurm.json").read_text())["job_id"]
                out = slurm.run(*how[seed], job_id)
                assert out.returncode == 0, out.stderr
                stopped.add(seed)
        time.sleep(0.02)
    assert stopped == {0, 1}, "the jobs ended (or never started) before they could be stopped"
    stdout, stderr = sweeping.communicate(timeout=300)
    assert sweeping.returncode == 0, stderr
    for seed, signal_name, requeued_by_us in ((0, "SIGUSR2", 1), (1, "SIGTERM", 0)):
        job = sweep / f"seed={seed}"
        record = _record(job)
        assert record["status"] == "completed"
        assert 0 < record["resumed"]["from_step"] < 2048  # saved mid-run, at a step boundary
        assert record["slurm"]["restarts"] == 1  # one requeue, whoever asked for it
        assert record["slurm"]["requeues"] == requeued_by_us
        log = _log(record)
        assert f"interrupted by {signal_name} at step {record['resumed']['from_step']}" in log
        assert f"resuming from step {record['resumed']['from_step']}" in log
        pd.testing.assert_frame_equal(_rows(job), _rows(references[seed]), check_exact=True)
    assert "requeued (1 of 3)" in _log(_record(sweep / "seed=0"))
    assert set(pd.read_csv(sweep / "summary" / "runs.csv").status) == {"completed"}


def test_fire_and_forget_and_a_rerun_submits_only_what_failed(slurm, data_root, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])  # for slurm_job_state here
    sweep = tmp_path / "sweep"
    missing = tmp_path / "missing.pt"  # a bad value: the job fails (and is not requeued)
    command = ["train", "-m", "hydra/launcher=slurm", "hydra.launcher.wait=false", *TINY,
               f"data.root={data_root}", f"model.weights_path=null,{missing}",
               f"hydra.sweep.dir={sweep}"]
    with _held(slurm):  # the node starts no job until both commands ran: no race
        # returns although no job can start: it does not wait for them (no timing assertion)
        out = cli(*command, cwd=tmp_path, env=slurm.env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("submitted ") == 2 and f"sweep: {sweep}" in out.stdout
        jobs = [d for d in sweep.iterdir() if (d / "slurm.json").is_file()]
        assert len(jobs) == 2
        good = next(d for d in jobs if d.name.endswith("=null"))
        bad = next(d for d in jobs if d != good)
        # SLURM has them (pending or running): what `autograd-lab summarize` lists as running
        assert {slurm_job_state(d) for d in jobs} <= {"pending", "configuring", "running",
                                                      "completing"}
        assert None not in {slurm_job_state(d) for d in jobs}
        listed = load_runs(sweep).set_index("run")  # what `autograd-lab summarize` reads
        still = {d.name for d in jobs if slurm_job_state(d) is not None}  # so also while listed
        assert still, "both jobs ended before they could be listed"
        for name in still:
            assert listed.loc[name, "status"] == "running", listed.loc[name].to_dict()
            assert listed.loc[name, "error"].startswith("SLURM job ")

        again = cli(*command, cwd=tmp_path, env=slurm.env)  # while SLURM has them: left alone
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("left alone ") == 2 and "submitted " not in again.stdout

    slurm.wait_idle()  # the jobs, then the summary job that waited for them
    assert {slurm_job_state(d) for d in jobs} == {None}
    assert _record(good)["status"] == "completed"
    failed = _record(bad)
    assert failed["status"] == "failed" and str(missing) in failed["error"]
    assert failed["slurm"]["restarts"] == 0 and failed["slurm"]["requeues"] == 0
    assert _log(failed).count("starting") == 1  # it ran once
    runs = pd.read_csv(sweep / "summary" / "runs.csv").set_index("run")  # by the summary job
    assert runs.loc[good.name, "status"] == "completed"
    assert runs.loc[bad.name, "status"] == "failed" and str(missing) in runs.loc[bad.name, "error"]

    later = cli(*command, cwd=tmp_path, env=slurm.env)  # nothing for the completed job
    assert later.returncode == 0, later.stderr
    assert f"skip {good.name}: completed" in later.stdout
    assert later.stdout.count("submitted ") == 1 and f"submitted {bad.name}" in later.stdout
    slurm.wait_idle()
    assert _record(bad)["status"] == "failed"
