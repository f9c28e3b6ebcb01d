"""Tests for autograd_lab.model.functions: oracles are torch built-ins and closed forms."""

import copy

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from autograd_lab.model.functions import (
    CustomReLU,
    CustomReLUFunction,
    QuadraticFunction,
    check_backward,
    custom_relu,
    quadratic,
)


# The seed notebook's buggy Functions, kept verbatim here (never in the library).
class SeedQuadraticFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return 3 * input**2 + 2 * input + 1

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        return grad_output * 6 * input + 2


class SeedCustomReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return input.clamp(min=0)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        grad_input = grad_output.clone()
        grad_input[input < 0] = 0
        grad_input[input >= 0] = 1
        return grad_input


def away_from_zero(n=8, seed=0):
    """float64 leaf with mixed signs and |x| in [0.1, 1]: no ReLU kink within eps."""
    g = torch.Generator().manual_seed(seed)
    mag = 0.1 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(n // 2 + 1)[:n]
    return (mag * sign).requires_grad_()


CORRECT = [QuadraticFunction.apply, CustomReLUFunction.apply]
SEED = [SeedQuadraticFunction.apply, SeedCustomReLUFunction.apply]


@pytest.mark.parametrize("fn", CORRECT, ids=["quadratic", "relu"])
def test_gradcheck_and_gradgradcheck(fn):
    x = away_from_zero()
    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    assert gradgradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_quadratic_matches_closed_form():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    y = quadratic(x)
    torch.testing.assert_close(y, 3 * x.detach() ** 2 + 2 * x.detach() + 1)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 6 * x.detach() + 2)
    x.grad = None
    upstream = torch.randn(10, dtype=torch.float64)
    quadratic(x).backward(upstream)
    torch.testing.assert_close(x.grad, upstream * (6 * x.detach() + 2))


def test_custom_relu_bitwise_matches_torch_relu():
    data = torch.randn(64)
    data[::5] = 0.0
    data[1::7] = -0.0
    ours, ref = data.clone().requires_grad_(), data.clone().requires_grad_()
    y_ours, y_ref = custom_relu(ours), torch.relu(ref)
    assert torch.equal(y_ours.view(torch.int32), y_ref.view(torch.int32))
    upstream = torch.randn(64)
    y_ours.backward(upstream)
    y_ref.backward(upstream)
    assert torch.equal(ours.grad.view(torch.int32), ref.grad.view(torch.int32))
    assert torch.all(ours.grad[data == 0] == 0)  # torch convention: gradient 0 at 0


def test_module_is_drop_in_for_nn_relu():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    ours = copy.deepcopy(ref)
    ours[1] = CustomReLU(inplace=True)
    x = torch.randn(32, 5)
    losses = [m(x).pow(2).mean() for m in (ref, ours)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=0)
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-6, rtol=0)
    assert repr(ours[1]) == "CustomReLU(inplace=True)"


@pytest.mark.parametrize("fn", SEED, ids=["seed_quadratic", "seed_relu"])
def test_seed_bugs_are_caught(fn):
    x = away_from_zero()
    assert gradcheck(fn, (x,), eps=1e-6, atol=1e-6, raise_exception=False) is False
    result = check_backward(fn, x)
    assert result.ok is False
    assert result.max_abs_error > 0.1
    assert result.message.startswith("backward is wrong (gradcheck fails")
    assert "chain rule" in result.message


@pytest.mark.parametrize("fn", CORRECT, ids=["quadratic", "relu"])
def test_check_backward_accepts_correct_functions(fn):
    x = away_from_zero()
    result = check_backward(fn, x)
    assert result.ok is gradcheck(fn, (x,), eps=1e-6, atol=1e-6, raise_exception=False)
    assert result.ok is True
    assert result.max_abs_error < 1e-6
    assert "agrees" in result.message
    assert result.diagnosis == "" and result.right_with_ones is None


