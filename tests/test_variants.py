"""Every variant against an oracle that fails if the variant silently did nothing."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision

from autograd_lab.errors import UserError
from autograd_lab.model.networks import SmallNet
from autograd_lab.model.variants import GRAD_MODES, detach_at, eval_context, freeze


class Watch(L.Callback):
    """Records, for each training step, the weights before it and the batch it used; at the end,
    the model's final parameters, grads and buffers; and the validation outputs."""

    def __init__(self):
        self.before, self.batches, self.val_outputs = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(copy.deepcopy(pl_module.model.state_dict()))
        self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        self.val_outputs.append(outputs)

    def on_train_end(self, trainer, pl_module):
        model = pl_module.model
        self.final = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.grads = {n: None if p.grad is None else p.grad.clone()
                      for n, p in model.named_parameters()}
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}
        self.model = model


def _run_watched(train_run, *overrides):
    watch = Watch()
    record, _ = train_run(*overrides, callbacks=[watch])
    return record, watch


def _grads_at(model_factory, state, batch):
    """One fresh model copy at `state`, one forward/backward on `batch`: its gradients."""
    model = model_factory()
    model.load_state_dict(state)
    model.train()
    loss = F.cross_entropy(model(batch[0]), batch[1])
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


# ----------------------------------------------------------------- zero_grad
@pytest.mark.parametrize("zero_grad", [True, False])
def test_zero_grad_off_accumulates_the_sum_of_every_steps_gradient(zero_grad, train_run):
    # two epochs: the validation between them must not reset the accumulated .grad either
    record, w = _run_watched(train_run, f"train.zero_grad={str(zero_grad).lower()}",
                             "data.train_size=96", "trainer.max_epochs=2")
    assert record["status"] == "completed" and len(w.batches) == 6
    per_step = [_grads_at(SmallNet, s, b) for s, b in zip(w.before, w.batches, strict=True)]
    for name, grad in w.grads.items():
        expected = per_step[-1][name] if zero_grad else sum(g[name] for g in per_step)
        assert torch.allclose(grad, expected, atol=1e-6, rtol=0), name
        other = sum(g[name] for g in per_step) if zero_grad else per_step[-1][name]
        assert not torch.allclose(grad, other, atol=1e-6, rtol=0)  # the switch did something


# ----------------------------------------------------------------- freeze
def test_freeze_glob_leaves_frozen_tensors_bitwise_unchanged(train_run, tmp_path):
    torch.manual_seed(0)
    init = torchvision.models.resnet18(num_classes=10)
    torch.save(init.state_dict(), tmp_path / "init.pt")
    record, w = _run_watched(train_run, "model=resnet18", f"model.weights_path={tmp_path}/init.pt",
                             "train.freeze=[conv1.*,bn1.*,layer1.*]", "data.train_size=96")
    start = init.state_dict()
    frozen = [n for n in w.final if n.startswith(("conv1.", "bn1.", "layer1."))]
    assert frozen and record["params"]["frozen_names"] == sorted(frozen)
    for name, value in w.final.items():
        if name in frozen:
            assert torch.equal(value, start[name]) and w.grads[name] is None, name
        else:
            assert not torch.equal(value, start[name]), f"{name} did not train"
    for name, buf in w.buffers.items():  # running stats of frozen BN layers stay put
        if name.startswith(("bn1.", "layer1.")):
            assert torch.equal(buf, start[name]), name
        elif name.endswith("running_mean"):
            assert not torch.equal(buf, start[name]), name
    n_frozen = sum(start[n].numel() for n in frozen)
    assert record["params"]["frozen"] == n_frozen
    assert record["params"]["trainable"] == sum(p.numel() for p in init.parameters()) - n_frozen


def test_freeze_bn_stats_false_lets_frozen_bn_statistics_move(train_run, tmp_path):
    torch.manual_seed(0)
    init = torchvision.models.resnet18(num_classes=10)
    torch.save(init.state_dict(), tmp_path / "init.pt")
    _, w = _run_watched(train_run, "model=resnet18", f"model.weights_path={tmp_path}/init.pt",
                        "train.freeze=[backbone]", "train.freeze_bn_stats=false",
                        "data.train_size=64")
    assert torch.equal(w.final["layer1.0.conv1.weight"], init.state_dict()["layer1.0.conv1.weight"])
    assert not torch.equal(w.buffers["bn1.running_mean"], init.state_dict()["bn1.running_mean"])


