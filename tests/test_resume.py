"""Kill a run with a real signal, re-run it, and get the uninterrupted run's curve bit for bit.

The oracle is an uninterrupted run of the same config: every train/loss, val and probe row of the
resumed run's metrics.parquet, and its final weights, must be identical (not close).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import in_process, losses, make_cfg

from autograd_lab.train import run

OVERRIDES = ["data.train_size=320", "data.test_size=128", "data.batch_size=32",
             "trainer.max_epochs=3", "log.flush_every_s=1000"]  # 10 steps an epoch, 30 in all


class SendSignal(L.Callback):
    """Deliver a real signal to this process at a chosen step, in training or in validation."""

    def __init__(self, step: int, where: str, signum: int):
        self.step, self.where, self.signum = step, where, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.where == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if self.where == "validation" and trainer.global_step == self.step and batch_idx == 1:
            os.kill(os.getpid(), self.signum)


def _rows(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    frame = frame[~frame.name.str.startswith("time/")]  # wall-clock timings differ by nature
    return frame.sort_values(["step", "name"]).reset_index(drop=True)


def _final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


_REFERENCES: dict[tuple, Path] = {}


def _reference(overrides: tuple, data_root: Path, tmp_path_factory) -> Path:
    if overrides not in _REFERENCES:
        run_dir = tmp_path_factory.mktemp("reference") / "run"
        record = run(make_cfg(*overrides, data_root=data_root), run_dir)
        assert record["status"] == "completed"
        _REFERENCES[overrides] = run_dir
    return _REFERENCES[overrides]


CASES = [  # (variant overrides, step, where, signal)
    (["train.zero_grad=true"], 4, "train", signal.SIGTERM),               # mid first epoch
    (["train.zero_grad=false"], 15, "train", signal.SIGINT),              # mid second epoch
    (["train.zero_grad=false", "data.val_batch_size=32"], 10, "validation", signal.SIGINT),
    (["variant=frozen_early", "data.augment=flip_crop"], 20, "train", signal.SIGTERM),  # last
    (["variant=detach_shallow", "probes=full"], 12, "train", signal.SIGTERM),
    # with max_steps, from an epoch-end checkpoint (a signal in validation, or in an epoch's last
    # step): Lightning's own max_steps would restart its loops one epoch too far
    (["trainer.max_steps=1000", "data.val_batch_size=32"], 10, "validation", signal.SIGINT),
    (["trainer.max_steps=25"], 20, "train", signal.SIGTERM),
    (["trainer.max_steps=14"], 14, "train", signal.SIGTERM),  # at max_steps: validates, then saves
    # a per-step LR schedule: its state (and the lr column) continues exactly
    (["scheduler=onecycle", "optim.lr=0.05"], 15, "train", signal.SIGTERM),
    (["scheduler=step", "data.val_batch_size=32"], 10, "validation", signal.SIGTERM),
    (["model=resnet18", "data.train_size=96", "data.test_size=32", "train.zero_grad=false",
      "variant=frozen_early"], 4, "train", signal.SIGTERM),                # 3 steps an epoch
]


@pytest.mark.parametrize(("variant", "step", "where", "signum"), CASES,
                         ids=[f"{' '.join(c[0])}@{c[1]}:{c[2]}" for c in CASES])
def test_kill_and_resume_gives_the_same_curve_bit_for_bit(variant, step, where, signum, tmp_path,
                                                          data_root, tmp_path_factory):
    overrides = (*OVERRIDES, *variant)
    reference = _reference(overrides, data_root, tmp_path_factory)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        run(make_cfg(*overrides, data_root=data_root), run_dir,
            callbacks=[SendSignal(step, where, signum)])
    assert stop.value.code == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert f"at step {step}" in record["error"]
    assert len(losses(run_dir)) == step  # the curve up to the signal is on disk already

    resumed = run(make_cfg(*overrides, data_root=data_root), run_dir)  # the same command again
    assert resumed["status"] == "completed"
    assert resumed["resumed"]["from_step"] == step
    assert losses(run_dir) == losses(reference)  # exact equality, not allclose
    pd.testing.assert_frame_equal(_rows(run_dir), _rows(reference), check_exact=True)
    ours, theirs = _final_weights(run_dir), _final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_checkpoint_holds_the_accumulated_grad_and_rng(tmp_path, data_root):
    """What Lightning's own checkpoint leaves out is in ours: with zero_grad off, the
    accumulated .grad at the signal's step, the RNG state and the position in the epoch."""
    cfg = make_cfg(*OVERRIDES, "train.zero_grad=false", data_root=data_root)
    seen = {}

    class Grab(L.Callback):  # runs before the Checkpointer (which is always last)
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                seen["grads"] = [p.grad.clone() for p in pl_module.model.parameters()]
                seen["rng"] = torch.get_rng_state().clone()

    with pytest.raises(SystemExit):
        run(cfg, tmp_path / "run", callbacks=[Grab(), SendSignal(5, "train", signal.SIGTERM)])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    mine = ckpt["autograd_lab"]  # the module's on_save_checkpoint
    assert all(torch.equal(a, b) for a, b in zip(mine["grads"], seen["grads"], strict=True))
    assert all(g.abs().sum() > 0 for g in mine["grads"])
    assert torch.equal(mine["rng"]["torch"], seen["rng"])
    # the data position: the loader's own state_dict, saved by Lightning with the fit loop
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "position": 5}]
    assert ckpt["global_step"] == 5
    rows = ckpt["callbacks"]["RunRecorder"]
    loss = rows["names"].index("train/loss")
    steps = [s for s, c in zip(rows["step"].tolist(), rows["code"].tolist(), strict=True)
             if c == loss]
    assert steps == [0, 1, 2, 3, 4]  # the curve so far travels with it, flushed at the save


