"""`trainer=ddp` on CPU: two processes (gloo) through the real CLI.

Oracle: with each rank taking every other position of the epoch's order, two ranks at batch b
see exactly the single-process run's batches of 2b, and DDP averages their gradients, so the
curves agree to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import cli

BASE = ["data=synthetic", "data.train_size=320", "data.test_size=128", "trainer.max_epochs=2",
        "trainer.progress_bar=false", "probes=cheap"]


def _curve(run_dir: Path, name: str = "train/loss") -> np.ndarray:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    return frame[frame.name == name].sort_values("step").value.to_numpy()


def test_ddp_two_ranks_equal_one_process_at_twice_the_batch(tmp_path, data_root):
    single = cli("train", *BASE, f"data.root={data_root}", "data.batch_size=32",
                 f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = cli("train", "trainer=ddp", *BASE, f"data.root={data_root}", "data.batch_size=16",
              f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    record = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert record["status"] == "completed" and record["world_size"] == 2
    assert record["final"]["steps"] == 20  # 320 images / (16 x 2 ranks) x 2 epochs
    for name in ("train/loss", "val/loss", "val/acc", "probes/grad_norm/all"):
        np.testing.assert_allclose(_curve(tmp_path / "ddp", name),
                                   _curve(tmp_path / "single", name), rtol=0, atol=1e-5)
    # the Hydra pitfall: no rank made an output directory of its own
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert sorted(p.name.split(".out.tfevents")[0] for p in (tmp_path / "ddp").iterdir()) == [
        ".autograd_lab.lock", ".hydra", "checkpoints", "events", "hparams.yaml",
        "metrics.parquet", "run.json", "train.log"]  # one lock: rank 0's


def test_ddp_sweep_runs_each_job_once_in_its_own_directory(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    out = cli("train", "-m", "trainer=ddp", *BASE, f"data.root={data_root}",
              "data.batch_size=16", "trainer.max_epochs=1", "seed=0,1",
              f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "summary")
    assert jobs == ["seed=0", "seed=1"]  # named by what differs: the swept key alone
    records = [json.loads(p.read_text()) for p in sweep.glob("*/run.json")]
    assert len(records) == 2 and all(r["status"] == "completed" and r["world_size"] == 2
                                     for r in records)
    assert sorted(r["config"]["seed"] for r in records) == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing else anywhere


def test_ddp_sigterm_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path, data_root):
    args = ["train", "trainer=ddp", *BASE, f"data.root={data_root}", "data.batch_size=16",
            "data.train_size=1280", "trainer.max_epochs=8", "checkpoint.every_n_steps=5",
            "train.zero_grad=false"]
    ref = cli(*args, f"hydra.run.dir={tmp_path / 'ref'}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    exe = Path(sys.executable).parent / "autograd-lab"
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([str(exe), *args, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120  # the first periodic checkpoint: training is under way
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # to rank 0 only: rank 1 must stop at the same step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    again = cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed"]["from_step"] > 0
    for name in ("train/loss", "val/loss", "val/acc", "probes/grad_norm/all"):
        assert np.array_equal(_curve(run_dir, name), _curve(tmp_path / "ref", name)), name
