"""Autograd checks that check themselves: the optimizer's update rule and the chain rule.

`step_check` is the seed's first cell made exact: forward, backward and optimizer steps, and
for every parameter the value the update rule predicts (plain SGD w - lr*g, SGD with momentum,
weight decay and Nesterov as PyTorch writes them, Adam) against the value the optimizer wrote.

`verify_chain_rule` is the seed's W, b, MSE cell generalised: each input's `.grad` against
J^T . upstream, with J from `torch.autograd.functional.jacobian`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def predicted(w: torch.Tensor, grads: list[torch.Tensor], optim_cfg, lr: float) -> torch.Tensor:
    """The parameter after len(grads) optimizer steps, from PyTorch's documented formulas.

    Two steps are needed to see momentum and Adam's betas: after one, SGD with momentum is
    w - lr*g and Adam is w - lr*g/(|g| + eps) whatever their coefficients.
    """
    wd = optim_cfg.get("weight_decay", 0.0)
    if optim_cfg.name == "sgd":
        momentum, buf = optim_cfg.get("momentum", 0.0), None
        for g in grads:
            d = g + wd * w if wd else g
            if momentum:
                buf = d if buf is None else momentum * buf + d      # dampening 0
                d = d + momentum * buf if optim_cfg.get("nesterov") else buf
            w = w - lr * d
        return w
    if optim_cfg.name == "adam":
        beta1, beta2 = optim_cfg.betas
        eps = optim_cfg.get("eps", 1e-8)
        m = v = torch.zeros_like(w)
        for t, g in enumerate(grads, start=1):
            g = g + wd * w if wd else g
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
            w = w - (lr / bias1) * m / (v.sqrt() / bias2 ** 0.5 + eps)
        return w
    raise ValueError(f"optim.name={optim_cfg.name!r}")


@dataclass
class StepCheck:
    weight: str
    initial: float
    grad: float
    updated: float
    predicted: float
    max_abs_error: float              # over every parameter
    worst: str                        # the parameter with the largest error
    errors: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance


def step_check(model, optimizer, optim_cfg, inputs, targets, weight: str | None = None,
               check_lr: float | None = None, tolerance: float = 1e-6,
               steps: int = 2) -> StepCheck:
    """`steps` steps of `optimizer` on `model` (same batch); every parameter against the rule.

    `targets` may be class indices or soft targets (probabilities), as in the seed's cell.
    `check_lr` gives the checker a different learning rate (to see it fail). The printed
    weight's values are those of the first step, as in the seed.
    """
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    grads: dict[str, list[torch.Tensor]] = {}
    after_first = {}
    for step in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        for n, p in params.items():
            if p.grad is not None:
                grads.setdefault(n, []).append(p.grad.detach().clone())
        optimizer.step()
        if step == 0:
            after_first = {n: p.detach().clone() for n, p in params.items()}
    weight = weight or [n for n in grads if n.endswith("weight")][-1]
    lr = check_lr if check_lr is not None else optim_cfg.lr
    errors = {n: float((params[n].detach() - predicted(before[n], gs, optim_cfg, lr)).abs().max())
              for n, gs in grads.items()}
    worst = max(errors, key=errors.get)
    idx = (0,) * params[weight].dim()
    first = predicted(before[weight], grads[weight][:1], optim_cfg, lr)
    return StepCheck(weight, float(before[weight][idx]), float(grads[weight][0][idx]),
                     float(after_first[weight][idx]), float(first[idx]),
                     errors[worst], worst, errors, tolerance)


def verify_chain_rule(f, loss, inputs) -> list[float]:
    """Backpropagate loss(f(*inputs)) and compare each input's .grad with J^T . upstream.

    Returns the max abs error per input. J is d f / d input and upstream is d loss / d f(...),
    both from torch.autograd.functional.jacobian: the chain rule computed by hand.
    """
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    y = f(*inputs)
    loss(y).backward()
    # full Jacobians, then the chain rule by hand (tensordot): a check of how backward composes
    # the local derivatives, not of each op's own derivative formula (gradcheck does that)
    upstream = torch.autograd.functional.jacobian(loss, y.detach())
    jacobians = torch.autograd.functional.jacobian(f, tuple(x.detach() for x in inputs))
    errors = []
    for x, jac in zip(inputs, jacobians, strict=True):
        expected = torch.tensordot(upstream, jac, dims=upstream.dim())
        errors.append(float((x.grad - expected).abs().max()))
    return errors
