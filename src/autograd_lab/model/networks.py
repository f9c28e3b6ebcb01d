"""The two networks of the seed: its small CIFAR-10 Net, and torchvision's ResNet18."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from autograd_lab.config.targets import arguments
from autograd_lab.disk.files import load_tensor_file
from autograd_lab.errors import UserError
from autograd_lab.model.functions import CustomReLU, custom_relu

ACTIVATIONS = {"relu": F.relu, "custom_relu": custom_relu}


class SmallNet(nn.Module):
    """The seed's `Net`: Conv2d(3,3,5) -> ReLU -> MaxPool2d(2,2) -> flatten -> Linear(588,10).

    The activation is a plain function, not a module, exactly as in the seed (F.relu), so the
    module names stay `conv, pool, fc`. `custom_relu` swaps in the project's autograd Function.
    """

    def __init__(self, activation: str = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(588, 10)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x):
        x = self.pool(self.activation(self.conv(x)))
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, stem: str = "imagenet", weights: str | None = None,
             activation: str = "relu") -> nn.Module:
    """torchvision's resnet18; `stem=cifar` uses a 3x3 stride-1 first conv and no max-pool.

    Pretrained weights come through torchvision's weights API (1000 classes); the classifier head
    is then replaced when `num_classes` differs, and the first conv when the stem is `cifar`.
    """
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as tv_resnet18

    if weights is None:
        model = tv_resnet18(weights=None, num_classes=num_classes)
    else:
        w = ResNet18_Weights[weights] if weights != "DEFAULT" else ResNet18_Weights.DEFAULT
        model = tv_resnet18(weights=_offline_checked(w))
        if num_classes != model.fc.out_features:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if activation == "custom_relu":
        for _name, module in list(model.named_modules()):
            for child_name, child in module.named_children():
                if isinstance(child, nn.ReLU):
                    setattr(module, child_name, CustomReLU(inplace=child.inplace))
    return model


def _offline_checked(weights):
    """Fail with one line naming the file and folder when the weights are not cached offline."""
    from torch.hub import get_dir

    folder = Path(get_dir()) / "checkpoints"
    filename = weights.url.rsplit("/", 1)[-1]
    if not (folder / filename).is_file():
        try:  # the network may be reachable: let torchvision download it as usual
            from urllib.request import urlopen

            urlopen(weights.url, timeout=5).close()
        except Exception:
            raise UserError(f"model.weights={weights.name}: {filename} is not in {folder} and "
                            f"cannot be downloaded here; download {weights.url} and put it "
                            f"in that folder (or set TORCH_HOME)") from None
    return weights


def build_model(cfg) -> nn.Module:
    """The `model` node made by Hydra's instantiate (its `_target_`: SmallNet, resnet18, or any
    torch Module class check_targets lets through), with the harness's own keys left out
    (config.targets.OWN_KEYS: the name, the declared names, weights_path, which is loaded here)."""
    try:
        model = instantiate(arguments(cfg, "model"), _convert_="all")
    except InstantiationException as e:  # Hydra wraps what the builder raised
        if isinstance(e.__cause__, UserError):  # a one-line problem (weights not cached)
            raise e.__cause__ from None
        raise
    if cfg.get("weights_path"):
        load_weights(model, Path(cfg.weights_path).expanduser())
    return model


# Compiled entries dynamo may keep per function (its forward) in one process. Its default, 8, is
# spent by 3 or 4 differing jobs of one sweep process (each job adds 2 or 3: the first step under
# the graph view's TorchFunctionMode, the training steps, validation's grad mode; a freeze, a
# precision, a memory format, a batch size each add theirs), and past it dynamo runs the network
# EAGERLY without an error while run.json says compiled: true (measured, torch 2.14).
RECOMPILE_LIMIT = 64


def prepare_network(model: nn.Module, cfg) -> nn.Module:
    """model.channels_last: the weights in torch.channels_last (the batches follow in
    Classifier); model.compile: nn.Module.compile(), in place, so parameter and state_dict names
    (freeze globs, checkpoints) stay those of the eager network. Keys a node lacks are off.

    Compiled once per process, reused by the next jobs of a sweep: dynamo keeps its compiled
    code on the forward's code object, guarded on the parameters' shapes, dtypes, strides and
    requires_grad, not on which instance they belong to (torch 2.14 inlines built-in nn modules
    and passes parameters as graph inputs), so a new network of the same class and shapes runs
    the code the previous job compiled (tests/test_precision.py counts dynamo's frames)."""
    if cfg.get("channels_last", False):
        model.to(memory_format=torch.channels_last)
    if cfg.get("compile", False):
        import torch._dynamo.config as dynamo_config  # private module: its documented knob

        # RECOMPILE_LIMIT above says why; tests/test_precision.py fails if torch renames it
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        model.compile()
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a local state_dict (tensors only: weights_only=True), with one-line errors."""
    if not path.is_file():
        raise UserError(f"model.weights_path={path}: no such file")

    state = load_tensor_file(path, f"model.weights_path={path}", hint="give a state_dict file")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensor(s) of the wrong shape, e.g. {k}: file "
                         f"{tuple(state[k].shape)}, model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}"
                         f"{'...' if len(unexpected) > 3 else ''}")
        raise UserError(f"model.weights_path={path}: does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state)