def _cli(*args, cwd):
    exe = Path(sys.executable).parent / "autograd-lab"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([str(exe), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


CLI_ARGS = ["train", "data=synthetic", "data.train_size=2048", "data.test_size=128",
            "trainer.max_epochs=3", "checkpoint.every_n_steps=20", "probes=off", "threads=1"]


@pytest.fixture(scope="module")
def _cli_reference_cache() -> dict:
    return {}


@pytest.fixture
def cli_reference(_cli_reference_cache, tmp_path_factory, data_root, monkeypatch,
                  capsys) -> Path:
    """The uninterrupted run of the same command, once a module, through the CLI's entry point
    in this process (the same config; no kill needs its own process here)."""
    if "ref" not in _cli_reference_cache:
        where = tmp_path_factory.mktemp("cli_reference")
        with monkeypatch.context() as m:
            reference = in_process([*CLI_ARGS, f"data.root={data_root}", "hydra.run.dir=ref"],
                                   where, m, capsys)
        assert reference.returncode == 0, reference.stderr
        _cli_reference_cache["ref"] = where / "ref"
    return _cli_reference_cache["ref"]


# SIGTERM from outside is covered by test_ddp.py (to rank 0 of two) and in-process above
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_the_same_command_continues_after_a_kill(signum, tmp_path, data_root, cli_reference,
                                                 monkeypatch, capsys):
    """Through the real CLI: a kill from outside mid-run, then the same command again (after
    SIGINT as a process, as the user runs it; after SIGKILL through the CLI's entry point in this
    process). SIGKILL leaves only the periodic checkpoint; SIGINT saves one at the current step.
    A third time, in-process, it is skipped."""
    args = [*CLI_ARGS, f"data.root={data_root}"]

    proc = _cli(*args, cwd=tmp_path)  # lands in runs/<overrides>, found again by the re-run
    ckpt = next((tmp_path / "runs").glob("*"), tmp_path / "none") / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
        ckpt = next((tmp_path / "runs").glob("*"), tmp_path / "none") / "checkpoints" / \
            "last.ckpt"
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signum)
    code = proc.wait(120)
    stderr = proc.stderr.read()
    run_dir = ckpt.parent.parent
    assert code == {signal.SIGKILL: -9, signal.SIGINT: 130}[signum], stderr
    where = f"runs/{run_dir.name}"
    assert stderr.splitlines()[0] == f"autograd-lab: {where}: starting"
    if signum != signal.SIGKILL:
        assert "Traceback" not in stderr
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "interrupted"
        assert "re-run the same command" in record["error"]
        # what the user sees: the step, that a checkpoint was saved, and how to continue
        steps = record["final"]["steps"]
        assert stderr.splitlines()[-1] == (
            f"autograd-lab: {where}: interrupted by SIGINT at step {steps}; a checkpoint was "
            f"saved: re-run the same command to continue")
        assert record["error"] in stderr.splitlines()[-1]

    if signum == signal.SIGINT:
        again = _cli(*args, cwd=tmp_path)
        assert again.wait(300) == 0, again.stderr.read()
        said = again.stderr.read().splitlines()
    else:
        again = in_process(args, tmp_path, monkeypatch, capsys)
        assert again.returncode == 0, again.stderr
        said = again.stderr.splitlines()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed"]["from_step"] > 0
    assert said[0] == (f"autograd-lab: {where}: resuming from step "
                       f"{record['resumed']['from_step']} (epoch {record['resumed']['epoch']}, "
                       f"{where}/checkpoints/last.ckpt)")
    final = record["final"]
    assert said[1].startswith(f"autograd-lab: {where}: completed, {final['steps']:,} steps in ")
    from autograd_lab.text import fmt_number

    assert said[2] == (f"  train loss {fmt_number(final['train_loss'])} (best "
                       f"{fmt_number(final['best_train_loss'])}), val loss "
                       f"{fmt_number(final['val_loss'])}, val acc {fmt_number(final['val_acc'])}")
    assert said[3].startswith("  tensorboard: ") and said[3].endswith(f"tensorboard {where}")
    assert len(said) == 4  # nothing else: no library chatter
    assert losses(run_dir) == losses(cli_reference)
    np.testing.assert_array_equal(_rows(run_dir).value, _rows(cli_reference).value)

    # TensorBoard shows one curve: the killed attempt's later events are purged on resume
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(len(losses(run_dir))))
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    for name in ("val/loss", "val/acc"):  # epoch points at the resumed step are there too
        rows = frame[frame.name == name].sort_values("step")
        events = acc.Scalars(name)
        assert [e.step for e in events] == rows.step.tolist(), name
        np.testing.assert_allclose([e.value for e in events], rows.value, rtol=1e-6)

    skipped = in_process(args, tmp_path, monkeypatch, capsys)  # a third time: nothing to do
    assert skipped.returncode == 0
    assert skipped.stderr.splitlines() == [
        f"autograd-lab: {where}: skipped, already completed with this config (resume=false runs "
        f"it again)"]



