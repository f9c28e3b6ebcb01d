"""Nothing from the command line runs code: Hydra's --experimental-rerun (it unpickles a file) is
refused; a pickle given as a checkpoint or weights file is named for what it asks to run and
never run; a `_target_` that is not a class of its kind (a callback, a logger, an LR scheduler,
one of Hydra's own callbacks) is refused on every path before a run directory exists. Each case
plants a marker command that must never run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from conftest import in_process

from autograd_lab.errors import clip

TINY = ["data=synthetic", "data.train_size=64", "data.test_size=32", "trainer.max_steps=2",
        "probes=off", "threads=1", "trainer.progress_bar=false"]


class _RunsCode:
    """A pickle that runs `touch MARKER` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"state_dict": _RunsCode(tmp_path / "ran")}))
    return path


def _python_m(args, cwd):
    return subprocess.run([sys.executable, "-m", "autograd_lab.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line(out, *needles) -> str:
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("autograd-lab: error:")]
    assert len(errors) == 1, out.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("flag", ["--experimental-rerun", "--experimental-rerun=", "--exp"])
def test_experimental_rerun_is_refused(flag, tmp_path, monkeypatch, capsys):
    evil = _evil(tmp_path)
    args = [f"{flag}{evil}"] if flag.endswith("=") else [flag, str(evil)]
    out = in_process(["train", *args], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2
    _one_line(out, "refused", "unpickles", "run the same command again")
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pkl"]


def test_experimental_rerun_is_refused_by_python_m(tmp_path):
    evil = _evil(tmp_path)
    out = _python_m(["--experimental-rerun", str(evil)], tmp_path)
    assert out.returncode == 2, out.stderr
    _one_line(out, "--experimental-rerun", "refused")
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pkl"]


@pytest.mark.parametrize("key", ["ckpt_path", "model.weights_path"])
def test_a_raw_pickle_is_named_for_what_it_would_run(key, tmp_path, data_root, monkeypatch,
                                                     capsys):
    evil = _evil(tmp_path)
    out = in_process(["train", *TINY, f"data.root={data_root}", f"{key}={evil}",
                       f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2, out.stderr  # a bad checkpoint or weights file: the user's
    line = _one_line(out, "evil.pkl", "asks to run posix.system", "nothing in it was run")
    assert "truncated" not in line and "Weights only load failed" not in line
    assert not (tmp_path / "ran").exists()


def test_a_plain_pickle_without_code_is_called_so(tmp_path, data_root, monkeypatch, capsys):
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"fc.weight": [1.0, 2.0]}))
    out = in_process(["train", *TINY, f"data.root={data_root}", f"model.weights_path={plain}",
                       f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    assert out.returncode == 2, out.stderr
    line = _one_line(out, "plain.pkl", "a plain pickle", "not a file torch.save wrote")
    assert "truncated" not in line


def test_messages_are_cut_at_a_word_boundary():
    text = "Weights only load failed. In PyTorch 2.6, we changed the default value of the " \
           "`weights_only` argument in `torch.load` from `False` to `True`."
    cut = clip(text, 120)
    assert cut.endswith("…") and len(cut) <= 121
    assert text.startswith(cut[:-1]) and text[len(cut) - 1] == " "  # a whole word ends there
    assert clip("short line\nsecond", 120) == "short line"
    assert clip("x" * 200, 120) == "x" * 200  # one word: never cut inside it


def _targets(tmp_path):
    marker = tmp_path / "made"
    return {
        "scheduler open": (["scheduler=step", "scheduler.make._target_=builtins.open",
                            "~scheduler.make._partial_", "~scheduler.make.step_size",
                            "~scheduler.make.gamma", f"+scheduler.make.file={marker}",
                            "+scheduler.make.mode=w"],
                           ["scheduler.make._target_=builtins.open", "refused", "function",
                            "torch.optim.lr_scheduler.LRScheduler"]),
        "callback os.system": (["+callbacks.x._target_=os.system",
                                f"+callbacks.x.command='touch {marker}'"],
                               ["callbacks.x._target_=os.system", "refused", "function",
                                "Callback"]),
        "logger exec": (["+logger.x._target_=builtins.exec",
                         f"+logger.x.source='open(\"{marker}\", \"w\")'"],
                        ["logger.x._target_=builtins.exec", "refused", "function", "Logger"]),
        "callback subprocess class": (["+callbacks.x._target_=subprocess.Popen",
                                       f"+callbacks.x.args=[touch,{marker}]"],
                                      ["callbacks.x._target_=subprocess.Popen",
                                       "not a Lightning Callback"]),
        "hydra callback open": (["+hydra.callbacks.x._target_=builtins.open",
                                 f"+hydra.callbacks.x.file={marker}", "+hydra.callbacks.x.mode=w"],
                                ["hydra.callbacks.x._target_=builtins.open", "refused",
                                 "function", "hydra.experimental.callback.Callback"]),
        "hydra callback as a dict": ([f"+hydra.callbacks={{x:{{_target_:os.system,"
                                      f"command:'touch {marker}'}}}}"],
                                     ["_target_=os.system", "refused", "Hydra Callback"]),
        "nested target": (["callbacks=[early_stopping]",
                           "+callbacks.early_stopping.x._target_=builtins.open",
                           f"+callbacks.early_stopping.x.file={marker}",
                           "+callbacks.early_stopping.x.mode=w"],
                          ["callbacks.early_stopping.x._target_", "refused"]),
    }


CASES = ["scheduler open", "callback os.system", "logger exec", "callback subprocess class",
         "hydra callback open", "hydra callback as a dict", "nested target"]


@pytest.mark.parametrize("case", CASES)
def test_a_target_that_is_no_class_of_its_kind_is_refused(case, tmp_path, data_root,
                                                          monkeypatch, capsys):
    overrides, needles = _targets(tmp_path)[case]
    out = in_process(["train", *TINY, f"data.root={data_root}", *overrides], tmp_path,
                      monkeypatch, capsys)
    assert out.returncode == 2, out.stderr
    _one_line(out, *needles)
    assert list(tmp_path.iterdir()) == []  # no file made, no run directory


@pytest.mark.parametrize("case", ["scheduler open", "callback os.system", "logger exec",
                                  "hydra callback open"])
def test_python_m_refuses_them_before_a_run_directory(case, tmp_path, data_root):
    overrides, needles = _targets(tmp_path)[case]
    out = _python_m([*TINY, f"data.root={data_root}", *overrides], tmp_path)
    assert out.returncode == 2, out.stderr
    _one_line(out, *needles)
    assert list(tmp_path.iterdir()) == []


def test_the_api_refuses_them_too(tmp_path, data_root):
    """train.run (the notebooks' path) checks before it makes anything."""
    from autograd_lab.config.compose import compose
    from autograd_lab.errors import UserError
    from autograd_lab.train import run

    overrides, needles = _targets(tmp_path)["scheduler open"]
    cfg = compose([*TINY, f"data.root={data_root}", *overrides])
    with pytest.raises(UserError, match="builtins.open: refused"):
        run(cfg, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []
