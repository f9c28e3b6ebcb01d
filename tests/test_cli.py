"""The real `autograd-lab` command: Hydra behaviour, fast help, one-line errors for bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli

SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=128", "trainer.max_epochs=1"]


def test_help_and_cfg_job_do_not_import_torch(tmp_path):
    code = ("import sys; from autograd_lab.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'imported'; "
            "sys.exit(rc)")
    for args in (["train", "--help"], ["train", "--cfg", "job", "optim=adam"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             cwd=tmp_path, timeout=60)
        assert out.returncode == 0, out.stderr
    assert "model: resnet18, smallnet" in subprocess.run(
        [sys.executable, "-c", code, "train", "--help"], capture_output=True, text=True,
        cwd=tmp_path).stdout
    assert not (tmp_path / "runs").exists()


def test_cfg_job_shows_the_composed_config(tmp_path):
    out = cli("train", "--cfg", "job", "optim=adam", "optim.lr=0.01", cwd=tmp_path)
    assert out.returncode == 0
    assert "name: adam" in out.stdout and "lr: 0.01" in out.stdout


def test_python_dash_m_runs_the_same_app(tmp_path, data_root):
    out = subprocess.run([sys.executable, "-m", "autograd_lab.train", *SMALL,
                          f"data.root={data_root}", f"hydra.run.dir={tmp_path / 'r'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "completed"


def test_multirun_names_job_dirs_from_overrides_and_shows_a_progress_bar(tmp_path, data_root):
    out = cli("train", "-m", *SMALL, f"data.root={data_root}", "train.zero_grad=true,false",
              f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.progress_bar=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir()
                  if p.is_dir() and p.name != "summary")
    assert jobs == [f"data.test_size=128,data.train_size=256,data=synthetic,"
                    f"train.zero_grad={v},trainer.max_epochs=1" for v in ("False", "True")]
    assert "loss=" in out.stderr and "img_s=" in out.stderr and "epoch 0" in out.stderr


def _one_line_error(out, *needles):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("autograd-lab: error:")]
    assert len(errors) == 1, out.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize("args, needles", [
    (["model=vgg"], ["model=vgg", "resnet18, smallnet"]),
    (["data=imagenet"], ["data=imagenet", "cifar10, synthetic"]),
    (["optim=rmsprop"], ["optim=rmsprop", "adam, sgd"]),
    (["train.zero_gradd=false"], ["train.zero_gradd", "zero_grad"]),
    (["modle=smallnet"], ["modle", "model"]),
    (["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
    (["data.batch_size=-4"], ["data.batch_size=-4", ">= 1"]),
    (["optim.lr=-0.1"], ["optim.lr=-0.1", "> 0"]),
    (["optim.lr=abc"], ["optim.lr='abc'", "number"]),
    (["eval.grad_mode=fast"], ["fast", "inference, no_grad, enabled"]),
    (["seed=1,2"], ["seed", "-m"]),
    (["trainer.devices=2"], ["trainer.devices=2", "1"]),
    (["trainer.limit_val_batches=1.5"], ["1.5", "[0, 1]"]),
    (["optim.momentum=0", "optim.nesterov=true"], ["optim.nesterov=true", "momentum"]),
])
def test_bad_config_is_one_line_and_creates_nothing(args, needles, tmp_path):
    out = cli("train", *SMALL, *args, cwd=tmp_path)
    _one_line_error(out, *needles)
    assert list(tmp_path.iterdir()) == []  # no run directory, no data written


def test_unknown_command(tmp_path):
    _one_line_error(cli("trian", cwd=tmp_path), "trian", "train")


def test_bad_weights_and_data_files_are_one_line_and_leave_no_half_written_run(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    root = tmp_path / "data"
    cases = [
        ([f"model.weights_path={tmp_path / 'nope.pt'}"], ["nope.pt", "no such file"]),
        ([f"model.weights_path={tmp_path / 'wrong.pt'}"], ["wrong.pt", "does not fit"]),
        (["data=cifar10", f"data.root={root}"], ["cifar-10-python.tar.gz", "data=synthetic"]),
    ]
    # a corrupted CIFAR-10 batch file: real names, broken pickle (md5 check fails first)
    bad_root = tmp_path / "bad"
    (bad_root / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (bad_root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps({"x": 1})[:5])
    cases.append((["data=cifar10", f"data.root={bad_root}"], ["corrupted"]))
    for i, (args, needles) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        base = SMALL if not args[0].startswith("data=cifar10") else ["trainer.max_epochs=1"]
        out = cli("train", *base, f"data.root={tmp_path / 'syn'}", *args,
                  f"hydra.run.dir={run_dir}", cwd=tmp_path)
        _one_line_error(out, *needles)
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "failed" and needles[0] in record["error"]
        assert not (run_dir / "tb").exists() and not (run_dir / "metrics.parquet").exists()


def test_demo_runs_the_zero_grad_study_and_says_which_data(tmp_path):
    out = cli("demo", "data.train_size=256", "data.test_size=128", "trainer.max_epochs=1",
              f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "synthetic" in out.stdout
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/run.json")]
    assert sorted(r["config"]["train"]["zero_grad"] for r in records) == [False, True]
    assert all(r["status"] == "completed" and r["config"]["study"] == "zero_grad_study"
               for r in records)


@pytest.mark.parametrize("study, runs", [
    ("zero_grad_study", 2), ("freeze_study", 3), ("detach_study", 6), ("eval_modes", 6),
    ("custom_function_study", 4)])
def test_every_study_runs_offline_on_synthetic_data(study, runs, tmp_path, data_root):
    out = cli("train", "-m", f"experiment={study}", "data=synthetic", "size=quick",
              f"data.root={data_root}", "data.train_size=256", "data.test_size=128",
              "data.subset=64", "trainer.limit_val_batches=1", f"hydra.sweep.dir={tmp_path}",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*/run.json")]
    assert len(records) == runs
    assert all(r["status"] == "completed" and r["config"]["study"] == study for r in records)
    assert all(r["final"]["steps"] == 2 and r["final"]["val_loss"] is not None for r in records)
    if study == "freeze_study":
        trainable = sorted(r["params"]["trainable"] for r in records)
        assert trainable[0] == 512 * 10 + 10 and trainable[0] < trainable[1] < trainable[2]
    if study == "detach_study":
        cut = {(r["config"]["model"]["name"], r["config"]["train"]["detach_at"]):
               r.get("detach", {}).get("upstream_params", 0) for r in records}
        assert cut[("resnet18", "layer1")] < cut[("resnet18", "layer4")]
        assert cut[("smallnet", "conv")] == cut[("smallnet", "pool")] == 3 * 3 * 25 + 3


def test_tab_completion_goes_through_hydra(tmp_path):
    install = cli("-sc", "install=bash", cwd=tmp_path)
    assert install.returncode == 0
    assert install.stdout.rstrip().endswith("-F hydra_bash_completion autograd-lab")
    query = cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "autograd-lab train optim="})
    assert query.stdout.split() == ["optim=adam", "optim=sgd"]
    query = cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "autograd-lab train model="})
    assert query.stdout.split() == ["model=resnet18", "model=smallnet"]


def test_ctrl_c_records_interrupted_and_keeps_the_curve_so_far(tmp_path, data_root):
    import os
    import signal
    import time

    from conftest import losses

    exe = Path(sys.executable).parent / "autograd-lab"
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(
        [str(exe), "train", "data=synthetic", f"data.root={data_root}", "data.train_size=512",
         "data.test_size=128", "trainer.max_epochs=10000", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE,
        text=True)
    deadline = time.time() + 120
    while not list((run_dir / "tb").glob("events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # well into training
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    curve = losses(run_dir)  # contiguous from step 0
    assert len(curve) == record["final"]["steps"] > 16  # more than one epoch was kept
