"""Sharpness and gradient noise scale (dynamics.py, probes.py) against exact computations made
here: the full Hessian formed by torch.autograd.functional.hessian, per-example gradients by a
Python loop, the optimizer's stability threshold by its formula; and, through real harness runs,
the loss curve bitwise unchanged by either probe."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import losses

from autograd_lab.observe.dynamics import (
    per_example_noise,
    sharpness,
    stability_limit,
    two_batch_noise,
)
from autograd_lab.sweep.figures import plot_stability


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def _data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)


def _hessian_top(model, x, y, names) -> float:
    """The Hessian over the named parameters, formed whole; its largest eigenvalue."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss_of(flat):
        chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
        return F.cross_entropy(torch.func.functional_call(
            model, {**params, **dict(zip(names, chunks, strict=True))}, (x,)), y)

    flat = torch.cat([params[n].detach().reshape(-1) for n in names]).double()
    model.double()
    h = torch.autograd.functional.hessian(loss_of, flat)
    model.float()
    return float(torch.linalg.eigvalsh(h)[-1])


def test_sharpness_is_the_top_eigenvalue_of_the_hessian_of_the_trainable_block():
    model = _mlp()
    x, y = _data(24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = _hessian_top(model.double(), x.double(), y, [n for n, _ in model.named_parameters()])
    model.float()
    # the probe's loss over batches of 8 is the mean over all 24 examples (no BatchNorm)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 24, 8)]
    value = float(sharpness(model, batches, iters=20, generator=torch.Generator().manual_seed(3)))
    assert value == pytest.approx(exact, rel=1e-3)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a frozen first layer: the eigenvalue of the second layer's block, not of the whole
    model[0].requires_grad_(False)
    block = _hessian_top(model, x.double(), y, ["2.weight", "2.bias"])
    model.float()
    frozen = float(sharpness(model, batches, iters=15, generator=torch.Generator().manual_seed(4)))
    assert frozen == pytest.approx(block, rel=1e-3)
    assert abs(block - exact) > 1e-2 * exact  # the two differ: the test can tell them apart


def test_stability_limit_is_the_optimizers_threshold():
    w = [nn.Parameter(torch.zeros(2))]
    assert stability_limit(torch.optim.SGD(w, lr=0.1, momentum=0.0)) == pytest.approx(20.0)
    assert stability_limit(torch.optim.SGD(w, lr=0.01, momentum=0.9)) == pytest.approx(380.0)
    # Nesterov: (2+2b)/((1+2b) lr); weight decay wd shifts the limit on the loss's sharpness
    assert stability_limit(torch.optim.SGD(w, lr=0.1, momentum=0.5, nesterov=True)) == \
        pytest.approx(3 / (2 * 0.1))
    assert stability_limit(torch.optim.SGD(w, lr=0.1, weight_decay=0.5)) == pytest.approx(19.5)
    assert stability_limit(torch.optim.Adam(w, lr=0.1)) is None
    # the heavy-ball threshold by simulation: on f = a/2 x^2, a just below the limit converges
    # and just above diverges
    for a, stable in ((0.99 * 380.0, True), (1.01 * 380.0, False)):
        x = nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([x], lr=0.01, momentum=0.9)
        for _ in range(300):
            opt.zero_grad()
            (0.5 * a * x ** 2).sum().backward()
            opt.step()
        assert (abs(float(x.detach())) < 1) == stable


def _per_example_grads(model, x, y) -> torch.Tensor:
    """One row per example: the gradient of its own loss, by a plain loop."""
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows).double()


def test_per_example_estimates_equal_a_loop_over_examples():
    model = _mlp()
    model[0].requires_grad_(False)  # over the trainable parameters only
    x, y = _data(20)
    g = _per_example_grads(model, x, y)
    b, mean = len(y), g.mean(0)
    trace = float(((g - mean) ** 2).sum() / (b - 1))
    grad_sq = float(mean @ mean - trace / b)
    est_trace, est_grad_sq = per_example_noise(model, x, y, chunk=7)  # chunks: 7 + 7 + 6
    assert float(est_trace) == pytest.approx(trace, rel=1e-5)
    assert float(est_grad_sq) == pytest.approx(grad_sq, rel=1e-4, abs=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_two_batch_estimator_is_unbiased_over_repeated_draws():
    """The population's tr(Sigma) and |G|^2 (all 48 examples, per-example loop) against the mean
    of 1,200 two-batch estimates from draws of 32 (8 batches of 4), with replacement: within four
    standard errors of that mean (the standard error itself under 5% of the value)."""
    model = _mlp()
    x, y = _data(48)
    g = _per_example_grads(model, x, y)
    mean = g.mean(0)
    trace, grad_sq = float(((g - mean) ** 2).sum(1).mean()), float(mean @ mean)
    gen = torch.Generator().manual_seed(5)
    draws = []
    for _ in range(1200):
        idx = torch.randint(48, (32,), generator=gen)
        draws.append([float(v) for v in two_batch_noise(model, x[idx], y[idx], small=4)])
    est = torch.tensor(draws, dtype=torch.float64)
    m, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    for got, err, exact in zip(m.tolist(), se.tolist(), (trace, grad_sq), strict=True):
        assert err < 0.05 * exact
        assert abs(got - exact) < 4 * err, (got, exact, err)


def test_probes_leave_the_curve_bitwise_and_log_sharpness_next_to_the_limit(train_run):
    # zero_grad=false and momentum: any touch of .grad or the optimizer would show in the curve
    common = ("data.train_size=64", "data.test_size=32", "trainer.max_epochs=3",
              "train.zero_grad=false", "optim.lr=0.01", "optim.momentum=0.9")
    second = ("probes.sharpness_every_n_steps=2", "probes.sharpness_examples=40",
              "probes.sharpness_iters=4", "probes.gns_every_n_steps=3",
              "probes.gns_batch_size=16", "probes.gns_small_batch_size=4")
    _, off = train_run("probes=off", *common)
    _, per_example = train_run("probes=cheap", *second, *common)
    _, two_batch = train_run("probes=cheap", *second, "probes.gns_method=two_batch", *common)
    frames = {d: pd.read_parquet(d / "metrics.parquet") for d in (off, per_example, two_batch)}
    assert losses(off) == losses(per_example) == losses(two_batch)
    vals = [f.query("name == 'val/loss'").value.tolist() for f in frames.values()]
    assert vals[0] == vals[1] == vals[2] and len(vals[0]) == 3
    for run_dir in (per_example, two_batch):
        f = frames[run_dir]
        sharp = f[f.name == "probes/sharpness"]
        assert list(sharp.step) == [0, 2, 4] and (sharp.value > 0).all()
        limit = f[f.name == "probes/stability_limit"]
        assert limit.value.tolist() == pytest.approx([(2 + 2 * 0.9) / 0.01] * 3)
        assert sorted(f[f.name == "probes/gns_trace_sigma"].step) == [0, 3]
        ratio = f[f.name == "probes/grad_noise_scale"].value.to_numpy()
        parts = (f[f.name == "probes/gns_trace_sigma"].value.to_numpy()
                 / f[f.name == "probes/gns_grad_sq"].value.to_numpy())
        ok = ~pd.isna(ratio)
        assert ok.any() and (abs(ratio[ok] - parts[ok]) <= 1e-4 * abs(parts[ok])).all()
    # the same probe set and generator in both runs: the same sharpness
    assert frames[per_example].query("name == 'probes/sharpness'").value.tolist() == \
        frames[two_batch].query("name == 'probes/sharpness'").value.tolist()


def test_stability_study_composes_and_one_quick_job_runs(cfg_factory, train_run, tmp_path):
    cfg = cfg_factory("experiment=stability_study", "size=quick")
    assert cfg.data.batch_size == cfg.data.subset  # full batch
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0 and cfg.model.name == "smallnet"
    assert cfg.probes.sharpness_every_n_steps > 0
    from hydra import compose, initialize_config_module

    with initialize_config_module("autograd_lab.conf", version_base="1.3"):
        hydra_cfg = compose("train", ["experiment=stability_study"], return_hydra_config=True)
    lrs = str(hydra_cfg.hydra.sweeper.params["optim.lr"]).split(",")
    assert len(lrs) >= 3
    runs = []
    for lr in (0.05, 0.2):
        record, run_dir = train_run("experiment=stability_study", "size=quick", "data.subset=48",
                                    "trainer.max_epochs=4", "probes.sharpness_every_n_steps=2",
                                    "probes.sharpness_examples=48", "probes.sharpness_iters=4",
                                    f"optim.lr={lr}")
        assert record["status"] == "completed", record["error"]
        assert len(losses(run_dir)) == 4  # four full-batch steps
        runs.append(run_dir)
    from autograd_lab.sweep.runs import load_curves, load_runs

    base = runs[0].parent
    png = plot_stability(load_runs(base), load_curves(base), tmp_path / "plots")
    assert png.is_file() and png.stat().st_size > 10_000
