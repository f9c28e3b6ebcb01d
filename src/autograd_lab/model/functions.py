"""Hand-written autograd Functions with correct backward passes, plus a checker.

The seed notebook shipped two broken backward passes:

* ``QuadraticFunction`` returned ``grad_output * 6 * input + 2``: the ``+ 2`` escapes
  the chain rule, so every upstream gradient picks up a constant offset.
* ``CustomReLUFunction`` set the gradient to ``1`` where ``input >= 0`` instead of
  passing ``grad_output`` through.

Both bugs go unnoticed when the upstream gradient is all ones (``y.sum().backward()``):
multiplying by 1 changes nothing. ``check_backward`` compares the full Jacobian with finite
differences and says in words where backward is wrong, what the right answer was, whether
all-ones grad_output hides it, and the likely cause (it hands backward grad_output = 0, which
must give 0, and grad_output doubled, which must double the result).
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
    max_abs_error: float  # max |backward - finite differences| over all Jacobian entries
    message: str  # what is wrong, where, what the right answer was and the likely cause
    input: int = 0  # the worst entry: which input,
    index: tuple = ()  # its position in that input,
    output_index: tuple = ()  # which output element,
    expected: float = 0.0  # the right derivative there (finite differences)
    got: float = 0.0  # and what backward gave
    right_with_ones: bool | None = None  # backward is right when grad_output is all ones
    diagnosis: str = ""  # the likely cause in one sentence ("" when backward is right)


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


def _backward_with(fn, inputs, grad_output: torch.Tensor) -> list[torch.Tensor]:
    """What fn's backward returns for each input when handed `grad_output` (zeros for an input
    it returns no gradient for)."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_output.reshape(out.shape), allow_unused=True)
    return [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(leaves, grads,
                                                                              strict=True)]


def _position(x: torch.Tensor, flat: int) -> tuple:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)) \
        if x.dim() else ()


def _at(name: str, pos: tuple) -> str:
    return f"{name}[{', '.join(map(str, pos))}]" if pos else name


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool(torch.allclose(a, b, atol=atol, rtol=rtol))


