"""The harness is a Lightning program: one optimizer step per Lightning batch, Lightning's own
callbacks, loggers and LR schedulers from the config, checked against independent oracles
(torch's own schedulers, the run's own validation curve, an uninterrupted run)."""

from __future__ import annotations

import csv
import json

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import losses

from autograd_lab.train import run


class Steps(L.Callback):
    """What a user's per-batch hooks see."""

    def __init__(self):
        self.start, self.end = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append((trainer.global_step, batch_idx))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x, y = batch
        self.end.append((trainer.global_step, tuple(x.shape), x.dtype, tuple(y.shape)))


def test_a_users_batch_hooks_run_once_per_optimizer_step_with_x_y(train_run):
    """512 examples at batch 32, 2 epochs: 32 optimizer steps, so on_train_batch_end runs 32
    times, with the step's normalised (x, y), and global_step grows by one each time."""
    cb = Steps()
    record, run_dir = train_run("trainer.max_epochs=2", callbacks=[cb])
    steps = record["final"]["steps"]
    assert steps == len(losses(run_dir)) == 32
    assert [s for s, *_ in cb.end] == list(range(1, 33))
    assert all(shape == (32, 3, 32, 32) and dtype == torch.float32 and ys == (32,)
               for _, shape, dtype, ys in cb.end)
    assert cb.start == [(k, k % 16) for k in range(32)]  # batch_idx restarts each epoch


def _val_losses(run_dir) -> list[float]:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    return frame[frame.name == "val/loss"].sort_values("step").value.tolist()


def test_early_stopping_on_val_loss_stops_where_its_rule_says(train_run):
    """EarlyStopping(monitor=val/loss, patience=1) from the config group: a learning rate high
    enough to make val/loss rise stops the run at the first validation that does not improve on
    the best so far, and run.json says so."""
    record, run_dir = train_run(
        "callbacks=[early_stopping]", "callbacks.early_stopping.patience=1",
        "optim.lr=0.3", "optim.momentum=0.9", "trainer.max_epochs=12", "data.train_size=256")
    vals = _val_losses(run_dir)
    # the oracle: EarlyStopping's rule applied to the run's own validation curve
    stop = next(i for i in range(1, len(vals)) if not vals[i] < min(vals[:i]))
    assert len(vals) == stop + 1 < 12, vals
    assert record["status"] == "completed"
    assert record["stop_reason"].startswith("early_stopping: val/loss did not improve"), \
        record["stop_reason"]
    assert json.loads((run_dir / "run.json").read_text())["stop_reason"] == record["stop_reason"]


def test_model_checkpoint_every_n_steps_writes_files_a_run_can_continue_from(train_run,
                                                                            cfg_factory,
                                                                            tmp_path):
    """ModelCheckpoint(every_n_train_steps=10) over 32 steps writes steps 10, 20 and 30; a new
    run started from the step-10 file (ckpt_path=) ends with the uninterrupted curve and weights,
    bit for bit."""
    args = ("callbacks=[model_checkpoint]", "callbacks.model_checkpoint.every_n_train_steps=10",
            "trainer.max_epochs=2", "train.zero_grad=false", "log.flush_every_s=1000")
    record, run_dir = train_run(*args)
    files = sorted(p.name for p in (run_dir / "checkpoints").glob("epoch=*.ckpt"))
    assert files == ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "epoch=1-step=30.ckpt"]
    start = run_dir / "checkpoints" / "epoch=0-step=10.ckpt"
    again = tmp_path / "continued"
    resumed = run(cfg_factory(*args, f"ckpt_path='{start}'"), again)  # quoted: '=' in the name
    assert resumed["resumed"]["from_step"] == 10 and resumed["status"] == "completed"
    assert losses(again) == losses(run_dir)
    ours = torch.load(again / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    theirs = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_model_checkpoint_monitoring_val_loss_keeps_the_best_epoch(train_run):
    """ModelCheckpoint(monitor=val/loss, save_top_k=1) keeps the file of the epoch with the
    lowest val/loss in the run's own curve, and names it as best_model_path."""
    seen = {}

    class Best(L.Callback):
        def on_fit_end(self, trainer, pl_module):
            seen["best"] = trainer.checkpoint_callback.best_model_path

    _, run_dir = train_run("callbacks=[model_checkpoint]",
                           "callbacks.model_checkpoint.monitor=val/loss",
                           "callbacks.model_checkpoint.save_top_k=1", "optim.lr=0.3",
                           "trainer.max_epochs=4", "data.train_size=256", callbacks=[Best()])
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    val = frame[frame.name == "val/loss"].sort_values("step")
    best = val.loc[val.value.idxmin()]
    files = [p.name for p in (run_dir / "checkpoints").glob("epoch=*.ckpt")]
    assert files == [f"epoch={int(best.epoch)}-step={int(best.step)}.ckpt"], (files, val)
    assert seen["best"].endswith(files[0])
    assert val.value.nunique() == 4  # four different validations: the choice meant something


def _torch_onecycle(max_lr: float, total: int) -> list[float]:
    """The oracle: torch's OneCycleLR on its own optimizer, the rate each step uses."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total,
                                                pct_start=0.3)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_onecycle_with_lr_monitor_in_the_csv_logger_equals_torchs_schedule(train_run):
    """scheduler=onecycle over max_steps=40 (horizon: trainer.estimated_stepping_batches),
    LearningRateMonitor writing to the CSV logger: every step's rate equals torch's own
    OneCycleLR, rising then falling with the peak where torch puts it; the harness's own `lr`
    column agrees."""
    record, run_dir = train_run("scheduler=onecycle", "optim.lr=0.05", "logger=csv",
                                "callbacks=[lr_monitor]", "trainer.max_epochs=5",
                                "trainer.max_steps=40")
    assert record["final"]["steps"] == 40
    expected = _torch_onecycle(0.05, 40)
    peak = max(range(40), key=expected.__getitem__)
    assert 0 < peak < 39 and expected[0] < expected[peak] > expected[-1]
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-SGD")]
    monitor = {int(r["step"]): float(r["lr-SGD"]) for r in rows}
    assert sorted(monitor) == list(range(40))
    assert [monitor[k] for k in range(40)] == pytest.approx(expected, rel=1e-12, abs=0)
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    lr = frame[frame.name == "lr"].sort_values("step")
    assert lr.step.tolist() == list(range(40))
    assert lr.value.tolist() == pytest.approx(expected, rel=1e-12, abs=0)


def test_step_scheduler_steps_once_an_epoch(train_run):
    """scheduler=step: StepLR(step_size=1, gamma=0.5) halves the rate at each epoch's end."""
    _, run_dir = train_run("scheduler=step", "optim.lr=0.08", "trainer.max_epochs=3")
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    lr = frame[frame.name == "lr"].sort_values("step")
    by_epoch = lr.groupby("epoch").value.agg(["min", "max"])
    assert by_epoch["min"].tolist() == by_epoch["max"].tolist() == pytest.approx(
        [0.08, 0.04, 0.02])


def _event_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()


def test_logger_csv_alone_writes_every_step_and_no_event_files(train_run):
    record, run_dir = train_run("logger=csv")
    assert not list(run_dir.rglob("events.out.tfevents.*"))
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == list(range(record["final"]["steps"]))
    assert [float(r["train/loss"]) for r in rows] == pytest.approx(losses(run_dir), rel=1e-6)


def test_logger_tensorboard_and_csv_both_get_every_step(train_run):
    record, run_dir = train_run("logger=[tensorboard,csv]")
    n = record["final"]["steps"]
    acc = _event_tags(run_dir)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(n))
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == n
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(
        [float(r["train/loss"]) for r in rows], rel=1e-6)


def test_validation_metrics_reach_callback_metrics(train_run):
    """val/loss and val/acc are self.log()ged: callbacks (EarlyStopping, ModelCheckpoint's
    monitor) find them in trainer.callback_metrics, equal to what the run recorded."""
    seen = {}

    class Look(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            seen[trainer.global_step] = {k: float(v) for k, v in
                                         trainer.callback_metrics.items()}

    _, run_dir = train_run("trainer.max_epochs=2", callbacks=[Look()])
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    for name in ("val/loss", "val/acc"):
        rows = frame[frame.name == name]
        assert {s: seen[s][name] for s in rows.step} == pytest.approx(
            dict(zip(rows.step, rows.value, strict=True)), rel=1e-6)
