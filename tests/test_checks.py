"""Step check, chain-rule check and the backward-graph explorer, each against an oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import cli, in_process, make_cfg

from autograd_lab.model.module import build_optimizer
from autograd_lab.model.networks import SmallNet
from autograd_lab.model.variants import detach_at, freeze
from autograd_lab.observe.graph import saved_bytes_by_hooks, walk
from autograd_lab.observe.step_check import step_check, verify_chain_rule


@pytest.mark.parametrize("optim", [
    ("optim=sgd", "optim.momentum=0", "optim.lr=0.01"),
    ("optim=sgd", "optim.momentum=0.9", "optim.weight_decay=0.01", "optim.nesterov=true"),
    ("optim=adam", "optim.lr=0.003", "optim.weight_decay=0.001"),
])
def test_step_check_identity_holds_and_fails_on_a_wrong_learning_rate(optim):
    cfg = make_cfg(*optim).optim
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    model = SmallNet()
    result = step_check(model, build_optimizer(model.parameters(), cfg), cfg, x, y)
    assert result.ok and result.max_abs_error < 1e-6
    assert set(result.errors) == {n for n, _ in model.named_parameters()}
    if cfg.name == "sgd" and not cfg.momentum:  # the seed's print: w - lr * g
        assert result.updated == pytest.approx(result.initial - cfg.lr * result.grad, abs=1e-7)
    model = SmallNet()
    wrong = step_check(model, build_optimizer(model.parameters(), cfg), cfg, x, y,
                       check_lr=cfg.lr * 2)
    assert not wrong.ok and wrong.max_abs_error > 1e-5
    # the checker must also see the coefficients that only act from the second step on
    off = dict(momentum=0.5) if cfg.name == "sgd" else dict(betas=[0.5, 0.9])
    if cfg.name == "adam" or cfg.momentum:
        model = SmallNet()
        real = build_optimizer(model.parameters(), make_cfg(
            *optim, *[f"optim.{k}={v}".replace(" ", "") for k, v in off.items()]).optim)
        mismatch = step_check(model, real, cfg, x, y)
        assert not mismatch.ok, "a wrong momentum / betas went unnoticed"


def test_step_check_command(tmp_path, monkeypatch, capsys):
    """The real script once; the mismatch through its entry point in this process."""
    ok = cli("step-check", "model=smallnet", "--seed-batch", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "predicted by the update rule" in ok.stdout and ": OK" in ok.stdout
    bad = in_process(["step-check", "model=smallnet", "--check-lr", "0.02"], tmp_path,
                     monkeypatch, capsys)
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout


def test_verify_chain_rule_on_the_seeds_case_and_a_smallnet_layer():
    w = torch.tensor([[2.0, 4.0], [1.0, 0.0], [2.0, 0.5]])
    b = torch.tensor([1.0, 1.0, 1.0])
    x = torch.randn(2)
    y_t = torch.tensor([0.3, 0.4, 0.3])
    errors = verify_chain_rule(lambda w, b: x @ w.t() + b, lambda y: ((y - y_t) ** 2).mean(),
                               [w, b])
    assert len(errors) == 2 and max(errors) < 1e-6
    fc = SmallNet().fc
    feats, labels = torch.randn(4, 588), torch.randint(0, 10, (4,))
    errors = verify_chain_rule(lambda wt, bias: F.linear(feats, wt, bias),
                               lambda logits: F.cross_entropy(logits, labels),
                               [fc.weight, fc.bias])
    assert max(errors) < 1e-6
    # the seed's own identity, written out: b.grad == J_b^T . dL/dy
    bb = b.clone().requires_grad_(True)
    yy = x @ w.t() + bb
    ((yy - y_t) ** 2).mean().backward()
    assert torch.allclose(bb.grad, 2 * (yy.detach() - y_t) / 3)


def _graph_of(model, x, y):
    loss, backward = saved_bytes_by_hooks(lambda: F.cross_entropy(model(x), y))
    g = walk(loss, dict(model.named_parameters()))
    return g, backward()


@pytest.mark.parametrize("name", ["smallnet", "resnet18"])
def test_saved_tensor_total_matches_the_hooks_and_variants_save_less(name):
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    factory = SmallNet if name == "smallnet" else lambda: torchvision.models.resnet18(
        num_classes=10)
    cut = {"smallnet": ("pool", ["conv.*"]), "resnet18": ("layer3", ["backbone"])}[name]
    totals = {}
    for variant in ("none", "frozen", "detached"):
        torch.manual_seed(0)
        model = factory()
        if variant == "frozen":
            freeze(model, cut[1])
        if variant == "detached":
            detach_at(model, cut[0], torch.zeros(1, 3, 32, 32))
        g, hooked = _graph_of(model, x, y)
        assert g.saved_bytes == hooked > 0, variant
        totals[variant] = g.saved_bytes
        leaves = {n["param"] for n in g.nodes if n["param"]}
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert leaves <= trainable and "fc.weight" in leaves
    assert totals["frozen"] < totals["none"] and totals["detached"] < totals["none"]


def test_graph_names_leaves_and_lists_saved_tensors():
    torch.manual_seed(0)
    model = SmallNet("custom_relu")
    g, _ = _graph_of(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    names = [n["name"] for n in g.nodes]
    assert {"ConvolutionBackward0", "CustomReLUFunctionBackward", "AddmmBackward0",
            "NllLossBackward0"} <= set(names)
    assert {n["param"] for n in g.nodes if n["param"]} == {"conv.weight", "conv.bias",
                                                          "fc.weight", "fc.bias"}
    relu = next(n for n in g.nodes if n["name"] == "CustomReLUFunctionBackward")
    assert "saved_tensors[0]: (2, 3, 28, 28) float32 18816 B" in relu["saved"]
    assert len(g.edges) == len(g.nodes) - 1  # a tree for this net
    source = g.dot().source  # the labels a reader sees: bytes in the unit that fits
    assert "saves 18.4 KiB" in source  # 18,816 B kept for the custom ReLU
    small = [n["saved_bytes"] for n in g.nodes if 0 < n["saved_bytes"] < 1024]
    assert small and all(f"saves {b} B" in source for b in small)
    assert "0.0 KiB" not in source


def test_graph_command_writes_table_dot_and_image(tmp_path):
    out = cli("graph", "model=smallnet", "train.freeze=[conv.*]", "--out",
              str(tmp_path / "g" / "net"), "--format", "svg", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "agree" in out.stdout
    assert (tmp_path / "g" / "net.csv").is_file() and (tmp_path / "g" / "net.dot").is_file()
    import pandas as pd

    table = pd.read_parquet(tmp_path / "g" / "net.parquet")
    assert set(table[table.param.notna()].param) == {"fc.weight", "fc.bias"}  # conv is frozen
    import shutil

    if shutil.which("dot"):
        assert (tmp_path / "g" / "net.svg").read_text().lstrip().startswith("<?xml")
    else:
        assert "dot -Tsvg" in out.stdout
