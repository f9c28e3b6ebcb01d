"""trainer.cuda_graph=true: the step captured as a CUDA graph (model/graphed.py), on a CPU.

Capture itself needs CUDA, so these tests run the graphed step with `GraphedStep.capture =
False`: the captured body runs eagerly exactly where a replay would (static input buffers the
batch is copied into, .grad zeroed in place, the torch optimizer's own step, Lightning's step
counting around it, eager steps for warm-up, partial batches and a changed learning rate). The
oracle is the harness's ordinary eager run of the same config: every train/loss, validation and
probe row, the final weights and the checkpoint's .grad must be identical, not close. The GPU
check (scripts/gpu_check.py, "graph exactness") compares real replays with the eager curve on
a GPU; the one test here that captures is skipped without CUDA. Refusals: one line, exit 2,
nothing created, before anything runs.
"""

from __future__ import annotations

import inspect
import os
import signal

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import in_process, losses, make_cfg
from lightning.pytorch.core.optimizer import LightningOptimizer

from autograd_lab.errors import UserError
from autograd_lab.model.graphed import FIRST_STEP_ONLY, MID_STEP_HOOKS, WARMUP, GraphedStep
from autograd_lab.train import run

# 176 examples in batches of 32: 5 full batches and one of 16 an epoch (its step runs eagerly)
BASE = ("data.train_size=176", "data.test_size=32", "trainer.max_epochs=2",
        "log.flush_every_s=1000", "probes.every_n_steps=2")
STEPS, PER_EPOCH = 12, 6


@pytest.fixture
def no_capture(monkeypatch):
    monkeypatch.setattr(GraphedStep, "capture", False)


class Seen(L.Callback):
    """What the graphed step did, and Lightning's step count, at the end of training."""

    def on_train_end(self, trainer, pl_module):
        g = pl_module.graphed
        self.steps = trainer.global_step
        self.counts = None if g is None else (g.replays, g.captures, g.eager_steps)


def _rows(run_dir) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    frame = frame[~frame.name.str.startswith("time/")]  # wall-clock timings differ by nature
    return frame.sort_values(["step", "name"]).reset_index(drop=True)


def _checkpoint(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)


def _assert_same_run(graphed, eager) -> None:
    assert losses(graphed) == losses(eager)  # exact equality, not allclose
    pd.testing.assert_frame_equal(_rows(graphed), _rows(eager), check_exact=True)
    ours, theirs = _checkpoint(graphed), _checkpoint(eager)
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    assert all(torch.equal(ours["state_dict"][k], theirs["state_dict"][k])
               for k in ours["state_dict"])
    for g, h in zip(ours["autograd_lab"]["grads"], theirs["autograd_lab"]["grads"], strict=True):
        assert (g is None) == (h is None) and (g is None or torch.equal(g, h))
    (ours,), (theirs,) = ours["optimizer_states"], theirs["optimizer_states"]
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for k, state in ours["state"].items():  # momentum buffers, Adam's moments and step
        assert state.keys() == theirs["state"][k].keys()
        assert all(torch.equal(v, theirs["state"][k][name]) for name, v in state.items())


