"""The trainer node is Lightning's Trainer made by Hydra's instantiate: every Trainer argument
can be set from the command line and reaches the Trainer, `trainer.precision` and
`trainer.val_check_interval` do what Lightning says, and the arguments that would break the
harness's contract are refused in one line before anything runs.

Oracles: Lightning's own Trainer signature; a plain PyTorch loop under torch.autocast written out
here; the steps a validation must land on, counted here."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, in_process, losses

from autograd_lab.config.schema import TRAINER_CONTRACT
from autograd_lab.config.targets import OWN_KEYS
from autograd_lab.data.loader import load_split_tensors
from autograd_lab.model.networks import SmallNet


def test_the_trainer_node_lists_every_trainer_argument_and_keeps_the_contract():
    import lightning as L

    node = yaml.safe_load((REPO / "conf" / "trainer" / "default.yaml").read_text())
    assert node["_target_"] == "lightning.pytorch.Trainer"
    params = inspect.signature(L.Trainer).parameters
    # every argument can be typed as trainer.NAME=VALUE (Hydra refuses keys a node lacks)
    assert set(node) == {*params, "_target_", *OWN_KEYS["trainer"]}
    for key, (ok, _why) in TRAINER_CONTRACT.items():
        assert key in params, key
        assert ok(node[key]), f"conf/trainer/default.yaml breaks its own contract: {key}"


def _steps(run_dir, name: str) -> list[int]:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    return sorted(frame[frame.name == name].step.tolist())


def _plain_loop(model, x, y, batch_size, autocast: bool):
    """The seed's step written out, under torch.autocast(bfloat16) when `autocast` (as
    Lightning's bf16-mixed wraps the whole manual-optimisation step), else in float32."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    history = []
    for i in range(0, len(x), batch_size):
        inputs = (x[i:i + batch_size].float() / 255 - 0.5) / 0.5
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(inputs), y[i:i + batch_size])
            loss.backward()
            optimizer.step()
        history.append(loss.item())
    return history


def test_bf16_mixed_runs_the_step_in_bf16_as_a_plain_autocast_loop(train_run, cfg_factory,
                                                                    tmp_path):
    torch.manual_seed(99)
    reference = SmallNet()
    weights = tmp_path / "init.pt"
    torch.save(reference.state_dict(), weights)
    args = ("data.shuffle=false", "data.train_size=128", f"model.weights_path={weights}")
    record, run_dir = train_run(*args, "trainer.precision=bf16-mixed")
    assert record["status"] == "completed"
    harness = losses(run_dir)

    data = load_split_tensors(cfg_factory("data.train_size=128").data)
    expected = {}
    for autocast in (True, False):
        reference.load_state_dict(torch.load(weights, weights_only=True))
        expected[autocast] = _plain_loop(reference.train(), data["train_x"], data["train_y"], 32,
                                         autocast)
    assert len(harness) == len(expected[True]) == math.ceil(128 / 32)
    assert max(abs(a - b) for a, b in zip(harness, expected[True], strict=True)) < 1e-6
    # and the forward really ran in bf16: float32 gives other losses (bf16 keeps 8 bits)
    assert max(abs(a - b) for a, b in zip(harness, expected[False], strict=True)) > 1e-4


def test_val_check_interval_validates_every_n_steps(train_run):
    # 256 examples at batch 32: 8 steps an epoch, 2 epochs
    two_epochs = ("data.train_size=256", "trainer.max_epochs=2")
    _, plain = train_run(*two_epochs)
    assert _steps(plain, "val/loss") == [8, 16]
    _, every4 = train_run(*two_epochs, "trainer.val_check_interval=4")
    assert _steps(every4, "val/loss") == [4, 8, 12, 16]
    assert _steps(every4, "train/loss") == list(range(16))
    # Lightning counts an int interval within each epoch ...
    _, every3 = train_run(*two_epochs, "trainer.val_check_interval=3")
    assert _steps(every3, "val/loss") == [3, 6, 11, 14]
    # ... or across epochs, with check_val_every_n_epoch=null
    _, across = train_run(*two_epochs, "trainer.val_check_interval=3",
                          "trainer.check_val_every_n_epoch=null")
    assert _steps(across, "val/loss") == [3, 6, 9, 12, 15]


