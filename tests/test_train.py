"""The harness against oracles: a plain PyTorch loop, a second run, TensorBoard's own reader."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import losses

from autograd_lab.data.loader import load_split_tensors
from autograd_lab.model.networks import SmallNet


def _plain_loop(model, x, y, batch_size, lr=0.001, momentum=0.9):
    """The seed's train() body written out: zero_grad, forward, CrossEntropyLoss, backward, step."""
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = []
    for i in range(0, len(x), batch_size):
        inputs = (x[i:i + batch_size].float() / 255 - 0.5) / 0.5
        labels = y[i:i + batch_size]
        optimizer.zero_grad()
        loss = criterion(model(inputs), labels)
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


@pytest.mark.parametrize("model_name", ["smallnet", "resnet18"])
def test_per_step_losses_equal_a_plain_pytorch_loop(model_name, train_run, cfg_factory, tmp_path):
    torch.manual_seed(1234)
    if model_name == "smallnet":
        reference = SmallNet()
    else:
        reference = torchvision.models.resnet18(num_classes=10)
    weights = tmp_path / "init.pt"
    torch.save(reference.state_dict(), weights)
    size = 512 if model_name == "smallnet" else 192

    record, run_dir = train_run(f"model={model_name}", "data.shuffle=false",
                                f"data.train_size={size}", f"model.weights_path={weights}")
    assert record["status"] == "completed"
    harness = losses(run_dir)

    data = load_split_tensors(cfg_factory(f"data.train_size={size}").data)
    reference.load_state_dict(torch.load(weights, weights_only=True))
    reference.train()
    expected = _plain_loop(reference, data["train_x"], data["train_y"], 32)
    assert len(harness) == len(expected) == math.ceil(size / 32)
    assert max(abs(a - b) for a, b in zip(harness, expected, strict=True)) < 1e-6


def test_same_config_and_seed_give_identical_curves(train_run):
    args = ("seed=7", "data.augment=flip_crop", "trainer.max_epochs=2")
    (_, first), (_, second) = train_run(*args), train_run(*args)
    assert losses(first) == losses(second)
    (_, other_seed) = train_run("seed=8", "data.augment=flip_crop", "trainer.max_epochs=2")
    assert losses(other_seed) != losses(first)


def test_epochs_use_different_orders_from_the_seed(train_run):
    """Lightning calls sampler.set_epoch: epoch 1 must not replay epoch 0's batches."""
    import lightning as L

    class Labels(L.Callback):
        seen: dict = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.setdefault(trainer.current_epoch, []).append(batch[1].clone())

    cb = Labels()
    train_run("trainer.max_epochs=2", callbacks=[cb])
    first, second = torch.cat(cb.seen[0]), torch.cat(cb.seen[1])
    assert sorted(first.tolist()) == sorted(second.tolist())  # the same examples
    assert not torch.equal(first, second)                     # in a different order


def test_tensorboard_has_every_step_and_the_final_metrics_in_hparams(train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    record, run_dir = train_run("trainer.max_epochs=2")
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    expected = losses(run_dir)
    assert [e.step for e in events] == list(range(len(expected))) == list(range(32))
    pairs = zip(events, expected, strict=True)
    assert all(abs(e.value - v) <= 1e-6 * max(1, abs(v)) for e, v in pairs)
    val = acc.Scalars("val/acc")
    assert [e.step for e in val] == [16, 32]
    assert val[-1].value == pytest.approx(record["final"]["val_acc"], abs=1e-6)

    content = acc.PluginTagToContent("hparams")
    session = None
    for blob in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(blob)
        if data.HasField("session_start_info"):
            session = data.session_start_info
        if data.HasField("experiment"):
            metric_tags = {m.name.tag for m in data.experiment.metric_infos}
    # called from Python (no command line): the run is named by its config groups alone
    assert session.hparams["model"].string_value == "smallnet"
    assert session.hparams["optim"].string_value == "sgd"
    assert "optim.lr" not in session.hparams
    # HParams shows a metric's last value: the curves' own tags give the final ones
    assert {"train/loss", "val/loss", "val/acc", "whole_run/best_train_loss"} <= metric_tags
    best = acc.Scalars("whole_run/best_train_loss")[-1].value
    assert best == pytest.approx(record["final"]["best_train_loss"], rel=1e-6)
    assert best == pytest.approx(min(expected), rel=1e-6)  # not a placeholder
    assert acc.Scalars("whole_run/steps")[-1].value == 32
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("final/")]


