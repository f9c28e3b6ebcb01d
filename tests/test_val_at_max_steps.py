"""A run that stops at `trainer.max_steps` validates at that step, once; a quoted validation that
is not at the run's last step says its step.

The oracle: the validation loss recomputed here, with plain torch, from checkpoints/last.ckpt's
weights (the final ones) loaded into a SmallNet written out in this file, on the synthetic test
split read from its CIFAR-10 batch file and normalised as the seed's transforms do.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import in_process

from autograd_lab.text import fmt_number

# 640 examples at batch 32: 20 steps an epoch
BASE = ["train", "data=synthetic", "data.train_size=640", "data.test_size=96",
        "probes=off", "threads=1", "trainer.progress_bar=false", "log.flush_every_s=1000"]


class SeedNet(nn.Module):
    """The seed's Net, written out again: Conv2d(3,3,5) -> ReLU -> MaxPool2d(2,2) -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(588, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


def _val_loss_at_final_weights(run_dir: Path, data_root: Path) -> float:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    net = SeedNet()
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    [batch_file] = data_root.glob("synthetic/*/cifar-10-batches-py/test_batch")
    with open(batch_file, "rb") as f:  # written by this test's own run: trusted
        entry = pickle.load(f)
    x = torch.from_numpy(entry["data"]).reshape(-1, 3, 32, 32).float()
    x = (x / 255 - 0.5) / 0.5  # ToTensor + Normalize((0.5,)*3, (0.5,)*3)
    y = torch.tensor(entry["labels"])
    with torch.no_grad():
        return F.cross_entropy(net.eval()(x), y).item()


def _train(tmp_path: Path, monkeypatch, capsys, *overrides: str):
    """`autograd-lab train` through its entry point in this process (one torch import less)."""
    data_root = tmp_path / "data"
    out = in_process([*BASE, f"data.root={data_root}", "hydra.run.dir=run", *overrides],
                     tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "run"
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    val = frame[frame.name == "val/loss"].sort_values("step")
    record = json.loads((run_dir / "run.json").read_text())
    return record, val, out.stderr.splitlines(), run_dir, data_root


def test_a_run_stopped_mid_epoch_validates_at_max_steps(tmp_path, monkeypatch, capsys):
    record, val, said, run_dir, data_root = _train(tmp_path, monkeypatch, capsys,
                                                   "trainer.max_steps=50")
    assert val.step.tolist() == [20, 40, 50]  # the epochs' ends, and max_steps, once each
    oracle = _val_loss_at_final_weights(run_dir, data_root)
    assert val.value.iloc[-1] == pytest.approx(oracle, rel=1e-5, abs=1e-6)
    final = record["final"]
    assert final["steps"] == 50 and final["val_step"] == 50
    assert final["val_loss"] == val.value.iloc[-1]
    assert record["stop_reason"] == "max_steps: reached trainer.max_steps=50"
    # the end line quotes it without a step: it is the run's last
    assert f"val loss {fmt_number(final['val_loss'])}, val acc " in said[-2]
    assert " at step " not in said[-2]


def test_max_steps_on_an_epoch_end_validates_once(tmp_path, monkeypatch, capsys):
    record, val, _, run_dir, data_root = _train(tmp_path, monkeypatch, capsys,
                                                "trainer.max_steps=40")
    assert val.step.tolist() == [20, 40]
    assert record["final"]["val_step"] == 40
    assert val.value.iloc[-1] == pytest.approx(_val_loss_at_final_weights(run_dir, data_root),
                                               rel=1e-5, abs=1e-6)


def test_a_validation_before_the_last_step_says_its_step(tmp_path, monkeypatch, capsys):
    """check_val_every_n_epoch=2 over 3 epochs: the last validation is at step 40 of 60."""
    record, val, said, _, _ = _train(tmp_path, monkeypatch, capsys, "trainer.max_epochs=3",
                                     "trainer.check_val_every_n_epoch=2")
    assert val.step.tolist() == [40]
    final = record["final"]
    assert final["steps"] == 60 and final["val_step"] == 40
    assert said[-2] == (f"  train loss {fmt_number(final['train_loss'])} (best "
                        f"{fmt_number(final['best_train_loss'])}), val loss "
                        f"{fmt_number(final['val_loss'])} at step 40, val acc "
                        f"{fmt_number(final['val_acc'])}")
    from autograd_lab.sweep.runs import load_runs

    runs = load_runs(tmp_path / "run")
    assert runs.val_step.tolist() == [40]  # summaries carry where it was measured


def test_sweep_table_says_the_step_of_an_earlier_validation():
    """The end-of-sweep table quotes a validation that is not at the run's last step with its
    step, and one at the last step without."""
    import pandas as pd

    from autograd_lab.job.messages import sweep_table

    runs = pd.DataFrame([
        {"run": "a", "status": "completed", "train_loss": 1.5, "val_loss": 2.3171, "val_acc": 0.1,
         "val_step": 40, "steps": 50, "wall_seconds": 3.0},
        {"run": "b", "status": "completed", "train_loss": 1.5, "val_loss": 2.25, "val_acc": 0.1,
         "val_step": 50, "steps": 50, "wall_seconds": 3.0}])
    lines = sweep_table(runs, []).splitlines()
    assert "2.32 @40" in lines[1]
    assert "@" not in lines[2] and "2.25" in lines[2]
