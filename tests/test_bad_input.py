"""The bad-input matrix: every user mistake given to the `autograd-lab` command gives one line
naming the bad value and what is valid, a non-zero exit, no traceback, and loses nothing that was
already on disk.

The cases call the command's entry point (`autograd_lab.cli:main`, what the console script runs)
in this process: the same code path, Hydra app included, without paying torch's import 38 times.
The last test, and test_cli.py, run the installed script in a fresh process."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import cli, in_process, make_cfg

SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=128", "trainer.max_epochs=1",
         "probes=off"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root) -> Path:
    """A real SmallNet checkpoint, written by an interrupted-free short run."""
    from autograd_lab.train import run

    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    run(make_cfg(*SMALL, "trainer.max_steps=3", data_root=data_root), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def _interrupted_run(tmp: Path, ckpt_bytes: bytes) -> None:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(ckpt_bytes)
    (run / "run.json").write_text(json.dumps({"format_version": 1, "status": "interrupted"}))


def _setup_corrupted(tmp, ckpt):
    _interrupted_run(tmp, b"\x80\x02not a checkpoint at all")


def _setup_truncated(tmp, ckpt):
    blob = ckpt.read_bytes()
    _interrupted_run(tmp, blob[: len(blob) // 2])


def _setup_valid(tmp, ckpt):
    _interrupted_run(tmp, ckpt.read_bytes())


def _setup_completed(tmp, ckpt):
    _interrupted_run(tmp, ckpt.read_bytes())
    (tmp / "run" / "run.json").write_text(json.dumps({"format_version": 1,
                                                      "status": "completed"}))


def _setup_chunked(tmp, ckpt):
    """A checkpoint as the chunked harness (format 1) wrote it: its own state in the
    Checkpointer callback's dict, none at the top level."""
    old = torch.load(ckpt, weights_only=True)
    mine = old.pop("autograd_lab")
    old["callbacks"]["Checkpointer"] = {"autograd_lab": {
        "format_version": 1, "config": mine["config"], "rng": mine["rng"],
        "grads": mine["grads"], "data": {"epoch": 0, "next_batch": 3}}}
    import io

    buf = io.BytesIO()
    torch.save(old, buf)
    _interrupted_run(tmp, buf.getvalue())


def _setup_newer(tmp, ckpt):
    (tmp / "run").mkdir()
    (tmp / "run" / "run.json").write_text(json.dumps({"format_version": 99, "status": "x"}))


def _setup_file(tmp, ckpt):
    (tmp / "afile").write_text("a file, not a folder")


def _setup_unrelated(tmp, ckpt):
    (tmp / "other").mkdir()
    (tmp / "other" / "notes.txt").write_text("hello")
    (tmp / "other" / "data.json").write_text("{}")


def _setup_weights(tmp, ckpt):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp / "wrong.pt")