def check_backward(fn, *inputs, atol: float = 1e-6, rtol: float = 1e-3) -> BackwardCheck:
    """Compare fn's backward with finite differences and explain any mismatch in words.

    gradcheck gives the verdict. When backward is wrong, the message says at which input entry
    and output entry the worst disagreement is, what the right derivative was (finite
    differences: nudge the input, watch the output), what backward gave, whether backward is
    right when grad_output is all ones (what `y.sum().backward()` passes, which hides most
    chain-rule bugs) and the likely cause, found by handing backward grad_output = 0 and
    grad_output doubled: the chain rule says the result must be 0 and doubled.
    """
    if not inputs:
        raise ValueError("check_backward needs at least one input tensor")
    for i, x in enumerate(inputs):
        if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64 and x.requires_grad):
            got = f"{x.dtype}, requires_grad={x.requires_grad}" if torch.is_tensor(x) else type(x)
            raise ValueError(f"input[{i}] must be float64 with requires_grad=True (finite "
                             f"differences need float64's precision), got {got}")
    out = fn(*inputs)
    out_numel = out.numel()
    # jacobian() drives fn's own (custom) backward, one grad_output row at a time.
    analytic = torch.autograd.functional.jacobian(fn, inputs)
    analytic = analytic if isinstance(analytic, tuple) else (analytic,)
    numerical = [_numerical_jacobian(fn, inputs, i, eps=1e-6) for i in range(len(inputs))]
    worst = (-1.0, 0, 0, 0, 0.0, 0.0)  # (error, input, in index, out index, a, n)
    for i, x in enumerate(inputs):
        a = analytic[i].reshape(out_numel, x.numel())
        n = numerical[i]
        diff = (a - n).abs()
        k, j = divmod(int(diff.argmax()), x.numel())
        if diff[k, j] > worst[0]:
            worst = (float(diff[k, j]), i, j, k, float(a[k, j]), float(n[k, j]))
    err, i, j, k, a_val, n_val = worst
    ok = torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=atol, rtol=rtol, raise_exception=False)
    pos, out_pos = _position(inputs[i], j), _position(out, k)
    fields = dict(input=i, index=pos, output_index=out_pos, expected=n_val, got=a_val)
    if ok:
        return BackwardCheck(True, err, f"backward agrees with finite differences (max error "
                             f"{err:.3g}); gradcheck ok", **fields)
    if err <= atol + rtol * abs(n_val):
        # gradcheck also checks things the Jacobian can't show (e.g. undefined grads).
        return BackwardCheck(False, err, f"gradcheck failed although the Jacobian matches finite "
                             f"differences (max error {err:.3g}); rerun gradcheck with "
                             f"raise_exception=True for its reason", **fields)

    # What the chain rule says backward must return for a grad_output v: J^T v.
    def right_answer(v):
        return [(numerical[m].T @ v.reshape(-1)).reshape(x.shape) for m, x in enumerate(inputs)]

    def agrees(v):
        got = _backward_with(fn, inputs, v)
        return all(_close(g, r, atol * 10, rtol) for g, r in zip(got, right_answer(v),
                                                                 strict=True))

    ones = torch.ones_like(out)
    right_with_ones = agrees(ones)
    with_ones = _backward_with(fn, inputs, ones)
    with_twos = _backward_with(fn, inputs, 2 * ones)
    with_zeros = _backward_with(fn, inputs, torch.zeros_like(out))
    name = "x" if len(inputs) == 1 else f"input[{i}]"
    where = _at(name, pos)
    value = float(inputs[i].detach().reshape(-1)[j])
    out_name = _at("y", out_pos)
    lines = [f"backward is wrong (gradcheck fails; max error {err:.3g}).",
             f"  Where: at {where} = {value:.4g}, for output {out_name}.",
             f"  Right answer: d{out_name}/d{where} = {n_val:.6g} (finite differences: nudge "
             f"{where} by ±1e-6 and watch {out_name}"
             + (f"; {out_name} does not depend on {where} at all" if abs(n_val) < atol else "")
             + ").",
             f"  backward gave: {a_val:.6g}."]
    zero_at = [(m, int(g.abs().argmax())) for m, g in enumerate(with_zeros)
               if float(g.abs().max()) > atol]
    if all(_close(b, a, atol, rtol) for a, b in zip(with_ones, with_twos, strict=True)) and \
            any(float(a.abs().max()) > atol for a in with_ones):
        diagnosis = ("backward ignores grad_output: doubling grad_output leaves its result "
                     "unchanged, so it sets the gradient itself instead of multiplying "
                     "grad_output by the local derivative (chain rule)")
    elif zero_at:
        m, flat = zero_at[0]
        at = _at("x" if len(inputs) == 1 else f"input[{m}]", _position(inputs[m], flat))
        diagnosis = (f"a term escapes the chain rule: with grad_output = 0 backward still returns "
                     f"{float(with_zeros[m].reshape(-1)[flat]):.6g} at {at} instead of 0, so "
                     f"something is added after multiplying by grad_output (write "
                     f"grad_output * (whole local derivative))")
    else:
        diagnosis = ("backward scales with grad_output but the local derivative it multiplies "
                     "by is wrong (check its formula against the math; chain rule: "
                     "grad_input = grad_output * d output / d input)")
    if right_with_ones:
        lines.append("  Hidden by all-ones: with grad_output all ones (what y.sum().backward() "
                     "passes) backward gives the right gradient, because multiplying by 1 "
                     "changes nothing; inside a network grad_output is never all ones, so test "
                     "with another grad_output (gradcheck does).")
    lines.append(f"  Likely cause: {diagnosis}.")
    return BackwardCheck(False, err, "\n".join(lines), right_with_ones=right_with_ones,
                         diagnosis=diagnosis, **fields)
