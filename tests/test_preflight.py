"""Every value checked before anything runs, on every path (issue 23, section 5).

A mistake in a callback's, a logger's or a scheduler's arguments, a data set larger than the
machine's memory, an interpolation Hydra cannot resolve, and one bad job among the hundreds of a
sweep: each is one line through the `autograd-lab` command (the bad-value matrix through its
entry point, cli.main, in this process; the rest through the installed script and `python -m
autograd_lab.train`), exit 2, no traceback, and nothing made in the folder: no runs/, no
multirun/, no data. Resuming with an added logger or LR monitor (they change no curve) continues
to the uninterrupted run's curve; a ModelCheckpoint file from another config is refused, naming
the difference.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import cli, in_process, losses, make_cfg
from test_resume import OVERRIDES, SendSignal, _reference, _rows

SMALL = ["data=synthetic", "data.train_size=64", "data.test_size=32", "trainer.max_steps=2",
         "probes=off"]


def _refused(out, folder, *words: str) -> str:
    """Exit 2, exactly one `autograd-lab: error:` line holding every word, no traceback, and
    nothing made in `folder` (no runs/, multirun/ or data/)."""
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("autograd-lab: error: "), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in folder.iterdir()) == [], "nothing may be made"
    return lines[0]


CASES = {  # what the user types -> what the one line must name (the key, the value, the choices)
    "patience not a number": (["callbacks=[early_stopping]",
                               "callbacks.early_stopping.patience=abc"],
                              ["callbacks.early_stopping.patience='abc'", "an integer"]),
    "mode sideways": (["callbacks=[early_stopping]", "callbacks.early_stopping.mode=sideways"],
                      ["callbacks.early_stopping.mode='sideways'", "one of: min, max"]),
    "every_n_train_steps negative": (
        ["callbacks=[model_checkpoint]", "callbacks.model_checkpoint.every_n_train_steps=-1"],
        ["callbacks.model_checkpoint.every_n_train_steps=-1", "null or an integer >= 0"]),
    "a callback argument that does not exist": (
        ["callbacks=[early_stopping]", "+callbacks.early_stopping.patiense=2"],
        ["callbacks.early_stopping.patiense", "did you mean patience?", "it takes: monitor"]),
    "step_size zero": (["scheduler=step", "scheduler.make.step_size=0"],
                       ["scheduler.make.step_size=0", "an integer >= 1"]),
    "pct_start two": (["scheduler=onecycle", "scheduler.make.pct_start=2"],
                      ["scheduler.make.pct_start=2", "a number in (0, 1)"]),
    "eta_min negative": (["scheduler=cosine", "scheduler.make.eta_min=-5"],
                         ["scheduler.make.eta_min=-5", "a finite number >= 0"]),
    "unknown interpolation": (["optim.lr=${nope}"],
                              ["optim.lr=${nope}", "cannot be resolved", "'nope' not found",
                               "give a value"]),
    "unset environment variable": (["seed=${oc.env:AUTOGRAD_LAB_TEST_UNSET}"],
                                   ["seed=${oc.env:AUTOGRAD_LAB_TEST_UNSET}",
                                    "AUTOGRAD_LAB_TEST_UNSET", "not found",
                                    "${oc.env:NAME,default}"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_value_is_one_line_before_anything_runs(name, tmp_path, monkeypatch, capsys):
    args, words = CASES[name]
    out = in_process(["train", *SMALL, *args], tmp_path, monkeypatch, capsys)
    _refused(out, tmp_path, *words)


def test_a_data_set_larger_than_memory_is_refused_with_the_sizes(tmp_path):
    """The schema allows 10,000,000 images; this machine's memory may not: the line says what
    the data set needs (4 float32 copies of 12,288 B an image while it is written), what is
    available, and the largest size that fits."""
    from autograd_lab.config.resources import available_memory

    need = 4 * 12288 * 10_000_000
    available = available_memory()
    if available is None or available > need:
        pytest.skip("this machine has the memory for it (or does not say)")
    out = cli("train", "data=synthetic", "data.train_size=10000000", cwd=tmp_path, timeout=180)
    line = _refused(out, tmp_path, "data.train_size=10000000", "GiB of memory", "GiB available",
                    "give data.train_size <= ")
    needed = float(line.split("needs about ")[1].split(" GiB")[0])
    assert needed >= need / 2**30  # at least the written images' peak, in GiB
    fits = int(line.rsplit("<= ", 1)[1].replace(",", ""))
    assert 5 <= fits and 4 * 12288 * fits <= available  # a size that fits is offered


def test_python_dash_m_makes_no_run_directory_for_a_bad_value(tmp_path):
    out = subprocess.run([sys.executable, "-m", "autograd_lab.train", "optim.lr=-1",
                          "data=synthetic"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    _refused(out, tmp_path, "optim.lr=-1", "a finite number > 0")


def test_every_job_of_a_sweep_is_checked_before_the_first_starts(tmp_path):
    """256 good learning rates and one bad one, last: refused before any job runs (before, 256
    jobs trained and the 257th failed)."""
    rates = ",".join(f"{0.001 * (i + 1):.3f}" for i in range(256))
    t0 = time.perf_counter()
    out = cli("train", "-m", *SMALL, f"optim.lr={rates},-1", cwd=tmp_path, timeout=240)
    _refused(out, tmp_path, "optim.lr=-1", "a finite number > 0")
    print(f"257-job sweep refused in {time.perf_counter() - t0:.1f} s (command included)")


def test_the_quick_sweep_check_composes_what_hydra_composes():
    """The sweep check composes once per swept group and sets swept values as Hydra does: the
    oracle is Hydra's own compose of each job (a value another one interpolates included)."""
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from autograd_lab.config.keys import CONF_DIR, resolved
    from autograd_lab.config.preflight import sweep_jobs

    parser = OverridesParser.create()
    fixed = ["data=synthetic", "scheduler=onecycle"]
    swept = {"model": ["smallnet", "resnet18"], "optim.lr": ["0.1", "0.2", "0.3"],
             "seed": ["0", "7"]}
    sweeps = {k: parser.parse_override(f"{k}={','.join(v)}") for k, v in swept.items()}
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        quick = list(sweep_jobs(compose, fixed, sweeps, parser))
        full = [resolved(compose("train", overrides=fixed + [f"{k}={v}" for k, v in zip(
            swept, combo, strict=True)])) for combo in itertools.product(*swept.values())]
    GlobalHydra.instance().clear()
    key = lambda job: (job["model"]["name"], job["optim"]["lr"], job["seed"])  # noqa: E731
    assert sorted(quick, key=key) == sorted(full, key=key)
    assert {job["scheduler"]["make"]["max_lr"] for job in quick} == {0.1, 0.2, 0.3}


