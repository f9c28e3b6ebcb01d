"""One identity per configuration in a sweep folder: a job whose result-relevant config
(config.comparable) is already a run of the folder IS that run, whatever the spelling of its
overrides; two jobs of one command that are the same run are refused before any job starts."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import in_process

from autograd_lab.config.compose import compose
from autograd_lab.config.keys import identity_key

TINY = ["data.train_size=64", "data.test_size=32", "trainer.max_steps=2", "probes=off",
        "threads=1", "trainer.progress_bar=false"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_identity_leaves_out_spelling_and_non_result_keys():
    base = identity_key(compose(["data=synthetic"]))
    assert identity_key(compose(["data=synthetic", "seed=0"])) == base  # seed 0 is the default
    assert identity_key(compose(["data=synthetic", "threads=2", "resume=false"])) == base
    assert identity_key(compose(["data=synthetic", "optim.lr=1e-3"])) == base  # sgd's default
    assert identity_key(compose(["data=synthetic", "seed=1"])) != base
    assert identity_key(compose(["data=synthetic", "optim.lr=0.01"])) != base


def test_the_readme_seed_sweep_after_the_demo_reuses_the_demo_runs(tmp_path, data_root,
                                                                   monkeypatch, capsys):
    """`make demo`, then `autograd-lab train -m experiment=zero_grad_study data=synthetic
    seed=0,1` (both through the CLI's entry point, in-process): the seed=0 jobs are the demo's
    runs (skipped), the folder holds 4 runs, not 6."""
    tiny = [*TINY, f"data.root={data_root}"]

    def cli(*args, cwd):
        return in_process(args, cwd, monkeypatch, capsys)

    first = cli("demo", *tiny, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (sweep,) = [p for p in (tmp_path / "multirun" / "zero_grad_study").iterdir()]
    demo_runs = {d.name: (_digest(d / "run.json"), _digest(d / "metrics.parquet"))
                 for d in sweep.iterdir() if (d / "run.json").is_file()}
    assert sorted(demo_runs) == ["train.zero_grad=false", "train.zero_grad=true"]

    second = cli("train", "-m", "experiment=zero_grad_study", "data=synthetic", *tiny,
                 "seed=0,1", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert [p.name for p in (tmp_path / "multirun" / "zero_grad_study").iterdir()] == [
        sweep.name]  # the same sweep folder
    jobs = sorted(d.name for d in sweep.iterdir() if (d / "run.json").is_file())
    assert jobs == ["seed=1,train.zero_grad=false", "seed=1,train.zero_grad=true",
                    "train.zero_grad=false", "train.zero_grad=true"]
    assert not [d for d in sweep.iterdir() if d.name.startswith("seed=0")]
    skipped = [ln for ln in second.stderr.splitlines() if "skipped" in ln]
    assert len(skipped) == 2 and all("/train.zero_grad=" in ln for ln in skipped), skipped
    for name, digests in demo_runs.items():  # the demo's runs are kept as they were
        assert (_digest(sweep / name / "run.json"), _digest(sweep / name / "metrics.parquet")
                ) == digests
    records = {d: json.loads((sweep / d / "run.json").read_text()) for d in jobs}
    assert all(r["status"] == "completed" for r in records.values())
    assert len({identity_key(r["config"]) for r in records.values()}) == 4  # four runs
    table = second.stdout.split("summary: ")[0]  # the end-of-sweep table: one row a run
    assert sum(" completed " in ln for ln in table.splitlines()) == 4, table
    runs = pd.read_csv(sweep / "summary" / "runs.csv")
    assert len(runs) == 4
    assert sorted(runs.groupby("train.zero_grad").size().tolist()) == [2, 2]  # n=2 per group


def test_a_hard_killed_job_is_found_by_its_hydra_config(tmp_path):
    """A job killed before writing run.json has only Hydra's .hydra/config.yaml: a job of the
    same configuration, spelt another way, continues in that folder."""
    from omegaconf import OmegaConf

    from autograd_lab.sweep.callbacks import job_folder

    killed = tmp_path / "train.zero_grad=false"
    (killed / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(["data=synthetic", "train.zero_grad=false"]),
                   killed / ".hydra" / "config.yaml")
    (tmp_path / "summary").mkdir()
    root = compose(["data=synthetic", "seed=0", "train.zero_grad=false"],
                   return_hydra_config=True)
    root.hydra.sweep.dir = str(tmp_path)
    assert job_folder("seed=0,train.zero_grad=false", root) == "train.zero_grad=false"
    other = compose(["data=synthetic", "seed=1", "train.zero_grad=false"],
                    return_hydra_config=True)
    other.hydra.sweep.dir = str(tmp_path)
    assert job_folder("seed=1,train.zero_grad=false", other) == "seed=1,train.zero_grad=false"


def test_jobs_of_one_command_that_are_one_run_are_refused(tmp_path, data_root, monkeypatch,
                                                         capsys):
    cases = {"threads=1,2": "threads does not change a run's results",
             "resume=true,false": "resume does not change a run's results",
             "seed=0,0": "a value given twice"}
    for swept, why in cases.items():
        out = in_process(["train", "-m", "data=synthetic", *TINY, f"data.root={data_root}",
                           swept], tmp_path, monkeypatch, capsys)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        errors = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(errors) == 1 and errors[0].startswith(f"autograd-lab: error: {swept}: "), \
            out.stderr
        assert why in errors[0]
        assert list(tmp_path.iterdir()) == []  # no sweep folder, no job folder


def test_python_m_refuses_them_too(tmp_path, data_root):
    out = subprocess.run([sys.executable, "-m", "autograd_lab.train", "-m", "data=synthetic",
                          *TINY, f"data.root={data_root}", "threads=1,2"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "threads=1,2: threads does not change" in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []
