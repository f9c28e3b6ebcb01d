"""Each probe statistic against an independent computation on the same run."""

from __future__ import annotations

import lightning as L
import pandas as pd
import pytest
import torch
from conftest import losses

from autograd_lab.observe.dynamics import lanczos_top_eigenvalue


class Capture(L.Callback):
    """Weights before each step, .grad and weights after it, by global step (0-based)."""

    def __init__(self):
        self.before, self.grad_after, self.after = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = {n: p.detach().clone()
                                            for n, p in pl_module.model.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.grad_after[step] = {n: None if p.grad is None else p.grad.clone()
                                 for n, p in pl_module.model.named_parameters()}
        self.after[step] = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def _probe(run_dir, stat, group):
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    rows = frame[frame.name == f"probes/{stat}/{group}"].sort_values("step")
    return dict(zip(rows.step, rows.value, strict=True))


def _norm(tensors):
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors if t is not None)))


def _group(d, group):
    return [v for n, v in d.items() if group == "all" or n.split(".")[0] == group]


def test_sgd_update_is_lr_times_grad_and_norms_match(train_run):
    cap = Capture()
    _, run_dir = train_run("optim.momentum=0", "optim.lr=0.01", "probes.every_n_steps=3",
                           "data.train_size=256", callbacks=[cap])
    steps = sorted(_probe(run_dir, "grad_norm", "all"))
    assert steps == [0, 3, 6]
    for group in ("conv", "fc", "all"):
        grad, update = _probe(run_dir, "grad_norm", group), _probe(run_dir, "update_norm", group)
        weight, init = _probe(run_dir, "weight_norm", group), _probe(run_dir, "dist_init", group)
        eff_lr = _probe(run_dir, "eff_lr", group)
        for k in steps:
            g = _norm(_group(cap.grad_after[k], group))
            dw = _norm([a - b for a, b in zip(_group(cap.after[k], group),
                                              _group(cap.before[k], group), strict=True)])
            assert grad[k] == pytest.approx(g, rel=1e-5)
            assert update[k] == pytest.approx(dw, rel=1e-4)
            assert update[k] == pytest.approx(0.01 * g, rel=1e-4)  # plain SGD: |dw| = lr |g|
            assert eff_lr[k] == pytest.approx(0.01, rel=1e-4)
            assert weight[k] == pytest.approx(_norm(_group(cap.before[k], group)), rel=1e-5)
            dist = _norm([a - b for a, b in zip(_group(cap.before[k], group),
                                                _group(cap.before[0], group), strict=True)])
            assert init[k] == pytest.approx(dist, rel=1e-4, abs=1e-7)
        assert init[0] == 0.0


def test_accumulated_grad_norm_is_the_norm_of_the_summed_gradients(train_run):
    cap = Capture()
    _, run_dir = train_run("train.zero_grad=false", "probes.every_n_steps=1",
                           "data.train_size=160", callbacks=[cap])
    acc, own = _probe(run_dir, "acc_grad_norm", "all"), _probe(run_dir, "grad_norm", "all")
    cos = _probe(run_dir, "cos_prev", "all")
    per_step = {}
    for k in range(5):  # each step's own gradient, from the .grad increments
        prev = cap.grad_after.get(k - 1)
        per_step[k] = {n: g - (prev[n] if prev else 0) for n, g in cap.grad_after[k].items()}
        summed = [sum(per_step[j][n] for j in range(k + 1)) for n in per_step[k]]
        assert acc[k] == pytest.approx(_norm(summed), rel=1e-5)
        assert own[k] == pytest.approx(_norm(per_step[k].values()), rel=1e-4)
    assert acc[4] > acc[0]  # it grows when nothing resets it
    for k in range(1, 5):
        a = torch.cat([t.flatten() for t in per_step[k].values()]).double()
        b = torch.cat([t.flatten() for t in per_step[k - 1].values()]).double()
        assert cos[k] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-4)


def test_frozen_and_detached_groups_report_no_grad_and_no_update(train_run):
    _, frozen = train_run("train.freeze=[conv.*]", "probes.every_n_steps=2")
    _, detached = train_run("train.detach_at=pool", "probes.every_n_steps=2")
    for run_dir in (frozen, detached):
        assert set(_probe(run_dir, "grad_none", "conv").values()) == {2.0}  # weight and bias
        assert set(_probe(run_dir, "update_norm", "conv").values()) == {0.0}
        assert set(_probe(run_dir, "grad_none", "fc").values()) == {0.0}
        assert min(_probe(run_dir, "update_norm", "fc").values()) > 0
    frame = pd.read_parquet(frozen / "metrics.parquet")
    checks = frame[frame.name == "probes/frozen_max_change"].value
    assert len(checks) == 8 and (checks == 0).all()


