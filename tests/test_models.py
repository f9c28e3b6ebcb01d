"""The two models: the seed's Net exactly, and torchvision's ResNet18 with its options."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import make_cfg

from autograd_lab.errors import UserError
from autograd_lab.model.functions import CustomReLU
from autograd_lab.model.networks import SmallNet, build_model


class SeedNet(nn.Module):
    """The seed notebook's Net, copied as the oracle."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(588, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        x = torch.flatten(x, 1)
        return self.fc(x)


def test_smallnet_is_the_seeds_net():
    torch.manual_seed(0)
    seed = SeedNet()
    torch.manual_seed(0)
    ours = SmallNet()
    assert [n for n, _ in ours.named_children()] == ["conv", "pool", "fc"]
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in seed.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), seed.parameters(), strict=True))
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(ours(x), seed(x))


def test_resnet18_options():
    model = build_model(make_cfg("model=resnet18", "model.num_classes=7").model)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 7
    assert model.conv1.kernel_size == (7, 7) and isinstance(model.maxpool, nn.MaxPool2d)
    cifar = build_model(make_cfg("model=resnet18", "model.stem=cifar").model)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    custom = build_model(make_cfg("model=resnet18", "model.activation=custom_relu").model)
    assert not any(isinstance(m, nn.ReLU) for m in custom.modules())
    assert sum(isinstance(m, CustomReLU) for m in custom.modules()) == \
        sum(isinstance(m, nn.ReLU) for m in model.modules())


def test_pretrained_weights_come_through_torchvisions_weights_api(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    filename = weights.url.rsplit("/", 1)[-1]
    cfg = make_cfg("model=resnet18", "model.weights=IMAGENET1K_V1").model
    with pytest.raises(UserError) as err:
        build_model(cfg)
    assert filename in str(err.value) and str(tmp_path / "hub" / "checkpoints") in str(err.value)

    torch.manual_seed(3)
    stand_in = torchvision.models.resnet18()  # the file's contents are what the API must load
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(stand_in.state_dict(), tmp_path / "hub" / "checkpoints" / filename)
    model = build_model(cfg)
    assert torch.equal(model.layer1[0].conv1.weight, stand_in.layer1[0].conv1.weight)
    assert model.fc.out_features == 10  # head replaced for CIFAR-10's classes


def test_weights_path_loads_a_state_dict_and_rejects_wrong_shapes(tmp_path):
    torch.manual_seed(5)
    source = SmallNet()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(make_cfg(f"model.weights_path={tmp_path / 'w.pt'}").model)
    assert torch.equal(model.fc.weight, source.fc.weight)

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not fit this model"):
        build_model(make_cfg(f"model.weights_path={tmp_path / 'other.pt'}").model)
    bad = source.state_dict()
    bad["fc.weight"] = torch.zeros(5, 588)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"fc.weight: file \(5, 588\), model \(10, 588\)"):
        build_model(make_cfg(f"model.weights_path={tmp_path / 'bad.pt'}").model)
    with pytest.raises(UserError, match="no such file"):
        build_model(make_cfg(f"model.weights_path={tmp_path / 'missing.pt'}").model)


@pytest.mark.parametrize("name, stem", [("smallnet", None), ("resnet18", "imagenet"),
                                        ("resnet18", "cifar")])
def test_declared_module_and_parameter_names_are_the_real_ones(name, stem):
    """conf/model/*.yaml declares the names train.freeze and train.detach_at are checked
    against before torch is imported: they must be the built model's own."""
    from autograd_lab.config.compose import compose
    from autograd_lab.model.networks import build_model

    cfg = compose([f"model={name}", *([f"model.stem={stem}"] if stem else [])]).model
    model = build_model(cfg)
    assert list(cfg.module_names) == [n for n, _ in model.named_modules() if n]
    assert list(cfg.parameter_names) == [n for n, _ in model.named_parameters()]


def test_declared_weights_files_are_torchvisions():
    from torchvision.models import ResNet18_Weights

    from autograd_lab.config.compose import compose

    files = compose(["model=resnet18"]).model.weights_files
    for name, file in files.items():
        weights = ResNet18_Weights.DEFAULT if name == "DEFAULT" else ResNet18_Weights[name]
        assert weights.url.rsplit("/", 1)[-1] == file