def test_starting_over_removes_only_this_harness_files(tmp_path, data_root):
    """resume=false (or no checkpoint) clears the old attempt's events, checkpoint and record,
    and nothing else that happens to live in those folders."""
    run_dir = tmp_path / "run"
    cfg = make_cfg(*OVERRIDES, "trainer.max_epochs=1", data_root=data_root)
    run(cfg, run_dir)
    old_events = sorted(run_dir.glob("events.*"))
    (run_dir / "checkpoints" / "mine.pt").write_text("a user's own file")
    (run_dir / "notes.txt").write_text("a user's own file")
    record = run(make_cfg(*OVERRIDES, "trainer.max_epochs=1", "resume=false",
                          data_root=data_root), run_dir)
    assert "resumed" not in record and record["status"] == "completed"
    assert (run_dir / "checkpoints" / "mine.pt").exists()
    assert (run_dir / "notes.txt").exists()
    assert old_events and not set(old_events) & set(run_dir.glob("events.*"))  # one curve


def test_a_resumed_attempts_event_file_sorts_after_the_file_it_continues(tmp_path):
    """TensorBoard reads a folder's event files in name order, and a name starts with the second
    its writer was made: an attempt resumed within the second of the one it continues (a notebook
    with torch loaded; the kill test above, in this process) must wait for the next second, or
    its steps hide the earlier attempt's (seen: TensorBoard's train/loss began at the resumed
    step)."""
    from autograd_lab.job.build import _after_earlier_event_files

    now = int(time.time())
    earlier = tmp_path / f"events.out.tfevents.{now:010d}.host.99999.0"
    earlier.write_bytes(b"")
    _after_earlier_event_files(tmp_path)
    mine = f"events.out.tfevents.{int(time.time()):010d}.host.1.0"
    assert sorted([mine, earlier.name])[-1] == mine
