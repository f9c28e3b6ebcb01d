"""The variants, each a small function over a model: freeze, detach, evaluation grad mode.

Zero-grad on/off is one `if` in the training step (module.py), exactly where the seed has it.
Each function here has an oracle test that fails if the variant silently does nothing.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from dataclasses import dataclass

import torch
import torch.nn as nn

from autograd_lab.errors import UserError

GRAD_MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
              "enabled": torch.enable_grad}


def eval_context(mode: str) -> contextlib.AbstractContextManager:
    """The grad mode validation runs under: the seed's no_grad, inference_mode, or a full graph."""
    return GRAD_MODES[mode]()


def head_prefix(model: nn.Module) -> str:
    """Name of the classifier head: the last Linear layer (fc for both models)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1]


def param_prefixes(model: nn.Module) -> list[str]:
    return sorted({name.split(".")[0] for name, _ in model.named_parameters()})


@dataclass
class FreezeReport:
    frozen: list[str]
    trainable_params: int
    frozen_params: int


def freeze(model: nn.Module, patterns) -> FreezeReport:
    """Set requires_grad=False on parameters whose names match any glob in `patterns`.

    `backbone` (alone) means every parameter outside the classifier head. A glob that matches
    nothing is an error: a typo must not silently train the whole network.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns or [])
    names = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == "backbone":
            head = head_prefix(model) + "."
            matched = [n for n in names if not n.startswith(head)]
        else:
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)
                       or fnmatch.fnmatchcase(n, pattern + ".*")]
        if not matched:
            raise UserError(f"train.freeze={pattern!r}: matches no parameter; parameter names "
                            f"start with: {', '.join(param_prefixes(model))} (or use backbone)")
        chosen.update(matched)
    for name, p in model.named_parameters():
        if name in chosen:
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    if patterns and trainable == 0:
        raise UserError(f"train.freeze={patterns}: freezes every parameter; nothing left to "
                        f"train (the head is {head_prefix(model)})")
    return FreezeReport(sorted(chosen), trainable, frozen)


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers whose affine parameters are all frozen."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                out.append(m)
    return out


def _reached(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Names of the trainable parameters that one forward/backward pass gives a gradient."""
    probe = copy.deepcopy(model).eval()  # eval: BatchNorm takes a batch of one, stats stay put
    for p in probe.parameters():
        p.grad = None
    probe(example).sum().backward()
    return {n for n, p in probe.named_parameters() if p.grad is not None}


@dataclass
class DetachReport:
    module: str
    upstream: list[str]       # trainable parameter names the detach cuts off from the loss
    upstream_params: int


def detach_at(model: nn.Module, name: str, example: torch.Tensor):
    """Detach the output of module `name` in every forward pass (the seed's `x.detach()`).

    Returns (hook handle, report). What is cut off is found by running autograd on a copy of
    the model with and without the detach, so skip connections and reused modules are counted
    right. Nothing cut off gets a gradient: those parameters keep `.grad is None` and do not move.
    """
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        top = [n for n, _ in model.named_children()]
        raise UserError(f"train.detach_at={name!r}: no such module; modules are: "
                        f"{', '.join(top)} (or dotted names inside them, e.g. {top[0]}.0)")
    before = _reached(model, example)
    handle = modules[name].register_forward_hook(lambda mod, inp, out: out.detach())
    try:
        after = _reached(model, example)
    except RuntimeError:  # nothing that needs a gradient is left in the graph
        after = set()
    cut = sorted(before - after)
    if not after:
        handle.remove()
        raise UserError(f"train.detach_at={name!r}: nothing trainable runs after it; nothing "
                        f"left to train")
    if not cut:
        handle.remove()
        raise UserError(f"train.detach_at={name!r}: everything upstream of it is already frozen "
                        f"by train.freeze (or has no parameters); the detach would change nothing")
    n_up = sum(model.get_parameter(n).numel() for n in cut)
    return handle, DetachReport(name, cut, n_up)