def test_the_last_job_of_a_thousand_is_checked_too(tmp_path):
    """100 learning rates x 10 seeds, the last rate out of range: only the last 10 of the
    1,000 jobs (in Hydra's order) are bad, and they are found. No timing assertion (the machine
    is shared): the time is printed (about 2 s here under load; composing each job, as before,
    took about 0.1 s a job)."""
    from autograd_lab.config.preflight import check_overrides
    from autograd_lab.errors import UserError

    rates = ",".join(f"{0.001 * (i + 1):.3f}" for i in range(99))
    t0 = time.perf_counter()
    with pytest.raises(UserError) as refused:
        check_overrides(["data=synthetic", f"data.root={tmp_path}", f"optim.lr={rates},-1",
                         "seed=0,1,2,3,4,5,6,7,8,9"], multirun=True, files=False)
    print(f"1,000-job sweep checked in {time.perf_counter() - t0:.2f} s")
    assert str(refused.value) == "optim.lr=-1: must be a finite number > 0"


# ------------------------------------------------------------------ resume
CHANGED = {  # (the killed run's overrides, the resumed run's)
    "csv logger added": ([], ["logger=[tensorboard,csv]"]),
    "lr_monitor added": ([], ["callbacks=[lr_monitor]"]),
    "model_checkpoint dropped": (["callbacks=[model_checkpoint]",
                                  "callbacks.model_checkpoint.every_n_train_steps=2"], []),
}


