"""Hand-written autograd Functions with correct backward passes, plus a checker.

The seed notebook shipped two broken backward passes:

* ``QuadraticFunction`` returned ``grad_output * 6 * input + 2``: the ``+ 2`` escapes
  the chain rule, so every upstream gradient picks up a constant offset.
* ``CustomReLUFunction`` set the gradient to ``1`` where ``input >= 0`` instead of
  passing ``grad_output`` through.

Both bugs go unnoticed when the upstream gradient is all ones (``y.sum().backward()``),
which is why ``check_backward`` compares full Jacobians against finite differences and
says *where* they disagree instead of just returning ``False``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class QuadraticFunction(torch.autograd.Function):
    """y = 3x^2 + 2x + 1, so dy/dx = 6x + 2."""

    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return 3 * input**2 + 2 * input + 1

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        # Chain rule: upstream gradient times the *whole* local derivative.
        # Plain differentiable torch ops on saved tensors => double backward works.
        return grad_output * (6 * input + 2)


class CustomReLUFunction(torch.autograd.Function):
    """ReLU whose gradient matches ``torch.relu`` bit for bit (0 at input == 0)."""

    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return input.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        # Pass grad_output through where input > 0, like torch's threshold_backward.
        # masked_fill (not `* mask`) writes exact +0.0 even for NaN/negative upstream,
        # and stays differentiable in grad_output, so gradgradcheck passes.
        return grad_output.masked_fill(input <= 0, 0)


def quadratic(x: torch.Tensor) -> torch.Tensor:
    return QuadraticFunction.apply(x)


def custom_relu(x: torch.Tensor) -> torch.Tensor:
    return CustomReLUFunction.apply(x)


class CustomReLU(nn.Module):
    """Drop-in for ``nn.ReLU``; ``inplace`` is accepted for compatibility but ignored."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return custom_relu(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


@dataclass(frozen=True)
class BackwardCheck:
    ok: bool  # torch.autograd.gradcheck's verdict
    max_abs_error: float  # max |analytic - numerical| over all Jacobian entries
    message: str


def _numerical_jacobian(fn, inputs, i: int, eps: float) -> torch.Tensor:
    """Central differences d fn / d inputs[i], shaped (out.numel(), inputs[i].numel())."""
    base = [x.detach() for x in inputs]
    cols = []
    with torch.no_grad():
        for j in range(base[i].numel()):
            outs = []
            for step in (eps, -eps):
                args = list(base)
                args[i] = base[i].clone()
                args[i].view(-1)[j] += step
                outs.append(fn(*args).reshape(-1))
            cols.append((outs[0] - outs[1]) / (2 * eps))
    return torch.stack(cols, dim=1)


def check_backward(fn, *inputs, atol: float = 1e-6, rtol: float = 1e-3) -> BackwardCheck:
    """Compare fn's backward with finite differences and explain any mismatch."""
    if not inputs:
        raise ValueError("check_backward needs at least one input tensor")
    for i, x in enumerate(inputs):
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64 and x.requires_grad):
            got = f"{x.dtype}, requires_grad={x.requires_grad}" if torch.is_tensor(x) else type(x)
            raise ValueError(f"input[{i}] must be float64 with requires_grad=True, got {got}")
    out_numel = fn(*inputs).numel()
    # jacobian() drives fn's own (custom) backward, one grad_output row at a time.
    analytic = torch.autograd.functional.jacobian(fn, inputs)
    worst = (-1.0, 0, 0, 0, 0.0, 0.0)  # (error, input, in index, out index, a, n)
    for i, x in enumerate(inputs):
        a = analytic[i].reshape(out_numel, x.numel())
        n = _numerical_jacobian(fn, inputs, i, eps=1e-6)
        diff = (a - n).abs()
        k, j = divmod(int(diff.argmax()), x.numel())
        if diff[k, j] > worst[0]:
            worst = (float(diff[k, j]), i, j, k, float(a[k, j]), float(n[k, j]))
    err, i, j, k, a_val, n_val = worst
    ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=atol, rtol=rtol, raise_exception=False)
    if ok:
        message = f"backward agrees with finite differences (max error {err:.3g}); gradcheck ok"
    elif err <= atol + rtol * abs(n_val):
        # gradcheck also checks things the Jacobian can't show (e.g. undefined grads).
        message = (
            f"gradcheck failed although the Jacobian matches finite differences (max error "
            f"{err:.3g}); rerun gradcheck with raise_exception=True for its reason"
        )
    else:
        message = (
            f"backward disagrees with finite differences: max |analytic - numerical| = "
            f"{err:.6g} at input[{i}] index {j}, output index {k} (analytic {a_val:.6g}, "
            f"numerical {n_val:.6g}); check that backward multiplies grad_output by the "
            f"local derivative (chain rule); gradcheck failed"
        )
    return BackwardCheck(ok=ok, max_abs_error=err, message=message)