def test_seed_quadratic_report_names_the_right_answer_and_the_escaped_term():
    x = away_from_zero(n=4)
    result = check_backward(SeedQuadraticFunction.apply, x)
    # Oracle: y_k = 3x_k^2 + 2x_k + 1, so dy_k/dx_j = 6x_j + 2 if j == k else 0; the seed's
    # backward hands back grad_output * 6x + 2: 2 too much on every entry it should leave at 0.
    (k,), (j,) = result.output_index, result.index
    right = 6 * float(x.detach()[j]) + 2 if j == k else 0.0
    assert result.expected == pytest.approx(right, abs=1e-6)
    assert result.got == pytest.approx(right + 2, abs=1e-6)
    assert result.max_abs_error == pytest.approx(2.0, abs=1e-6)
    assert f"at x[{j}] = {float(x.detach()[j]):.4g}, for output y[{k}]" in result.message
    assert f"dy[{k}]/dx[{j}] = {result.expected:.6g}" in result.message
    # all-ones grad_output: 1 * 6x + 2 == 1 * (6x + 2), so y.sum().backward() hides the bug
    x.grad = None
    SeedQuadraticFunction.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, 6 * x.detach() + 2)
    assert result.right_with_ones is True and "Hidden by all-ones" in result.message
    assert result.diagnosis.startswith("a term escapes the chain rule: with grad_output = 0 "
                                       "backward still returns 2 at x[0] instead of 0")


def test_seed_relu_report_says_it_ignores_grad_output():
    x = away_from_zero(n=6)
    result = check_backward(SeedCustomReLUFunction.apply, x)
    (k,), (j,) = result.output_index, result.index
    right = float(torch.autograd.functional.jacobian(torch.relu, x.detach())[k, j])
    assert result.expected == pytest.approx(right, abs=1e-6)
    assert result.got == 1.0 and right == 0.0  # 1 where torch's ReLU says 0
    # all-ones grad_output: "set to 1 where x >= 0" is exactly "pass 1 through"
    x.grad = None
    SeedCustomReLUFunction.apply(x).backward(torch.full_like(x, 3.0))
    assert torch.equal(x.grad, (x.detach() > 0).double())  # 1, not 3: grad_output dropped
    assert result.right_with_ones is True
    assert result.diagnosis.startswith("backward ignores grad_output")


class CubeWithWrongDerivative(torch.autograd.Function):
    """y = x^3 with backward grad_output * 2x: the chain rule is kept, the derivative is wrong."""

    @staticmethod
    def forward(ctx, input):
        ctx.save_for_backward(input)
        return input**3

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        return grad_output * 2 * input


def test_a_wrong_local_derivative_is_not_blamed_on_the_chain_rule():
    x = away_from_zero(n=4)
    result = check_backward(CubeWithWrongDerivative.apply, x)
    (k,), (j,) = result.output_index, result.index
    assert j == k  # only the diagonal is wrong
    assert result.expected == pytest.approx(3 * float(x.detach()[j]) ** 2, abs=1e-6)
    assert result.got == pytest.approx(2 * float(x.detach()[j]), abs=1e-12)
    assert result.right_with_ones is False and "Hidden by all-ones" not in result.message
    assert "local derivative it multiplies by is wrong" in result.diagnosis


def test_check_backward_names_the_input_among_several():
    x, w = away_from_zero(n=3), away_from_zero(n=3, seed=1)
    result = check_backward(lambda a, b: SeedQuadraticFunction.apply(a) * b, x, w)
    assert result.ok is False and result.input == 0
    assert f"input[0][{result.index[0]}]" in result.message


@pytest.mark.parametrize(
    "x",
    [torch.randn(3, requires_grad=True), torch.randn(3, dtype=torch.float64)],
    ids=["float32", "no_requires_grad"],
)
def test_check_backward_rejects_bad_inputs(x):
    with pytest.raises(ValueError, match="float64 with requires_grad=True"):
        check_backward(quadratic, x)