@pytest.mark.parametrize("name", list(CHANGED))
def test_resuming_with_an_added_logger_or_lr_monitor_continues(name, tmp_path, data_root,
                                                                tmp_path_factory, recwarn):
    """A logger, an LR monitor or ModelCheckpoint files change no curve: a run killed at step 4
    continues with one added or dropped (before: refused, with advice to start over), quietly,
    and ends with the uninterrupted run's curve, every value of it, bit for bit."""
    reference = _reference(tuple(OVERRIDES), data_root, tmp_path_factory)
    run_dir = tmp_path / "run"
    from autograd_lab.train import run

    before, after = CHANGED[name]
    with pytest.raises(SystemExit):
        run(make_cfg(*OVERRIDES, *before, data_root=data_root), run_dir,
            callbacks=[SendSignal(4, "train", signal.SIGTERM)])
    recwarn.clear()
    resumed = run(make_cfg(*OVERRIDES, *after, data_root=data_root), run_dir)
    assert not [w for w in recwarn if "callbacks used to create the checkpoint" in str(
        w.message)]  # Lightning's advice to add the dropped callback back: not needed
    assert resumed["status"] == "completed"
    assert resumed["resumed"]["from_step"] == 4
    assert losses(run_dir) == losses(reference)
    ours, theirs = _rows(run_dir), _rows(reference)
    ours = ours[ours.name.isin(set(theirs.name))].reset_index(drop=True)  # the LR monitor adds
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    if name == "csv logger added":  # the added logger has the whole curve, the restored part too
        frame = pd.read_csv(run_dir / "csv" / "metrics.csv")
        curve = frame[frame["train/loss"].notna()].sort_values("step")
        assert curve.step.tolist() == list(range(len(losses(reference))))
        np.testing.assert_allclose(curve["train/loss"], losses(reference), rtol=1e-6)


def test_a_model_checkpoint_file_of_another_config_is_refused_naming_the_difference(
        tmp_path, data_root, monkeypatch, capsys):
    """ckpt_path= is the user's choice of file: refused in one line naming the key that
    differs and both values, and the advice is about that file, never resume=false or another
    run directory (neither would help). `autograd-lab train` through its entry point in this
    process; `python -m autograd_lab.train` in its own."""
    from autograd_lab.train import run

    base = [*SMALL[:-2], "trainer.max_steps=4", "probes=off", f"data.root={data_root}"]
    run(make_cfg(*base, "callbacks=[model_checkpoint]",
                 "callbacks.model_checkpoint.every_n_train_steps=2", data_root=data_root),
        tmp_path / "first")
    files = sorted((tmp_path / "first" / "checkpoints").glob("epoch=*.ckpt"))
    assert files, "ModelCheckpoint wrote no file"
    out = in_process(["train", *base, "optim.lr=0.5", f"ckpt_path='{files[0]}'",
                      f"hydra.run.dir={tmp_path / 'second'}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("autograd-lab: error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "optim.lr=0.001" in lines[0] and "optim.lr=0.5" in lines[0], lines[0]
    assert files[0].name in lines[0]
    assert "resume=false" not in out.stderr and "another run directory" not in out.stderr
    assert not (tmp_path / "second").exists()  # refused before Hydra makes the run directory
    # the Hydra app itself (python -m autograd_lab.train) refuses it before making a directory
    out = subprocess.run([sys.executable, "-m", "autograd_lab.train", *base, "optim.lr=0.5",
                          f"ckpt_path='{files[0]}'", f"hydra.run.dir={tmp_path / 'third'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("autograd-lab: error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "optim.lr=0.001" in lines[0] and "optim.lr=0.5" in lines[0], lines[0]
    assert not (tmp_path / "third").exists()
