"""Every key of the config schema (config.CHECKS), given an out-of-range value of each kind it
can get wrong (a wrong type, out of range, not finite), through the real entry point: one line
naming the key, exit 2, no traceback, nothing created. A value a library would reject must never
reach the library."""

from __future__ import annotations

import pytest
import yaml

from autograd_lab.config.schema import CHECKS

# What YAML turns each into, as Hydra parses an override: a wrong type, below and above every
# range, not finite, a list, a boolean, an empty string.
CANDIDATES = ["abc", "-1", "0", "1.5", "-0.5", "1099511627776", "inf", "nan", "[1,2,3]",
              "true", "''", "2"]
# keys that exist only under another group choice
NEEDS = {"model.stem": ["model=resnet18"], "model.weights": ["model=resnet18"],
         "model.num_classes": ["model=resnet18"], "optim.betas": ["optim=adam"],
         "optim.momentum": ["optim=sgd"], "optim.nesterov": ["optim=sgd"],
         "profiler.": ["profiler=torch"], "probes.": ["probes=full"],
         "scheduler.make.step_size": ["scheduler=step"], "scheduler.make.gamma": ["scheduler=step"],
         "scheduler.make.eta_min": ["scheduler=cosine"],
         "scheduler.make.max_lr": ["scheduler=onecycle"],
         "scheduler.make.pct_start": ["scheduler=onecycle"]}


def _needs(key: str) -> list[str]:
    return next((v for k, v in NEEDS.items() if key == k or (k.endswith(".") and
                                                             key.startswith(k))), [])


def _cases():
    for key, (ok, _) in CHECKS.items():
        rejected = []
        for text in CANDIDATES:
            value = yaml.safe_load(text)
            if not ok(value):
                rejected.append(text)
        assert rejected, f"{key}: no candidate value is out of range: extend CANDIDATES"
        # one of each kind: a wrong type first, then out of range, then not finite
        kinds = [t for t in rejected if t in ("abc", "[1,2,3]", "true", "''")][:1] + \
            [t for t in rejected if t in ("-1", "0", "1.5", "-0.5", "1099511627776", "2")][:1] + \
            [t for t in rejected if t in ("inf", "nan")][:1]
        for text in kinds:
            yield pytest.param(key, text, id=f"{key}={text}")


@pytest.mark.parametrize(("key", "text"), list(_cases()))
def test_every_key_refuses_values_out_of_its_range(key, text, tmp_path, monkeypatch, capsys):
    from autograd_lab.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["train", "data=synthetic", f"data.root={tmp_path / 'data'}", *_needs(key),
            f"{key}={text}"]
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    assert code == 2, out.err
    assert "Traceback" not in out.err + out.out
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("autograd-lab: error:"), out.err
    assert key in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be created"


@pytest.mark.parametrize("override", ["probes.spectrum_top_k=101", "probes.slq_iters=1001",
                                      "probes.spectrum_top_iters=1001",
                                      "probes.sharpness_iters=1001"])
def test_lanczos_counts_have_an_upper_bound(override, tmp_path, monkeypatch, capsys):
    """A Lanczos run keeps one vector of the model's size per step: 100,000 steps would hold the
    probe for hours (it cannot see a stop signal inside). Refused in one line, like any range."""
    from autograd_lab.cli import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["train", "data=synthetic", f"data.root={tmp_path / 'data'}", "probes=full",
                 override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and override in err, err
    assert "to 100" in err or "to 1000" in err
    assert not any(tmp_path.glob("runs/*"))


def test_compile_without_a_cxx_compiler_is_refused(tmp_path, monkeypatch, capsys):
    """model.compile=true where no C/C++ compiler is on PATH (inductor needs one): one line,
    exit 2, before anything is made; with one on PATH the same check lets it through."""
    from autograd_lab.cli import main
    from autograd_lab.config.schema import _cxx_compiler

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CXX", raising=False)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert _cxx_compiler() is None
    capsys.readouterr()
    code = main(["train", "data=synthetic", f"data.root={tmp_path / 'data'}",
                 "model.compile=true"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("autograd-lab: error: model.compile=true:") and "C++" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"], "nothing may be created"
    fake = empty / "g++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert _cxx_compiler() == str(fake)