def test_run_json_records_what_happened(train_run):
    record, run_dir = train_run()
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["error"] is None
    assert on_disk["final"]["steps"] == 16
    assert on_disk["final"]["train_loss"] == pytest.approx(losses(run_dir)[-1])
    assert on_disk["final"]["best_train_loss"] == pytest.approx(min(losses(run_dir)))
    assert on_disk["images_per_s"] > 0 and on_disk["wall_seconds"] > 0
    assert on_disk["process_peak_rss_mib"] > 50  # process-wide, named so
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["config"]["optim"]["lr"] == 0.001
    assert on_disk["params"] == {"trainable": 6118, "frozen": 0, "frozen_names": []}


def test_synthetic_data_is_learnable_well_above_chance(train_run):
    record, _ = train_run("data.train_size=10000", "data.test_size=1000", "trainer.max_epochs=2")
    assert record["final"]["val_acc"] > 0.5  # chance is 0.1


def test_a_non_finite_loss_stops_the_run_as_diverged(train_run):
    record, run_dir = train_run("optim.lr=1e8", "log.flush_every_s=0.001",
                                "data.train_size=4096", "trainer.max_epochs=3")
    assert record["status"] == "diverged"
    curve = losses(run_dir)
    assert all(math.isfinite(v) for v in curve)
    assert record["final"]["steps"] == len(curve) < 3 * 128
    assert f"step {len(curve)}" in record["error"]
    frame = __import__("pandas").read_parquet(run_dir / "metrics.parquet")
    assert frame.step.max() < len(curve)  # nothing past the divergence, validation included
    assert not frame.name.str.startswith("val/").any()
    json.loads((run_dir / "run.json").read_text(),
                parse_constant=lambda c: pytest.fail(f"{c} in run.json"))


def test_adam_and_resnet_cifar_stem_train(train_run):
    record, run_dir = train_run("model=resnet18", "model.stem=cifar", "optim=adam",
                                "data.train_size=64", "data.test_size=64")
    assert record["status"] == "completed"
    assert record["params"]["trainable"] == sum(
        p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters()
    ) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert len(losses(run_dir)) == 2


def test_custom_relu_gives_the_relu_curve(train_run, monkeypatch):
    from autograd_lab.model.functions import CustomReLUFunction

    calls = []
    original = CustomReLUFunction.backward
    monkeypatch.setattr(CustomReLUFunction, "backward",
                        staticmethod(lambda ctx, g: calls.append(1) or original(ctx, g)))
    _, relu = train_run("model.activation=relu")
    assert not calls
    _, custom = train_run("model.activation=custom_relu")
    assert len(calls) == 16  # the hand-written backward ran at every step
    assert max(abs(a - b) for a, b in zip(losses(relu), losses(custom), strict=True)) < 1e-6


def test_normalisation_matches_the_seeds_transforms(cfg_factory):
    from torchvision import transforms

    from autograd_lab.data.loader import normalize

    x = load_split_tensors(cfg_factory().data)["train_x"][:8]
    seed_tf = transforms.Compose([transforms.ToTensor(),
                                  transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    expected = torch.stack([seed_tf(img.permute(1, 2, 0).numpy()) for img in x])
    assert torch.allclose(normalize(x), expected, atol=1e-6)
    assert not torch.equal(F.relu(normalize(x)), normalize(x))  # values below zero exist
