"""Autograd checks that check themselves: the optimizer's update rule and the chain rule.

`step_check` is the seed's first cell made exact: one forward, backward and optimizer step, and
for every parameter the value the update rule predicts (plain SGD w - lr*g, SGD with momentum,
weight decay and Nesterov as PyTorch writes them, Adam) against the value the optimizer wrote.

`verify_chain_rule` is the seed's W, b, MSE cell generalised: each input's `.grad` against
J^T . upstream, with J from `torch.autograd.functional.jacobian`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def predicted_first_step(w: torch.Tensor, g: torch.Tensor, optim_cfg, lr: float) -> torch.Tensor:
    """The parameter after the optimizer's first step, from PyTorch's documented formulas."""
    wd = optim_cfg.get("weight_decay", 0.0)
    g = g + wd * w if wd else g
    if optim_cfg.name == "sgd":
        momentum = optim_cfg.get("momentum", 0.0)
        if momentum:  # first step: the momentum buffer is the gradient itself
            buf = g
            g = g + momentum * buf if optim_cfg.get("nesterov") else buf
        return w - lr * g
    if optim_cfg.name == "adam":
        beta1, beta2 = optim_cfg.betas
        eps = optim_cfg.get("eps", 1e-8)
        m_hat = (1 - beta1) * g / (1 - beta1)
        v_hat = (1 - beta2) * g * g / (1 - beta2)
        return w - lr * m_hat / (v_hat.sqrt() + eps)
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
               check_lr: float | None = None, tolerance: float = 1e-6) -> StepCheck:
    """One step of `optimizer` on `model`; compare every parameter with the predicted update.

    `targets` may be class indices or soft targets (probabilities), as in the seed's cell.
    `check_lr` gives the checker a different learning rate (to see it fail).
    """
    params = dict(model.named_parameters())
    weight = weight or [n for n in params if n.endswith("weight")][-1]
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer.zero_grad()
    loss = F.cross_entropy(model(inputs), targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    optimizer.step()
    lr = check_lr if check_lr is not None else optim_cfg.lr
    errors = {}
    for n, g in grads.items():
        predicted = predicted_first_step(before[n], g, optim_cfg, lr)
        errors[n] = float((params[n].detach() - predicted).abs().max())
    worst = max(errors, key=errors.get)
    idx = (0,) * params[weight].dim()
    return StepCheck(weight, float(before[weight][idx]), float(grads[weight][idx]),
                     float(params[weight].detach()[idx]),
                     float(predicted_first_step(before[weight], grads[weight], optim_cfg,
                                                lr)[idx]),
                     errors[worst], worst, errors, tolerance)


def verify_chain_rule(f, loss, inputs) -> list[float]:
    """Backpropagate loss(f(*inputs)) and compare each input's .grad with J^T . upstream.

    Returns the max abs error per input. J is d f / d input and upstream is d loss / d f(...),
    both from torch.autograd.functional.jacobian: the chain rule computed by hand.
    """
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    y = f(*inputs)
    loss(y).backward()
    upstream = torch.autograd.functional.jacobian(loss, y.detach())
    jacobians = torch.autograd.functional.jacobian(f, tuple(x.detach() for x in inputs))
    errors = []
    for x, jac in zip(inputs, jacobians, strict=True):
        expected = torch.tensordot(upstream, jac, dims=upstream.dim())
        errors.append(float((x.grad - expected).abs().max()))
    return errors
