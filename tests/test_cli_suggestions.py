"""Through the CLI: one suggestion rule (difflib's closest names) for every name a user types,
and `train -m ... --cfg` printing the sweep's first job instead of failing on the CLI's own
injected overrides."""

from __future__ import annotations

import pytest
import yaml
from conftest import cli


@pytest.mark.parametrize("args, line", [
    (["trainer.max_epoch=3"], "autograd-lab: error: trainer.max_epoch: no such key (did you "
                              "mean max_epochs or min_epochs?); keys in trainer are: "),
    (["+trainer.max_epoch=3"], "autograd-lab: error: +trainer.max_epoch: trainer has no key "
                               "'max_epoch' (did you mean max_epochs or min_epochs?); nothing "
                               "would read it: keys in trainer are: "),
    (["optim=adam", "+optim.capturable=true"], "autograd-lab: error: +optim.capturable: optim "
     "has this key already; set it without the +: optim.capturable=true"),
    (["optim.lrr=0.1"], "autograd-lab: error: optim.lrr: no such key (did you mean lr?); keys "
                        "in optim are: lr, momentum, name, nesterov, weight_decay"),
    (["seeed=1"], "autograd-lab: error: seeed: no such key (did you mean seed?); top-level "),
    (["model=resnet19"], "autograd-lab: error: model=resnet19: no such model (did you mean "
                         "resnet18?); choices are: resnet18, smallnet"),
    (["data=synthetc"], "autograd-lab: error: data=synthetc: no such data (did you mean "
                        "synthetic?); choices are: cifar10, synthetic"),
    (["train.detach_at=conv.0"], "autograd-lab: error: train.detach_at='conv.0': smallnet has "
                                 "no such module (did you mean conv?); modules are: "),
    (["train.freeze=[convv.*]"], "autograd-lab: error: train.freeze='convv.*': matches no "
                                 "parameter of smallnet (did you mean conv or conv.bias?); "),
    (["eval.grad_mode=nograd"], "autograd-lab: error: eval.grad_mode='nograd': must be one of: "
                                "inference, no_grad, enabled (did you mean no_grad?)"),
    (["callbacks=[early_stopping]", "callbacks.early_stopping.monitor=val/los"],
     "autograd-lab: error: callbacks.early_stopping.monitor='val/los': no such metric (did you "
     "mean val/loss?); the run logs: val/loss, val/acc"),
])
def test_every_mistyped_name_gets_the_same_suggestion(tmp_path, args, line):
    out = cli("train", "data=synthetic", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(line), out.stderr
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_nothing_is_suggested_when_no_name_is_close(tmp_path):
    out = cli("train", "model=vgg", cwd=tmp_path)
    assert out.stderr.strip() == ("autograd-lab: error: model=vgg: no such model; choices "
                                  "are: resnet18, smallnet")


def test_multirun_cfg_hydra_prints_the_first_jobs_config_in_the_sweep_folder(tmp_path):
    """`-m ... --cfg hydra`: the CLI's injected overrides used to come after the flag (argparse:
    "unrecognized arguments"), and Hydra refuses -m with --cfg: the first job's config is
    printed, with the sweep folder and job name the sweep would use; nothing is created."""
    out = cli("train", "-m", "experiment=zero_grad_study", "data=synthetic", "seed=0,1",
              "--cfg", "hydra", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    hydra = yaml.safe_load(out.stdout)["hydra"]
    assert hydra["sweep"]["dir"] == "multirun/zero_grad_study/data=synthetic"
    assert hydra["job"]["override_dirname"] == "seed=0,train.zero_grad=True"
    assert "first job" in out.stderr and "seed=0" in out.stderr
    job = cli("train", "-m", "experiment=zero_grad_study", "data=synthetic", "seed=0,1",
              "--cfg", "job", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    cfg = yaml.safe_load(job.stdout)
    assert cfg["seed"] == 0 and cfg["train"]["zero_grad"] is True and cfg["study"] == (
        "zero_grad_study")
    assert list(tmp_path.iterdir()) == []