def test_any_trainer_argument_from_the_command_line_reaches_the_trainer(tmp_path, data_root,
                                                                        monkeypatch, capsys):
    run_dir = tmp_path / "run"
    # Lightning's own warning names the value it got
    with pytest.warns(Warning, match=r"Trainer\(log_every_n_steps=5\)"):
        out = in_process(["train", "data=synthetic", "data.train_size=256", "data.test_size=32",
                          f"data.root={data_root}", "trainer.max_epochs=2",
                          "trainer.limit_train_batches=3", "trainer.log_every_n_steps=5",
                          "trainer.progress_bar=false", "probes=off", f"hydra.run.dir={run_dir}"],
                         tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    curve = frame[frame.name == "train/loss"].sort_values("step")
    assert curve.step.tolist() == list(range(6))  # 3 batches an epoch, not 8
    assert curve.epoch.tolist() == [0, 0, 0, 1, 1, 1]
    assert _steps(run_dir, "val/loss") == [3, 6]


@pytest.mark.parametrize("override, text", [
    ("trainer.accumulate_grad_batches=4", "manual optimisation, one optimizer step per batch"),
    ("trainer.enable_checkpointing=false", "checkpoints/last.ckpt is how a run resumes"),
    ("trainer.gradient_clip_val=1.0", "Lightning clips only under automatic optimisation"),
    ("trainer.inference_mode=true", "eval.grad_mode"),
    ("trainer.num_sanity_val_steps=2", "every validation is a point of the run's curves"),
    ("trainer.fast_dev_run=true", "use size=quick or trainer.max_steps=N"),
    ("trainer.logger=false", "the logger group makes the loggers"),
    ("trainer.callbacks=[]", "callbacks=[early_stopping"),
    ("trainer.default_root_dir=/tmp/x", "hydra.run.dir"),
    ("trainer.enable_progress_bar=true", "trainer.progress_bar=auto"),
    ("trainer.precision=64-true", "must be one of: 32-true, bf16-mixed, 16-mixed"),
    ("trainer.val_check_interval=0", "a number of training batches >= 1"),
    ("trainer.check_val_every_n_epoch=null", "needs trainer.val_check_interval=N"),
    ("trainer.val_check_interval=3", "an epoch has 2 training batches; give N <= 2"),
    ("trainer.precision=16-mixed train.zero_grad=false", "fp16's loss scaler divides the whole"),
    ("trainer.profiler=simple profiler=torch", "one profiler at a time"),
    ("trainer.precison=bf16-mixed", "did you mean precision?"),
    # torch-free checks pass; the Trainer's own signature refuses the type
    ("trainer.detect_anomaly=sometimes", "Trainer's detect_anomaly must be true or false"),
])
def test_an_argument_against_the_contract_is_one_line_and_no_run(override, text, tmp_path,
                                                                  monkeypatch, capsys):
    run_dir = tmp_path / "run"
    out = in_process(["train", "data=synthetic", "data.train_size=64", "data.test_size=32",
                      f"data.root={tmp_path / 'data'}", "trainer.max_steps=2",
                      *override.split(), f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch,
                     capsys)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"autograd-lab: error: {override.split('=')[0]}")
    assert text in lines[0], lines[0]
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, line", [
    # on a CPU Lightning would run bf16-mixed under the 16-mixed name (with a warning)
    (["trainer.accelerator=cpu", "trainer.precision=16-mixed"],
     "trainer.precision=16-mixed: fp16 mixed precision needs a CUDA GPU (on a CPU Lightning "
     "would run bf16-mixed under the 16-mixed name); choices here: 32-true, bf16-mixed"),
    (["trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches=2: refused: must "
     "be 1: the step is written out under manual optimisation, one optimizer step per batch "
     "(Lightning accumulates only under automatic optimisation); for a bigger batch set "
     "data.batch_size"),
])
def test_the_trainer_refusals_come_before_torch_is_imported(overrides, line, tmp_path):
    code = ("import sys\nfrom autograd_lab.cli import main\n"
            f"code = main(['train', 'data=synthetic', *{overrides!r}, 'hydra.run.dir=run'])\n"
            "print('torch' in sys.modules, code)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split() == ["False", "2"], out.stderr
    assert out.stderr.strip() == f"autograd-lab: error: {line}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, text", [
    (["trainer._target_=subprocess.Popen"], "trainer._target_=subprocess.Popen: not a Lightning "
                                            "Trainer"),
    (["model._target_=builtins.eval"], "model._target_=builtins.eval: refused: a function"),
    (["optim._target_=os.system"], "optim._target_=os.system: refused: a function, not a torch "
                                   "optimizer class"),
    (["probes=cheap", "probes._target_=builtins.exec"], "probes._target_=builtins.exec: refused"),
    (["profiler=torch", "profiler._target_=os.system"], "profiler._target_=os.system: refused"),
    # a class of its kind, but the node's arguments are not its own: its signature says so
    (["optim=sgd", "optim._target_=torch.optim.AdamW"], "optim.momentum: AdamW takes no "
                                                        "argument 'momentum'"),
])
def test_the_instantiated_nodes_make_only_a_class_of_their_kind(overrides, text, tmp_path,
                                                               monkeypatch, capsys):
    run_dir = tmp_path / "run"
    out = in_process(["train", "data=synthetic", "data.train_size=64", "data.test_size=32",
                      f"data.root={tmp_path / 'data'}", "trainer.max_steps=2", *overrides,
                      f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], out.stderr
    assert not run_dir.exists()
