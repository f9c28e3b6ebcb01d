"""Two training-dynamics quantities, the math only (probes.py decides when they run):

sharpness          the top eigenvalue of the training-loss Hessian (over the trainable
                   parameters), by Lanczos on Hessian-vector products. Gradient descent with
                   step size lr is stable on a quadratic only while sharpness < 2/lr (plain SGD);
                   Cohen et al. (ICLR 2021) found full-batch training rises to that limit and
                   hovers there ("edge of stability"). `stability_limit` is that threshold for the
                   optimizer as configured.
grad noise scale   B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018): the batch size at which
                   the gradient's noise and its signal are about equal; training gains little from
                   batches much larger than it. Estimated from per-example gradients (torch.func)
                   or, for any model (BatchNorm included), from gradient norms at two batch sizes.

Everything here evaluates the model through `torch.func.functional_call` with copies of its
buffers, so BatchNorm running statistics never move, and takes gradients with
`torch.autograd.grad`, so `.grad` is never touched; the Hessian-vector products and Lanczos live
in curvature.py. Random draws come from the caller's
generator only. `plot_stability` draws the stability study's figure from a sweep's frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from autograd_lab.observe.curvature import (
    HessianBlock,
    buffer_copies,
    flat,
    lanczos_top_eigenvalue,
    mean_loss,
    trainable,
)


# ------------------------------------------------------------------ helpers
def has_train_batchnorm(model: nn.Module) -> bool:
    """A BatchNorm in train mode mixes the examples of a batch: no per-example gradient."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


# ------------------------------------------------------------------ sharpness
def sharpness(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
              iters: int = 20, generator: torch.Generator | None = None) -> torch.Tensor:
    """Top eigenvalue of the Hessian of the mean cross-entropy over `batches` (weighted by their
    sizes, so the loss is the mean over all their examples; a train-mode BatchNorm normalises
    each batch by itself, as in training), with respect to the trainable parameters the loss
    reaches (frozen ones, and those a detach cuts off, have no Hessian block): Lanczos on the
    Hessian-vector products of curvature.py."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    block = HessianBlock(model, batches)
    return lanczos_top_eigenvalue(block.hvp, block.n, iters, generator, like=block.like).detach()


def stability_limit(optimizer: torch.optim.Optimizer) -> float | None:
    """The largest sharpness at which the optimizer is stable on a quadratic, at its current
    learning rate: 2/lr for plain SGD, (2+2b)/lr with heavy-ball momentum b (PyTorch's SGD),
    (2+2b)/((1+2b) lr) with Nesterov; weight decay wd adds wd to the curvature the optimizer
    sees, so the limit on the loss's own sharpness is that minus wd. None for optimizers whose
    threshold is not about the raw Hessian (Adam: its limit concerns the preconditioned one)."""
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    group = optimizer.param_groups[0]
    lr, beta, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
    if group.get("nesterov"):
        return (2 + 2 * beta) / ((1 + 2 * beta) * lr) - wd
    return (2 + 2 * beta) / lr - wd


# ------------------------------------------------------------------ gradient noise scale
def per_example_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tr(Sigma), |G|^2) from the per-example gradients g_i of a batch of B draws:
    tr(Sigma) ~ sum |g_i - mean g|^2 / (B - 1) and |G|^2 ~ |mean g|^2 - tr(Sigma)/B, both
    unbiased. Per-example gradients by torch.func (vmap over grad), `chunk` examples at a time
    so memory stays bounded for large models (default: about 2**27 gradient numbers at once)."""
    named = {n: p.detach() for n, p in trainable(model).items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = buffer_copies(model)

    def one(params, xi, yi):
        out = functional_call(model, {**params, **frozen, **buffers}, (xi[None],))
        return F.cross_entropy(out, yi[None])

    per_example = vmap(grad(one), in_dims=(None, 0, 0))
    numel = sum(p.numel() for p in named.values())
    chunk = chunk or max(1, 2**27 // max(numel, 1))
    total = sum_sq = None
    with torch.enable_grad():
        for lo in range(0, len(y), chunk):
            g = per_example(named, x[lo:lo + chunk], y[lo:lo + chunk])
            flat = torch.cat([t.reshape(t.shape[0], -1) for t in g.values()], 1).double()
            part, part_sq = flat.sum(0), (flat * flat).sum()
            total = part if total is None else total + part
            sum_sq = part_sq if sum_sq is None else sum_sq + part_sq
    b = len(y)
    mean_sq = (total / b).square().sum()
    trace = (sum_sq - b * mean_sq) / (b - 1)
    return trace.float(), (mean_sq - trace / b).float()


def two_batch_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    small: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tr(Sigma), |G|^2) by McCandlish et al.'s unbiased estimators (Appendix A) from gradient
    norms at two batch sizes: the batch of B = k * small draws is cut into k batches of `small`;
    |G_small|^2 is the mean of their squared gradient norms, G_big the mean of their gradients.
        |G|^2    ~ (B |G_big|^2 - small |G_small|^2) / (B - small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/small - 1/B)
    Works for any model: a train-mode BatchNorm normalises each small batch by itself, as in
    training with batch size `small`."""
    params = list(trainable(model).values())
    buffers = buffer_copies(model)
    k = len(y) // small
    if k < 2:
        raise ValueError(f"two_batch needs at least two batches of {small}; got {len(y)} draws")
    total, small_sq = None, None
    with torch.enable_grad():
        for j in range(k):
            sl = slice(j * small, (j + 1) * small)
            gs = torch.autograd.grad(mean_loss(model, buffers, x[sl], y[sl]), params,
                                     allow_unused=True)
            g = flat([torch.zeros_like(p) if t is None else t
                       for t, p in zip(gs, params, strict=True)]).double()
            total = g if total is None else total + g
            sq = g @ g
            small_sq = sq if small_sq is None else small_sq + sq
    big = k * small
    small_sq = small_sq / k
    big_sq = (total / k).square().sum()
    grad_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1 / small - 1 / big)
    return trace.float(), grad_sq.float()


def noise_scale(trace: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """B_simple = tr(Sigma)/|G|^2; NaN where the |G|^2 estimate is not positive (the noise
    swamps the signal in this draw: average the two parts over calls before dividing)."""
    return torch.where(grad_sq > 0, trace / grad_sq.clamp_min(1e-30),
                       torch.full_like(trace, float("nan")))