def test_backbone_preset_trains_only_the_head():
    model = SmallNet()
    report = freeze(model, ["backbone"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert report.trainable_params == 588 * 10 + 10 and report.frozen_params == 3 * 3 * 25 + 3


def test_freeze_errors_name_the_pattern_and_the_choices():
    with pytest.raises(UserError, match=r"'layer9\.\*'.*start with: conv, fc"):
        freeze(SmallNet(), ["layer9.*"])
    with pytest.raises(UserError, match="nothing left to train"):
        freeze(SmallNet(), ["*"])


# ----------------------------------------------------------------- detach
def test_the_seeds_detach_case():
    """y = w1.detach()*2 + w2*3: w1 gets no gradient, w2 gets 3."""
    w1 = torch.ones(10, requires_grad=True)
    w2 = torch.ones(10, requires_grad=True)
    y = w1.detach() * 2 + w2 * 3
    y.sum().backward()
    assert w1.grad is None and torch.equal(w2.grad, torch.full((10,), 3.0))


@pytest.mark.parametrize("model_name, point, upstream", [
    ("smallnet", "pool", ("conv.",)),
    ("resnet18", "layer2", ("conv1.", "bn1.", "layer1.", "layer2.")),
])
def test_detach_stops_every_gradient_upstream(model_name, point, upstream, train_run, tmp_path):
    torch.manual_seed(0)
    init = SmallNet() if model_name == "smallnet" else torchvision.models.resnet18(num_classes=10)
    torch.save(init.state_dict(), tmp_path / "init.pt")
    record, w = _run_watched(train_run, f"model={model_name}", f"train.detach_at={point}",
                             f"model.weights_path={tmp_path}/init.pt", "data.train_size=96")
    start = init.state_dict()
    assert record["detach"]["upstream_names"] == sorted(n for n in start if n.startswith(upstream)
                                                        and n in dict(init.named_parameters()))
    for name, value in w.final.items():
        if name.startswith(upstream):
            assert w.grads[name] is None and torch.equal(value, start[name]), name
        else:
            assert w.grads[name] is not None and not torch.equal(value, start[name]), name


def test_detach_errors_list_the_modules_and_refuse_useless_points():
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(UserError, match=r"'layer9': no such module; modules are: conv, pool, fc"):
        detach_at(SmallNet(), "layer9", x)
    with pytest.raises(UserError, match="nothing left to train"):
        detach_at(SmallNet(), "fc", x)
    frozen = SmallNet()
    freeze(frozen, ["conv.*"])
    with pytest.raises(UserError, match="already frozen"):
        detach_at(frozen, "pool", x)


# ----------------------------------------------------------------- eval grad mode
def test_eval_context_builds_a_graph_only_when_enabled():
    model = SmallNet()
    x = torch.randn(2, 3, 32, 32)
    for mode in GRAD_MODES:
        with torch.no_grad():  # Lightning's validation context around the step
            with eval_context(mode):
                out = model(x)
        assert out.requires_grad == (mode == "enabled"), mode
        assert torch.is_inference(out) == (mode == "inference"), mode


@pytest.mark.parametrize("mode", ["inference", "no_grad", "enabled"])
def test_validation_outputs_follow_the_grad_mode_and_metrics_do_not(mode, train_run):
    record, w = _run_watched(train_run, f"eval.grad_mode={mode}", "seed=4")
    assert w.val_outputs and all(o.requires_grad == (mode == "enabled") for o in w.val_outputs)
    reference, _ = _run_watched(train_run, "eval.grad_mode=inference", "seed=4")
    assert record["final"]["val_loss"] == reference["final"]["val_loss"]
    assert record["final"]["val_acc"] == reference["final"]["val_acc"]
    assert record["val_seconds"] > 0
    assert (record["memory"]["val_saved_bytes"] > 0) == (mode == "enabled")


# ----------------------------------------------------------------- composition
def test_variants_compose_frozen_plus_no_zero_grad(train_run):
    record, w = _run_watched(train_run, "train.freeze=[conv.*]", "train.zero_grad=false",
                             "data.train_size=128")
    assert w.grads["conv.weight"] is None
    per_step = [_grads_at(SmallNet, s, b) for s, b in zip(w.before, w.batches, strict=True)]
    assert torch.allclose(w.grads["fc.weight"], sum(g["fc.weight"] for g in per_step), atol=1e-6)
    assert torch.equal(w.final["conv.weight"], w.before[0]["conv.weight"])