def test_lanczos_top_eigenvalue_of_an_operator_with_known_spectrum():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    # the largest algebraic eigenvalue, though a negative one is larger in magnitude
    spectrum = torch.cat([torch.tensor([7.0, 6.9, -9.0], dtype=torch.float64),
                          torch.linspace(-1, 1, 37, dtype=torch.float64)])
    a = q @ torch.diag(spectrum) @ q.T
    like = torch.zeros(1, dtype=torch.float64)
    exact = lanczos_top_eigenvalue(lambda v: a @ v, 40, 40, torch.Generator().manual_seed(1),
                                   like)
    assert float(exact) == pytest.approx(7.0, rel=1e-10)  # iters = n: exact
    few = lanczos_top_eigenvalue(lambda v: a @ v, 40, 20, torch.Generator().manual_seed(1), like)
    assert float(few) == pytest.approx(7.0, rel=1e-3)


class Final(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters()}


def test_probes_do_not_change_the_curve_and_full_adds_histograms_and_second_order(train_run):
    # zero_grad=false keeps any change to .grad visible; BN buffers show in val/loss and the
    # final state; two epochs put a validation between probe steps
    common = ("model=resnet18", "data.train_size=96", "train.zero_grad=false",
              "optim.lr=1e-4", "trainer.max_epochs=2")
    off_end, full_end = Final(), Final()
    _, off = train_run("probes=off", *common, callbacks=[off_end])
    # ResNet18 has BatchNorm in train mode: the noise scale takes the two-batch estimator
    _, full = train_run("probes=full", "probes.every_n_steps=1", "probes.sharpness_every_n_steps=2",
                        "probes.histogram_every_n_steps=2", "probes.sharpness_iters=2",
                        "probes.sharpness_examples=8", "probes.gns_every_n_steps=3",
                        "probes.gns_batch_size=8", "probes.gns_small_batch_size=4",
                        "probes.spectrum_every_n_steps=3", "probes.spectrum_examples=8",
                        "probes.hutchinson_samples=2", "probes.spectrum_top_k=2",
                        "probes.spectrum_top_iters=2", "probes.slq_runs=1", "probes.slq_iters=2",
                        *common, callbacks=[full_end])
    assert losses(off) == losses(full)
    vals = [pd.read_parquet(d / "metrics.parquet").query("name == 'val/loss'").value.tolist()
            for d in (off, full)]
    assert vals[0] == vals[1] and len(vals[0]) == 2
    assert all(torch.equal(v, full_end.state[k]) for k, v in off_end.state.items())
    assert all(torch.equal(g, full_end.grads[n]) for n, g in off_end.grads.items())
    frame = pd.read_parquet(full / "metrics.parquet")
    assert sorted(frame[frame.name == "probes/sharpness"].step) == [0, 2, 4]
    assert sorted(frame[frame.name == "probes/gns_trace_sigma"].step) == [0, 3]
    assert sorted(frame[frame.name == "probes/hessian_trace/layer1"].step) == [0, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full), size_guidance={"histograms": 0})
    acc.Reload()
    assert "weights/fc.weight" in acc.Tags()["histograms"]
    assert "grads/layer1.0.conv1.weight" in acc.Tags()["histograms"]
    assert "probes/hessian_density" in acc.Tags()["histograms"]
    assert not any(n.startswith("probes/") for n in pd.read_parquet(off / "metrics.parquet").name)


@pytest.mark.parametrize("variant", ["none", "no_zero_grad", "frozen_backbone", "frozen_early",
                                     "detach_shallow", "detach_deep"])
def test_probes_run_for_every_variant(variant, train_run):
    record, run_dir = train_run(f"variant={variant}", "probes=full", "probes.every_n_steps=4",
                                "probes.sharpness_every_n_steps=8", "probes.sharpness_iters=2",
                                "probes.sharpness_examples=16", "probes.gns_every_n_steps=8",
                                "probes.gns_batch_size=16", "probes.spectrum_every_n_steps=8",
                                "probes.spectrum_examples=16", "probes.hutchinson_samples=2",
                                "probes.spectrum_top_iters=3", "probes.slq_iters=3")
    assert record["status"] == "completed", record["error"]
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    names = set(frame.name)
    assert {"probes/grad_norm/conv", "probes/update_ratio/fc", "probes/cos_prev/all",
            "probes/sharpness", "probes/stability_limit", "probes/grad_noise_scale",
            "probes/hessian_trace/all", "probes/hessian_top/1"} <= names
    assert frame[frame.name.str.startswith("probes/")].step.max() == 12
