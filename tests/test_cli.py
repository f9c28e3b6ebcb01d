"""The real `autograd-lab` command: Hydra behaviour, fast help, one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, in_process, make_cfg

SMALL = ["data=synthetic", "data.train_size=256", "data.test_size=128", "trainer.max_epochs=1"]


def test_help_and_cfg_job_do_not_import_torch(tmp_path):
    code = ("import sys; from autograd_lab.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'imported'; "
            "sys.exit(rc)")
    outs = {}
    for args in (["train", "--help"], ["train", "--cfg", "job", "optim=adam"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             cwd=tmp_path, timeout=60)
        assert out.returncode == 0, out.stderr
        outs[args[1]] = out
    assert "model: resnet18, smallnet" in outs["--help"].stdout
    assert not (tmp_path / "runs").exists()


def test_cfg_job_shows_the_composed_config(tmp_path):
    out = cli("train", "--cfg", "job", "optim=adam", "optim.lr=0.01", cwd=tmp_path)
    assert out.returncode == 0
    assert "name: adam" in out.stdout and "lr: 0.01" in out.stdout


def test_python_dash_m_runs_the_same_app(tmp_path, data_root):
    out = subprocess.run([sys.executable, "-m", "autograd_lab.train", *SMALL,
                          "trainer.max_steps=2", f"data.root={data_root}",
                          f"hydra.run.dir={tmp_path / 'r'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "completed"


def test_multirun_names_job_dirs_from_overrides_and_shows_a_progress_bar(tmp_path, data_root):
    out = cli("train", "-m", *SMALL, f"data.root={data_root}", "train.zero_grad=true,false",
              f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.progress_bar=true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir()
                  if p.is_dir() and p.name != "summary")
    assert jobs == ["train.zero_grad=false", "train.zero_grad=true"]  # what differs, only
    # Lightning's TQDM bar (on stdout, as Lightning writes it), with the loss and images/s
    assert "loss=" in out.stdout and "img/s=" in out.stdout and "Epoch 0" in out.stdout


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
def test_every_quick_study_runs_offline_and_shows_its_effect(study, runs, tmp_path, data_root,
                                                          monkeypatch, capsys):
    """size=quick, on synthetic data: each study shows what it is about. The zero-grad study
    runs exactly as a user's `size=quick` (320 steps: .grad's accumulation must show); the
    others on a 64-example subset (what they compare does not depend on the length). Through
    the entry point in this process (test_multirun_names_job_dirs... runs the real script)."""
    short = [] if study == "zero_grad_study" else ["data.subset=64", "trainer.limit_val_batches=1"]
    out = in_process(["train", "-m", f"experiment={study}", "data=synthetic", "size=quick",
                      f"data.root={data_root}", "data.train_size=2048", "data.test_size=256",
                      *short, f"hydra.sweep.dir={tmp_path}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 0, out.stderr
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*/run.json")]
    assert len(records) == runs
    assert all(r["status"] == "completed" and r["config"]["study"] == study for r in records)
    assert all(r["final"]["val_loss"] is not None for r in records)
    by = {}
    for r in records:
        c = r["config"]
        by[(c["model"]["name"], c["train"]["zero_grad"], str(c["train"]["freeze"]),
            c["train"]["detach_at"], c["eval"]["grad_mode"], c["model"]["activation"])] = r
    if study == "zero_grad_study":  # the seed's point: without zero_grad training goes astray
        loss = {zg: r["final"]["train_loss"] for (_, zg, *_), r in by.items()}
        assert all(r["final"]["steps"] == 320 for r in records)
        assert loss[False] >= 10 * loss[True], loss
    if study == "freeze_study":  # fewer parameters trained, less kept for backward
        order = sorted(records, key=lambda r: r["params"]["trainable"])
        assert order[0]["params"]["trainable"] == 512 * 10 + 10
        for key in ("trainable_param_bytes", "grad_bytes", "optimizer_state_bytes",
                    "saved_for_backward_bytes"):
            values = [r["memory"][key] for r in order]
            assert values[0] < values[1] < values[2], key
    if study == "detach_study":  # what is upstream of the cut gets no gradient and stays put
        import pandas as pd

        checked = 0
        for path in tmp_path.glob("*/run.json"):
            r = json.loads(path.read_text())
            cut = r.get("detach", {}).get("upstream_names", [])
            assert (len(cut) > 0) == (r["config"]["train"]["detach_at"] is not None)
            frame = pd.read_parquet(path.parent / "metrics.parquet")
            for group in {n.split(".")[0] for n in cut}:  # the step's update of each group
                moved = frame[frame.name == f"probes/update_norm/{group}"].value
                assert len(moved) and (moved == 0).all(), (path.parent.name, group)
                checked += 1
            if cut:  # and downstream of it, the weights did move
                head = frame[frame.name == "probes/update_norm/fc"].value
                assert len(head) and (head > 0).all()
        assert checked >= 4
        cut = {(r["config"]["model"]["name"], r["config"]["train"]["detach_at"]):
               r.get("detach", {}).get("upstream_params", 0) for r in records}
        assert cut[("resnet18", "layer1")] < cut[("resnet18", "layer4")]
        assert cut[("smallnet", "conv")] == cut[("smallnet", "pool")] == 3 * 3 * 25 + 3
    if study == "eval_modes":  # the same metrics; only `enabled` builds a graph to keep
        for model in ("smallnet", "resnet18"):
            mine = {k[4]: r for k, r in by.items() if k[0] == model}
            assert len({(r["final"]["val_loss"], r["final"]["val_acc"])
                        for r in mine.values()}) == 1
            assert mine["enabled"]["memory"]["val_saved_bytes"] > 0
            assert mine["no_grad"]["memory"]["val_saved_bytes"] == 0
            assert mine["inference"]["memory"]["val_saved_bytes"] == 0


def test_tab_completion_goes_through_hydra(tmp_path):
    install = cli("-sc", "install=bash", cwd=tmp_path)
    assert install.returncode == 0
    assert install.stdout.rstrip().endswith("-F hydra_bash_completion autograd-lab")
    query = cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "autograd-lab train optim="})
    assert query.stdout.split() == ["optim=adam", "optim=sgd"]
    query = cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "autograd-lab train model="})
    assert query.stdout.split() == ["model=resnet18", "model=smallnet"]


def test_srun_on_path_outside_a_slurm_job_prints_no_hint(tmp_path, data_root):
    """A machine with SLURM's client installed, a run that is no SLURM job: Lightning's
    "srun is available but not used" hint is noise there and does not reach the terminal."""
    import os
    import stat

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = cli("train", *SMALL, f"data.root={data_root}", "trainer.max_steps=2",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "srun" not in out.stderr + out.stdout


def test_overrides_longer_than_a_file_name_still_name_a_directory(tmp_path, data_root,
                                                                 monkeypatch, capsys):
    """A sweep whose overrides make a directory name over 255 bytes: each job's directory is
    shortened with a stable hash (the full overrides stay in run.json), the sweep completes, and
    the same command finds the same directories again (every job skipped). Both commands go
    through the entry point in this process."""
    long = "x" * 300
    args = ["train", "-m", *SMALL, f"data.root={data_root}", f"study={long}", "seed=0,1",
            "probes=off", "trainer.max_steps=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = in_process(args, tmp_path, monkeypatch, capsys)
    assert first.returncode == 0, first.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if (p / "run.json").exists())
    assert len(jobs) == 2
    assert all(len(p.name.encode()) <= 255 for p in jobs)
    records = [json.loads((p / "run.json").read_text()) for p in jobs]
    assert all(f"study={long}" in r["overrides"] and r["status"] == "completed"
               for r in records)
    again = in_process(args, tmp_path, monkeypatch, capsys)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("already completed") == 2
    assert sorted(p for p in (tmp_path / "sweep").iterdir() if (p / "run.json").exists()) == jobs


def test_printing_the_config_checks_the_overrides_too(tmp_path):
    """`--cfg job` with a typo: the same one line and exit 2 as a run, not Hydra's traceback."""
    out = cli("train", "--cfg", "job", "model=nope", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines == ["autograd-lab: error: model=nope: no such model; choices are: resnet18, "
                     "smallnet"]
    assert list(tmp_path.iterdir()) == []


def test_the_tensorboard_command_serves_every_step_and_stops_on_ctrl_c(tmp_path, data_root):
    """A run of 1,500 steps: through `autograd-lab tensorboard`'s server (127.0.0.1, a free port
    from the one asked for) the scalars API returns all 1,500 train/loss points (plain
    TensorBoard keeps 1,000); Ctrl-C stops the server and the command exits 0."""
    import signal
    import socket
    import urllib.request

    from autograd_lab.train import run

    run_dir = tmp_path / "runs" / "long"
    run(make_cfg("data.train_size=12000", "data.batch_size=8", "trainer.max_epochs=1",
                 "probes=off", "trainer.limit_val_batches=1", data_root=data_root), run_dir)
    with socket.socket() as s:  # a port nobody listens on now, as a starting point
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "autograd-lab"
    proc = subprocess.Popen([str(exe), "tensorboard", str(tmp_path / "runs"), f"--port={port}"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("TensorBoard: http://127.0.0.1:"), (line, proc.stderr.read())
        url = line.split()[1]
        import time

        points, deadline = [], time.time() + 60
        while len(points) < 1500 and time.time() < deadline:  # TensorBoard loads in the back
            time.sleep(0.5)
            if "long" in json.load(urllib.request.urlopen(f"{url}data/runs", timeout=30)):
                points = json.load(urllib.request.urlopen(
                    f"{url}data/plugin/scalars/scalars?tag=train%2Floss&run=long",
                    timeout=30))
        assert [p[1] for p in points] == list(range(1500))
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0 and "Traceback" not in proc.stderr.read()


def test_mistakes_are_caught_before_torch_is_imported_all_at_once(tmp_path):
    """A freeze glob that matches nothing, a detach point SmallNet does not have and missing
    CIFAR-10: one line each, together, exit 2, no run directory, and torch never imported
    (so it is quick: the import alone takes seconds)."""
    code = ("import sys; from autograd_lab.cli import main; "
            "rc = main(['train', 'train.freeze=[convv.*]', 'train.detach_at=conv.0']); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stdout.strip() == "torch not imported"
    lines = out.stderr.splitlines()
    assert lines == [
        "autograd-lab: error: train.freeze='convv.*': matches no parameter of smallnet (did you "
        "mean conv or conv.bias?); parameter names start with: conv, fc (or use backbone)",
        "autograd-lab: error: train.detach_at='conv.0': smallnet has no such module (did you "
        "mean conv?); modules are: conv, pool, fc",
        f"autograd-lab: error: data=cifar10: CIFAR-10 is not in data.root="
        f"{(tmp_path / 'data').resolve()} and cannot be downloaded from "
        f"{os.environ['AUTOGRAD_LAB_CIFAR10_URL']} (Connection refused); put "
        f"cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/) there, or use "
        f"data=synthetic (runs offline)"]
    assert list(tmp_path.iterdir()) == []  # no run directory, nothing written


def test_missing_pretrained_weights_are_caught_before_torch(tmp_path):
    out = cli("train", "model=resnet18", "model.weights=IMAGENET1K_V1", "data=synthetic",
              cwd=tmp_path, env={"TORCH_HOME": str(tmp_path / "th")})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"autograd-lab: error: model.weights=IMAGENET1K_V1: resnet18-f37072fd.pth is not in "
        f"{tmp_path / 'th' / 'hub' / 'checkpoints'}; put it there (from "
        f"download.pytorch.org/models/) or set TORCH_HOME, or use model.weights=null"]
    assert list(tmp_path.iterdir()) == []


def test_without_a_terminal_a_run_prints_plain_progress_lines(tmp_path, data_root):
    """Output to a pipe (a cluster job, `| tee`): no bar, a plain line every
    log.progress_every_s with the step, the last flushed loss and its step, and images/s."""
    import re

    out = cli("train", "data=synthetic", f"data.root={data_root}", "data.train_size=2048",
              "data.test_size=128", "trainer.max_epochs=2", "probes=off",
              "log.progress_every_s=0.05", "log.flush_every_s=0.01", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    progress = [ln for ln in lines if ln.startswith("  step ")]
    assert len(progress) >= 3, out.stderr
    pattern = re.compile(r"  step ([\d,]+)/128, epoch (\d), loss [\d.e-]+ \(step ([\d,]+)\), "
                         r"[\d,.]+ images/s(, val loss [\d.e-]+, val acc [\d.e-]+)?$")
    steps = []
    for ln in progress:
        m = pattern.match(ln)
        assert m, ln
        step, flushed = int(m.group(1).replace(",", "")), int(m.group(3).replace(",", ""))
        assert flushed < step  # the loss shown is one already on the host: no sync for it
        steps.append(step)
    assert steps == sorted(steps)
    assert any(", val loss " in ln for ln in progress if int(
        pattern.match(ln).group(2)) == 1)  # after the first validation it is shown too
    assert "\r" not in out.stderr and "it/s" not in out.stderr + out.stdout  # no bar
    assert lines[0].endswith(": starting") and lines[-1].startswith("  tensorboard: ")


@pytest.mark.parametrize("args", [["train", "--help"], ["--help"]])
def test_help_piped_into_a_reader_that_leaves_ends_quietly(tmp_path, args):
    """`autograd-lab train --help | head`: the reader closes the pipe; the command ends as the
    shell's tools do (exit 141, 128 + SIGPIPE, or 0 if all was written), with nothing on stderr
    (it said "autograd-lab: error: [Errno 32] Broken pipe", or a traceback for --help)."""
    exe = Path(sys.executable).parent / "autograd-lab"
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read()
    assert proc.wait(60) in (0, 141), err
    assert err == "", err