class _RunsCode:
    """What a planted file would hold: a pickle that runs a command when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _setup_code_weights(tmp, ckpt):
    torch.save({"fc.weight": _RunsCode(tmp / "ran")}, tmp / "evil.pt")


def _setup_code_checkpoint(tmp, ckpt):
    import io

    buf = io.BytesIO()
    torch.save({"autograd_lab": _RunsCode(tmp / "ran"), "state_dict": {}}, buf)
    _interrupted_run(tmp, buf.getvalue())


def _setup_loops(tmp, ckpt):
    (tmp / "loop").symlink_to(tmp / "loop")


def _setup_bad_cifar(tmp, ckpt):
    base = tmp / "bad" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (base / name).write_bytes(pickle.dumps({"x": 1})[:5])


@dataclass
class Case:
    id: str
    args: list[str]  # after `autograd-lab`; {tmp} and {data} are filled in
    needles: list[str]
    setup: object = None
    keep: list[str] = field(default_factory=list)  # files (under tmp) that must not change
    creates_nothing: bool = False  # rejected before any run directory exists
    absent: list[str] = field(default_factory=list)  # files (under tmp) that must not appear
    absent_text: list[str] = field(default_factory=list)  # advice the line must not give


def train(*args: str) -> list[str]:
    return ["train", *SMALL, "data.root={data}", *args]


CASES = [
    # misspelled keys and group names, wrong types, out-of-range values (before any run dir)
    Case("group", train("model=vgg"), ["model=vgg", "resnet18, smallnet"], creates_nothing=True),
    Case("data group", train("data=imagenet"), ["data=imagenet", "cifar10, synthetic"],
         creates_nothing=True),
    Case("optim group", train("optim=rmsprop"), ["optim=rmsprop", "adam, sgd"],
         creates_nothing=True),
    Case("misspelled key", train("train.zero_gradd=false"), ["train.zero_gradd", "zero_grad"],
         creates_nothing=True),
    Case("misspelled group", train("modle=smallnet"), ["modle", "model"],
         creates_nothing=True),
    Case("zero batch", train("data.batch_size=0"), ["data.batch_size=0", ">= 1"],
         creates_nothing=True),
    Case("negative batch", train("data.batch_size=-4"), ["data.batch_size=-4", ">= 1"],
         creates_nothing=True),
    Case("negative lr", train("optim.lr=-0.1"), ["optim.lr=-0.1", "> 0"], creates_nothing=True),
    Case("lr type", train("optim.lr=abc"), ["optim.lr='abc'", "number"], creates_nothing=True),
    Case("grad mode", train("eval.grad_mode=fast"), ["fast", "inference, no_grad, enabled"],
         creates_nothing=True),
    Case("list without -m", train("seed=1,2"), ["seed", "-m"], creates_nothing=True),
    Case("devices", train("trainer.devices=2"), ["trainer.devices=2", "trainer=ddp"],
         creates_nothing=True),
    Case("val fraction", train("trainer.limit_val_batches=1.5"), ["1.5", "[0, 1]"],
         creates_nothing=True),
    Case("nesterov", train("optim.momentum=0", "optim.nesterov=true"),
         ["optim.nesterov=true", "momentum"], creates_nothing=True),
    Case("strategy", train("trainer.strategy=fsdp"), ["trainer.strategy='fsdp'", "auto or ddp"],
         creates_nothing=True),
    Case("checkpoint interval", train("checkpoint.every_n_steps=-1"),
         ["checkpoint.every_n_steps=-1", ">= 0"], creates_nothing=True),
    Case("epochs", train("trainer.max_epochs=0"), ["trainer.max_epochs=0", ">= 1"],
         creates_nothing=True),
    Case("bad sweep value", ["train", "-m", *SMALL, "optim.lr=0.1,abc"], ["optim.lr='abc'"],
         creates_nothing=True),
    Case("unknown command", ["trian"], ["trian", "train"], creates_nothing=True),
    # variants that leave nothing to train
    Case("freeze everything", train("train.freeze=[*]", "hydra.run.dir={tmp}/run"),
         ["train.freeze", "nothing left to train"]),
    Case("detach below frozen", train("train.freeze=[conv.*]", "train.detach_at=pool",
                                      "hydra.run.dir={tmp}/run"),
         ["train.detach_at='pool'", "already frozen"]),
    Case("detach unknown module", train("train.detach_at=layer9", "hydra.run.dir={tmp}/run"),
         ["layer9", "conv"]),
    # folders that cannot be written
    Case("unwritable output", train("hydra.run.dir={tmp}/afile/run"),
         ["hydra.run.dir=", "is a file"], setup=_setup_file, keep=["afile"]),
    Case("unwritable sweep", ["train", "-m", *SMALL, "data.root={data}", "seed=0,1",
                              "hydra.sweep.dir={tmp}/afile/sweep"],
         ["hydra.sweep.dir=", "is a file"], setup=_setup_file, keep=["afile"]),
    Case("unwritable data", ["train", *SMALL, "data.root={tmp}/afile/data",
                             "hydra.run.dir={tmp}/run"],
         ["data.root=", "cannot write"], setup=_setup_file, keep=["afile"]),
    # data and weights files
    Case("missing weights", train("model.weights_path={tmp}/nope.pt", "hydra.run.dir={tmp}/run"),
         ["nope.pt", "no such file"]),
    Case("wrong weights", train("model.weights_path={tmp}/wrong.pt", "hydra.run.dir={tmp}/run"),
         ["wrong.pt", "does not fit"], setup=_setup_weights, keep=["wrong.pt"]),
    Case("weights that run code", train("model.weights_path={tmp}/evil.pt",
                                        "hydra.run.dir={tmp}/run"),
         ["evil.pt", "not a plain tensor file", "posix.system", "nothing in it was run"],
         setup=_setup_code_weights, keep=["evil.pt"], absent=["ran"]),
    Case("checkpoint that runs code", train("hydra.run.dir={tmp}/run"),
         ["last.ckpt", "not a plain tensor file", "nothing in it was run", "resume=false"],
         setup=_setup_code_checkpoint, keep=["run/checkpoints/last.ckpt", "run/run.json"],
         absent=["ran"]),
    Case("no cifar", ["train", "data=cifar10", "data.root={tmp}/empty", "hydra.run.dir={tmp}/run"],
         ["cifar-10-python.tar.gz", "data=synthetic"]),
    Case("corrupted cifar", ["train", "data=cifar10", "data.root={tmp}/bad",
                             "hydra.run.dir={tmp}/run"], ["corrupted"], setup=_setup_bad_cifar),
    # values that pass a type check but not the libraries
    Case("negative seed", train("seed=-1"), ["seed=-1", "[0, 2**32)"], creates_nothing=True),
    Case("huge seed", train("seed=1099511627776"), ["seed=1099511627776", "[0, 2**32)"],
         creates_nothing=True),
    Case("infinite lr", train("optim.lr=inf"), ["optim.lr=inf", "finite"],
         creates_nothing=True),
    Case("nan momentum", train("optim.momentum=nan"), ["optim.momentum=nan", "finite"],
         creates_nothing=True),
    Case("never ends", train("trainer.max_epochs=-1"), ["trainer.max_epochs=-1", "never ends"],
         creates_nothing=True),
    Case("absent gpu", train("trainer.accelerator=gpu"),
         ["trainer.accelerator=gpu", "no CUDA GPU", "auto, cpu"], creates_nothing=True),
    Case("too many devices", train("trainer=ddp", "trainer.devices=512"),
         ["trainer.devices=512", "this machine has"], creates_nothing=True),
    Case("fewer classes than labels", train("model=resnet18", "model.num_classes=5"),
         ["model.num_classes=5", ">= 10"], creates_nothing=True),
    Case("tiny data set", train("data.train_size=3"), ["data.train_size=3", "[5,"],
         creates_nothing=True),
    Case("data root loops", ["train", *SMALL, "data.root={tmp}/loop"],
         ["data.root=", "cannot be resolved"], setup=_setup_loops, creates_nothing=True),
    Case("data root is a file", ["train", *SMALL, "data.root={tmp}/afile"],
         ["data.root=", "is a file"], setup=_setup_file, creates_nothing=True),
    Case("ckpt_path is a folder", train("ckpt_path={tmp}"), ["ckpt_path=", "is a folder"],
         creates_nothing=True),
    Case("run dir loops", train("hydra.run.dir={tmp}/loop/run"),
         ["hydra.run.dir=", "loop"], setup=_setup_loops, creates_nothing=True),
    Case("weights path is a folder", train("model.weights_path={tmp}"),
         ["model.weights_path=", "is a folder"], creates_nothing=True),
    Case("zero validation batch", train("data.val_batch_size=0"),
         ["data.val_batch_size=0", ">= 1"], creates_nothing=True),
    Case("validation fraction", train("trainer.limit_val_batches=2.5"),
         ["trainer.limit_val_batches=2.5", "fraction"], creates_nothing=True),
    Case("flush interval", train("log.flush_every_s=0"), ["log.flush_every_s=0", "> 0"],
         creates_nothing=True),
    Case("probe interval", train("probes=cheap", "probes.every_n_steps=0"),
         ["probes.every_n_steps=0", ">= 1"], creates_nothing=True),
    Case("one beta", train("optim=adam", "optim.betas=[0.9]"), ["optim.betas", "two numbers"],
         creates_nothing=True),
    Case("augmentation", train("data.augment=rotate"), ["data.augment='rotate'", "flip_crop"],
         creates_nothing=True),
    Case("grad mode", train("eval.grad_mode=train"), ["eval.grad_mode='train'", "no_grad"],
         creates_nothing=True),
    Case("activation", train("model.activation=gelu"), ["model.activation='gelu'",
                                                        "custom_relu"], creates_nothing=True),
    # checkpoints on resume
    Case("corrupted checkpoint", train("hydra.run.dir={tmp}/run"),
         ["last.ckpt", "truncated or corrupted", "resume=false"], setup=_setup_corrupted,
         keep=["run/checkpoints/last.ckpt", "run/run.json"]),
    Case("truncated checkpoint", train("hydra.run.dir={tmp}/run"),
         ["last.ckpt", "truncated or corrupted", "resume=false"], setup=_setup_truncated,
         keep=["run/checkpoints/last.ckpt", "run/run.json"]),
    Case("checkpoint of another model", train("model=resnet18", "hydra.run.dir={tmp}/run"),
         ["last.ckpt", "another model", "model.name='smallnet'", "'resnet18'"],
         setup=_setup_valid, keep=["run/checkpoints/last.ckpt", "run/run.json"]),
    Case("checkpoint of another config", train("optim.lr=0.5", "hydra.run.dir={tmp}/run"),
         ["last.ckpt", "optim.lr=0.001", "0.5", "resume=false"], setup=_setup_valid,
         keep=["run/checkpoints/last.ckpt", "run/run.json"]),
    Case("completed run of another config", train("optim.lr=0.5", "hydra.run.dir={tmp}/run"),
         ["last.ckpt", "completed run", "another run directory"], setup=_setup_completed,
         keep=["run/checkpoints/last.ckpt", "run/run.json"], absent_text=["resume=false"]),
    Case("chunked-format checkpoint", train("hydra.run.dir={tmp}/run"),
         ["last.ckpt", "older autograd-lab format", "resume=false"], setup=_setup_chunked,
         keep=["run/checkpoints/last.ckpt", "run/run.json"]),
    Case("missing ckpt_path", train("ckpt_path={tmp}/nope.ckpt", "hydra.run.dir={tmp}/run"),
         ["ckpt_path=", "nope.ckpt", "no such file"]),
    # Lightning parts from the config: schedulers, loggers, callbacks
    Case("scheduler group", train("scheduler=nosuch"),
         ["scheduler=nosuch", "cosine, none, onecycle, step"], creates_nothing=True),
    Case("logger group", train("logger=nosuch"), ["logger=nosuch", "csv, tensorboard"],
         creates_nothing=True),
    Case("callback that does not import",
         train("+callbacks.x._target_=lightning.pytorch.callbacks.NoSuchCallback"),
         ["callbacks.x._target_=lightning.pytorch.callbacks.NoSuchCallback",
          "cannot be imported"], creates_nothing=True),
    Case("callback that is not a callback", train("+callbacks.x._target_=torch.nn.Linear"),
         ["callbacks.x._target_=torch.nn.Linear", "not a Lightning Callback"],
         creates_nothing=True),
    Case("logger that is not a logger",
         train("+logger.x._target_=lightning.pytorch.callbacks.EarlyStopping"),
         ["logger.x._target_=lightning.pytorch.callbacks.EarlyStopping",
          "not a Lightning Logger"], creates_nothing=True),
    Case("callback without a target", train("+callbacks.x.monitor=val/loss"),
         ["callbacks.x", "needs a _target_"], creates_nothing=True),
    Case("monitor of no metric", train("callbacks=[early_stopping]",
                                       "callbacks.early_stopping.monitor=val/nosuch"),
         ["callbacks.early_stopping.monitor='val/nosuch'", "val/loss, val/acc"],
         creates_nothing=True),
    Case("newer run dir", train("hydra.run.dir={tmp}/run"), ["format_version=99", "newer"],
         setup=_setup_newer, keep=["run/run.json"]),
    # tensorboard
    Case("tensorboard no folder", ["tensorboard", "{tmp}/nope"], ["nope", "no such folder"],
         creates_nothing=True),
    Case("tensorboard no runs here", ["tensorboard"], ["no runs here", "runs/"],
         creates_nothing=True),
    # summarize
    Case("summarize empty", ["summarize", "{tmp}/empty"], ["no such folder"]),
    Case("summarize unrelated", ["summarize", "{tmp}/other"], ["no runs found"],
         setup=_setup_unrelated, keep=["other/notes.txt"]),
    Case("summarize newer", ["summarize", "{tmp}"], ["newer autograd-lab", "format 99"],
         setup=_setup_newer, keep=["run/run.json"]),
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case, tmp_path, data_root, request,
                                                 monkeypatch, capsys):
    ckpt = request.getfixturevalue("checkpoint") if case.setup in (
        _setup_truncated, _setup_valid, _setup_chunked, _setup_completed) else None
    if case.setup:
        case.setup(tmp_path, ckpt)
    before = {k: _digest(tmp_path / k) for k in case.keep}
    listing = sorted(p.name for p in tmp_path.iterdir())
    args = [a.replace("{tmp}", str(tmp_path)).replace("{data}", str(data_root))
            for a in case.args]
    out = in_process(args, tmp_path, monkeypatch, capsys)

    assert out.returncode not in (0, None), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("autograd-lab: error:")]
    assert len(errors) == 1, out.stderr
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    for text in case.absent_text:
        assert text not in errors[0], errors[0]
    for key, digest in before.items():
        assert _digest(tmp_path / key) == digest, f"{key} changed"
    if case.creates_nothing:
        assert sorted(p.name for p in tmp_path.iterdir()) == listing
    for name in case.absent:  # e.g. the marker a code-running pickle would have made
        assert not (tmp_path / name).exists(), f"{name} exists"


def test_a_corrupted_cache_is_decoded_again_with_a_warning(tmp_path, monkeypatch, capsys):
    """Not an error: the cache is derived data, so the run rebuilds it and says so. (The first
    run, which only writes the cache, through the entry point in this process; the second in
    the installed script's own process, where the warning reaches stderr as a user sees it.)"""
    root = tmp_path / "data"
    args = [a.replace("{data}", str(root)) for a in train()]
    first = in_process([*args, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path, monkeypatch, capsys)
    assert first.returncode == 0, first.stderr
    cache = next(root.rglob("autograd_lab_uint8.pt"))
    cache.write_bytes(cache.read_bytes()[:100])
    out = cli(*args, f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    warning = [ln for ln in out.stderr.splitlines() if "unreadable cache" in ln]
    assert len(warning) == 1 and "decoding again" in warning[0]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["status"] == "completed"