CASES = {
    "default": (),
    "zero_grad=false": ("train.zero_grad=false",),
    "frozen_early": ("variant=frozen_early",),
    "detach_shallow": ("variant=detach_shallow",),
    "adam": ("optim=adam",),
    "bf16-mixed": ("trainer.precision=bf16-mixed",),
    # second-order probes run between steps on the tensors the graph writes
    "zero_grad=false probes=full": (
        "train.zero_grad=false", "probes=full", "probes.every_n_steps=2",
        "probes.sharpness_every_n_steps=5", "probes.sharpness_examples=32",
        "probes.sharpness_iters=2", "probes.gns_every_n_steps=5", "probes.gns_batch_size=32",
        "probes.histogram_every_n_steps=5", "probes.spectrum_every_n_steps=0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_graphed_step_gives_the_eager_curve_bit_for_bit(case, no_capture, tmp_path,
                                                             data_root):
    over = (*BASE, *CASES[case])
    eager_seen, graph_seen = Seen(), Seen()
    run(make_cfg(*over, data_root=data_root), tmp_path / "eager", callbacks=[eager_seen])
    record = run(make_cfg(*over, "trainer.cuda_graph=true", data_root=data_root),
                 tmp_path / "graph", callbacks=[graph_seen])
    assert record["status"] == "completed" and record["numerics"]["cuda_graph"] is True
    # the replay path ran: after WARMUP eager steps, every full batch; the partial ones eager
    replays = STEPS - WARMUP - 2
    assert graph_seen.counts == (replays, 1, STEPS - replays)
    assert eager_seen.counts is None and graph_seen.steps == eager_seen.steps == STEPS
    _assert_same_run(tmp_path / "graph", tmp_path / "eager")


def test_an_epoch_schedule_is_captured_again_when_the_rate_changes(no_capture, tmp_path,
                                                                   data_root):
    """scheduler=step halves the rate at each epoch's end: the graph captured with the old
    rate is dropped, WARMUP eager steps run at the new one, and a new graph is captured."""
    over = (*BASE, "scheduler=step", "optim.lr=0.05")
    seen = Seen()
    run(make_cfg(*over, data_root=data_root), tmp_path / "eager")
    run(make_cfg(*over, "trainer.cuda_graph=true", data_root=data_root), tmp_path / "graph",
        callbacks=[seen])
    assert seen.counts == (2 * (PER_EPOCH - WARMUP - 1), 2, 2 * (WARMUP + 1))
    lr = _rows(tmp_path / "graph").query("name == 'lr'").value.tolist()
    assert lr == [0.05] * PER_EPOCH + [0.025] * PER_EPOCH  # the rate the steps used
    _assert_same_run(tmp_path / "graph", tmp_path / "eager")


class Signal(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_killed_graphed_run_resumes_to_the_eager_curve(no_capture, tmp_path, data_root):
    """SIGTERM after a replayed step (the graph captured at step 3), then the same call: the
    checkpoint restores into the tensors the next capture binds, and the curve, the probe rows
    and the final weights equal an uninterrupted eager run's."""
    over = (*BASE, "trainer.max_epochs=3", "train.zero_grad=false")
    run(make_cfg(*over, data_root=data_root), tmp_path / "eager")
    graph = make_cfg(*over, "trainer.cuda_graph=true", data_root=data_root)
    seen = Seen()
    with pytest.raises(SystemExit) as stop:
        run(graph, tmp_path / "graph", callbacks=[Signal(WARMUP + 2)])
    assert stop.value.code == 128 + signal.SIGTERM
    resumed = run(graph, tmp_path / "graph", callbacks=[seen])
    assert resumed["status"] == "completed" and resumed["resumed"]["from_step"] == WARMUP + 2
    assert seen.counts[0] > 0  # the resumed part replayed too
    _assert_same_run(tmp_path / "graph", tmp_path / "eager")


def test_lightning_counts_steps_where_the_replay_counts():
    """A replay counts its optimizer step through LightningOptimizer's `_on_before_step` and
    `_on_after_step` (private: Lightning's manual loop sets them and LightningOptimizer.step
    calls them around the update). If Lightning renames them or counts elsewhere, this fails
    (the curve tests check global_step == the number of batches as well)."""
    opt = LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert callable(opt._on_before_step) and callable(opt._on_after_step)
    source = inspect.getsource(LightningOptimizer.step)
    assert "self._on_before_step()" in source and "self._on_after_step()" in source
    from lightning.pytorch.loops.optimization.manual import _ManualOptimization

    manual = inspect.getsource(_ManualOptimization)
    assert "lightning_optimizer._on_before_step = self._on_before_step" in manual
    assert "self.optim_step_progress.increment_completed()" in manual


class AfterBackward(L.Callback):
    def on_after_backward(self, trainer, pl_module):
        pass


def test_a_callback_with_a_hook_inside_the_step_is_refused(no_capture, tmp_path, data_root):
    with pytest.raises(UserError, match="callback AfterBackward: its on_after_backward runs "
                                        "inside the training step"):
        run(make_cfg(*BASE, "trainer.cuda_graph=true", data_root=data_root), tmp_path / "r",
            callbacks=[AfterBackward()])
    # the harness's own callback that defines one acts in the first step only (always eager)
    from autograd_lab.observe.graph_view import TensorBoardGraph

    assert FIRST_STEP_ONLY == ("TensorBoardGraph",)
    assert [h for h in MID_STEP_HOOKS if getattr(TensorBoardGraph, h)
            is not getattr(L.Callback, h)] == ["on_before_backward"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA check passes on a GPU machine")
def test_capture_on_a_cpu_run_is_one_line(tmp_path, data_root):
    """`python -m autograd_lab.train` and train.run skip the CLI's device check: the step
    itself says it in one line at fit start."""
    with pytest.raises(UserError, match=r"^trainer.cuda_graph=true: CUDA graphs need a CUDA "
                                        r"GPU \(this run is on cpu\)"):
        run(make_cfg(*BASE, "trainer.cuda_graph=true", data_root=data_root), tmp_path / "r")


REFUSED = [  # (overrides, what the one line names)
    (["trainer.accelerator=cpu"], "with trainer.accelerator=cpu: a CUDA graph replays"),
    (["trainer=ddp"], "with trainer=ddp: DDP all-reduces"),
    (["trainer.devices=2"], "with trainer.devices=2: DDP"),
    (["trainer.precision=16-mixed"], "with trainer.precision=16-mixed: fp16's GradScaler"),
    (["trainer.detect_anomaly=true"], "with trainer.detect_anomaly=true: anomaly mode"),
    (["model.compile=true"], "with model.compile=true: pick one"),
    (["profiler=torch"], "with profiler=torch: a replayed step"),
    (["scheduler=onecycle"], "with scheduler=onecycle: its learning rate changes every step"),
    (["scheduler=cosine"], "with scheduler=cosine: its learning rate changes every step"),
    # the more specific line first on any machine: before the CUDA check
    (["trainer.accelerator=mps", "scheduler=cosine"], "with trainer.accelerator=mps"),
]


def _refused(args, tmp_path, monkeypatch, capsys) -> str:
    out = in_process(["train", "data=synthetic", f"data.root={tmp_path / 'data'}", *args],
                     tmp_path, monkeypatch, capsys)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("autograd-lab: error: "), out.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be created"
    return lines[0]


@pytest.mark.parametrize(("args", "text"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_what_a_captured_step_cannot_hold_is_refused_in_one_line(args, text, tmp_path,
                                                                 monkeypatch, capsys):
    line = _refused(["trainer.cuda_graph=true", *args], tmp_path, monkeypatch, capsys)
    assert f"error: trainer.cuda_graph=true {text}" in line, line
    assert line.endswith("or trainer.cuda_graph=false"), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_the_key_is_refused_after_the_specific_checks(tmp_path, monkeypatch,
                                                                   capsys):
    line = _refused(["trainer.cuda_graph=true"], tmp_path, monkeypatch, capsys)
    assert line == ("autograd-lab: error: trainer.cuda_graph=true: CUDA graphs need a CUDA GPU "
                    "(torch.cuda.is_available() is False here); use trainer.cuda_graph=false")
    # what the graph can hold passes the torch-free checks and meets the CUDA line too
    line = _refused(["trainer.cuda_graph=true", "scheduler=step", "probes=full",
                     "trainer.precision=bf16-mixed", "train.zero_grad=false"],
                    tmp_path, monkeypatch, capsys)
    assert "CUDA graphs need a CUDA GPU" in line
    # an accelerator named by hand that is not here: that line, as without the key
    line = _refused(["trainer.cuda_graph=true", "trainer.accelerator=gpu"], tmp_path,
                    monkeypatch, capsys)
    assert "trainer.accelerator=gpu: no CUDA GPU on this machine" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs CUDA")
def test_replays_on_a_gpu_give_the_eager_curve_bit_for_bit(tmp_path, data_root):
    """The real thing (scripts/gpu_check.py's "graph exactness" does more): deterministic
    kernels, captured and replayed, against the eager run."""
    over = (*BASE, "trainer.deterministic=true")
    seen = Seen()
    run(make_cfg(*over, data_root=data_root), tmp_path / "eager")
    run(make_cfg(*over, "trainer.cuda_graph=true", data_root=data_root), tmp_path / "graph",
        callbacks=[seen])
    assert seen.counts[0] == STEPS - WARMUP - 2
    assert losses(tmp_path / "graph") == losses(tmp_path / "eager")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_capturable_adam_without_cuda_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """optim.capturable=true (the eager twin of a graphed Adam) where there is no CUDA: torch
    would assert inside the first step; the harness says it in one line before anything."""
    line = _refused(["optim=adam", "optim.capturable=true"], tmp_path, monkeypatch, capsys)
    assert line == ("autograd-lab: error: optim.capturable=true: Adam's capturable step needs "
                    "its tensors on a CUDA GPU (there is none, or trainer.accelerator=cpu); use "
                    "optim.capturable=false")
