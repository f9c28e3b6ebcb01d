"""Exact resume with Lightning's callbacks: a stop signal that lands in an epoch's last step or in
validation (the checkpoint is then taken at the epoch's end, after every callback has seen that
validation) resumes to the uninterrupted run: every metrics.parquet row, the stop step and
reason, and the callbacks' own results (ModelCheckpoint's files and best_model_path, what
LearningRateMonitor logged).

The oracle is an uninterrupted run of the same config.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_cfg
from test_resume import SendSignal

from autograd_lab.train import run

# 256 examples at batch 16: 16 steps an epoch
BASE = ["data.train_size=256", "data.test_size=64", "data.batch_size=16", "data.val_batch_size=16",
        "trainer.max_epochs=6", "log.flush_every_s=1000", "probes=off"]
# lr 0.5 overshoots: val/loss stops improving after epoch 0, EarlyStopping (patience 1) stops
# the run after epoch 1, at step 32 of 96
EARLY = ["callbacks=[early_stopping]", "callbacks.early_stopping.patience=1", "optim.lr=0.5"]
CHECKPOINTS = ["callbacks=[model_checkpoint]", "callbacks.model_checkpoint.monitor=val/loss",
               "callbacks.model_checkpoint.save_top_k=2", "trainer.max_epochs=3"]
LR_MONITOR = ["callbacks=[lr_monitor]", "scheduler=step", "scheduler.make.step_size=1",
              "logger=[tensorboard,csv]", "trainer.max_epochs=3"]

CASES = [  # (callback overrides, step of the signal, where)
    (EARLY, 32, "train"),        # the last step of the epoch where EarlyStopping stops the run
    (EARLY, 32, "validation"),   # during that epoch's validation
    (EARLY, 16, "validation"),   # an epoch earlier: EarlyStopping's counters must carry over
    (CHECKPOINTS, 16, "train"),
    (CHECKPOINTS, 32, "validation"),
    (LR_MONITOR, 16, "train"),
    (LR_MONITOR, 32, "validation"),
]


def _rows(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    frame = frame[~frame.name.str.startswith("time/")]  # wall-clock timings differ by nature
    return frame.sort_values(["step", "name"]).reset_index(drop=True)


def _checkpoint_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))


def _model_checkpoint_state(run_dir: Path) -> dict:
    """ModelCheckpoint's state in the final checkpoint, paths relative to the run directory."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    [(key, state)] = [(k, v) for k, v in ckpt["callbacks"].items()
                      if k.startswith("ModelCheckpoint")]
    return {"best_model_path": Path(state["best_model_path"]).relative_to(run_dir),
            "best_model_score": float(state["best_model_score"]),
            "best_k_models": sorted((Path(p).relative_to(run_dir).as_posix(), float(v))
                                    for p, v in state["best_k_models"].items())}


def _csv_rows(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "csv" / "metrics.csv")
    timings = ("whole_run/images_per_s", "whole_run/seconds_per_step")  # differ by nature
    frame = frame[[c for c in frame.columns if not c.startswith("time/") and c not in timings]]
    frame = frame.melt(id_vars=["step"]).dropna()
    return frame.sort_values(["step", "variable"]).reset_index(drop=True)


_REFERENCES: dict[tuple, Path] = {}


def _reference(overrides: tuple, data_root: Path, tmp_path_factory) -> Path:
    if overrides not in _REFERENCES:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        assert run(make_cfg(*overrides, data_root=data_root), run_dir)["status"] == "completed"
        _REFERENCES[overrides] = run_dir
    return _REFERENCES[overrides]


@pytest.mark.parametrize(("callbacks", "step", "where"), CASES,
                         ids=[f"{c[0][0]}@{c[1]}:{c[2]}" for c in CASES])
def test_a_signal_at_an_epoch_end_resumes_to_the_same_run(callbacks, step, where, tmp_path,
                                                          data_root, tmp_path_factory):
    overrides = (*BASE, *callbacks)
    reference = _reference(overrides, data_root, tmp_path_factory)
    expected = json.loads((reference / "run.json").read_text())
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run(make_cfg(*overrides, data_root=data_root), run_dir,
            callbacks=[SendSignal(step, where, signal.SIGTERM)])
    assert stop.value.code == 143
    assert f"at step {step}" in json.loads((run_dir / "run.json").read_text())["error"]

    resumed = run(make_cfg(*overrides, data_root=data_root), run_dir)  # the same command again
    assert resumed["status"] == "completed"
    assert resumed["resumed"]["from_step"] == step
    assert resumed["final"]["steps"] == expected["final"]["steps"]
    assert resumed["stop_reason"] == expected["stop_reason"]
    pd.testing.assert_frame_equal(_rows(run_dir), _rows(reference), check_exact=True)
    if callbacks is EARLY:
        assert expected["final"]["steps"] == 32 and expected["stop_reason"].startswith(
            "early_stopping:")
    if callbacks is CHECKPOINTS:
        assert _checkpoint_files(run_dir) == _checkpoint_files(reference)
        assert _model_checkpoint_state(run_dir) == _model_checkpoint_state(reference)
        # its files are written in the epoch's end hooks, before the Checkpointer's save there
        # (the signal's): a run continued from one starts the next epoch, with no save due
        # (the Checkpointer tells by Lightning's epoch progress: processed, not yet completed)
        for name in _checkpoint_files(run_dir):
            if name != "last.ckpt":
                ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
                assert ckpt["callbacks"]["Checkpointer"] == {"at_epoch_end": False}, name
    if callbacks is LR_MONITOR:  # what LearningRateMonitor logged: every step's rate, once
        ours, theirs = _csv_rows(run_dir), _csv_rows(reference)
        assert (theirs.variable == "lr-SGD").sum() == expected["final"]["steps"]
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
