"""The curvature of the training loss, the math only: one home for Hessian-vector products and
Lanczos, shared by sharpness (dynamics.py), the spectrum probe (spectrum.py) and the landscape's
eigenvector planes.

HessianBlock       the Hessian of the mean cross-entropy over some batches with respect to the
                   trainable parameters the loss reaches (frozen ones, and those a detach cuts
                   off, have no block), as the operator v -> Hv (double backward)
lanczos            Lanczos with full reorthogonalisation: the tridiagonal matrix T (and the
                   Krylov basis when Ritz vectors are wanted)
top_eigenpairs     the k largest eigenvalues and their Ritz vectors, per parameter
hutchinson_trace   tr(H) = E[z^T H z] over Rademacher z, for the whole block and, from the same
                   products, each parameter group's diagonal block (z_g^T (Hz)_g), with
                   standard errors
slq_density        the spectral density by stochastic Lanczos quadrature (Ghorbani et al.
                   2019; PyHessian's `density`): Ritz values as nodes, squared first components
                   of T's eigenvectors as weights, averaged over runs from random unit vectors,
                   then smoothed onto a grid with a Gaussian kernel

The model is evaluated through `torch.func.functional_call` with copies of its buffers, so
BatchNorm running statistics never move; gradients come from `torch.autograd.grad`, so `.grad`
is never touched; random draws come from the caller's generator only. A group is a parameter's
top-level module name (`conv`, `fc`, `layer1`, ...), as the probes group them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


# ------------------------------------------------------------------ helpers
def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer trains (frozen ones excluded)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def buffer_copies(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers: a train-mode BatchNorm updates these, never the model's own."""
    return {n: b.clone() for n, b in model.named_buffers()}


def mean_loss(model, buffers, x, y) -> torch.Tensor:
    """Cross-entropy of one batch, the model called with the given buffers."""
    return F.cross_entropy(functional_call(model, buffers, (x,), strict=False), y)


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def group_of(name: str) -> str:
    """A parameter's group: its top-level module (`layer1.0.conv1.weight` -> `layer1`)."""
    return name.split(".")[0]


# ------------------------------------------------------------------ the operator
class HessianBlock:
    """The Hessian of the mean cross-entropy over `batches` (weighted by their sizes, so the loss
    is the mean over all their examples; a train-mode BatchNorm normalises each batch by itself,
    as in training) with respect to the trainable parameters the loss reaches.

    `names`/`params`: the parameters of the block, in the model's order; `n`: its size;
    `groups`: the groups present, in order; `hvp(v)`: Hv for a flat v of length n. The double-
    backward graph lives as long as the object."""

    def __init__(self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        named = trainable(model)
        if not named:
            raise ValueError("no trainable parameter reaches the loss: no Hessian block")
        buffers = buffer_copies(model)
        total = sum(len(y) for _, y in batches)
        with torch.enable_grad():
            loss = sum(mean_loss(model, buffers, x, y) * (len(y) / total) for x, y in batches)
            grads = torch.autograd.grad(loss, list(named.values()), create_graph=True,
                                        allow_unused=True)
        live = [(n, p, g) for (n, p), g in zip(named.items(), grads, strict=True)
                if g is not None and g.requires_grad]  # a detach leaves None or a constant
        if not live:
            raise ValueError("no trainable parameter reaches the loss: no Hessian block")
        self.names = [n for n, _, _ in live]
        self.params = [p for _, p, _ in live]
        self._grads = [g for _, _, g in live]
        self.sizes = [p.numel() for p in self.params]
        self.n = sum(self.sizes)
        self.groups = list(dict.fromkeys(group_of(n) for n in self.names))
        index = torch.tensor([self.groups.index(group_of(n)) for n in self.names])
        # (params x groups) membership: per-parameter sums -> per-group sums in one matmul
        self.membership = torch.zeros(len(self.names), len(self.groups), dtype=torch.float64,
                                      device=self.params[0].device)
        self.membership[torch.arange(len(self.names)), index] = 1

    @property
    def like(self) -> torch.Tensor:
        return self.params[0]

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        vs = [c.view_as(p) for c, p in zip(v.split(self.sizes), self.params, strict=True)]
        with torch.enable_grad():
            hv = torch.autograd.grad(self._grads, self.params, grad_outputs=vs,
                                     retain_graph=True, allow_unused=True)
        return flat([torch.zeros_like(p) if h is None else h
                     for h, p in zip(hv, self.params, strict=True)]).detach()

    def per_group_dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(a_g . b_g for each group g), float64, from flat vectors: one matmul."""
        per_param = torch.stack([(x.double() * y.double()).sum() for x, y in
                                 zip(a.split(self.sizes), b.split(self.sizes), strict=True)])
        return per_param @ self.membership

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector as {parameter name: tensor shaped like that parameter}."""
        return {n: c.view_as(p).detach().clone() for n, c, p in
                zip(self.names, v.split(self.sizes), self.params, strict=True)}


# ------------------------------------------------------------------ Lanczos
def lanczos(hvp, n: int, iters: int, generator: torch.Generator, like: torch.Tensor,
            keep_basis: bool = False):
    """`min(iters, n)` steps of Lanczos with full reorthogonalisation on the symmetric operator
    v -> hvp(v), from a random unit start vector (normal draws from `generator`).

    Returns (T, basis): T the tridiagonal matrix (float64, m x m), basis the (m, n) orthonormal
    Krylov basis (rows) when keep_basis, else None (the whole basis is held during the run for
    the reorthogonalisation either way). T's eigenvalues (Ritz values) converge to the extreme
    eigenvalues far faster than power iteration, and equal the spectrum once m = n. No host
    sync until the caller reads T."""
    m = min(iters, n)
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(like)
    basis = torch.empty(m, n, dtype=like.dtype, device=like.device)  # filled row by row
    basis[0] = v / v.norm()
    alphas, betas = [], []
    for j in range(m):
        w = hvp(basis[j])
        alphas.append(w @ basis[j])
        q = basis[:j + 1]       # a view: no copy of the basis per step
        w = w - q.T @ (q @ w)   # Gram-Schmidt against the whole basis, twice for stability
        w = w - q.T @ (q @ w)
        if j + 1 < m:
            b = w.norm()
            betas.append(b)
            basis[j + 1] = w / b.clamp_min(1e-30)
    t = torch.diag(torch.stack(alphas).double())
    if betas:
        b = torch.stack(betas).double()
        t = t + torch.diag(b, 1) + torch.diag(b, -1)
    return t, (basis if keep_basis else None)


def lanczos_top_eigenvalue(hvp, n: int, iters: int, generator: torch.Generator,
                           like: torch.Tensor) -> torch.Tensor:
    """Largest (algebraic) eigenvalue of a symmetric n x n operator given as v -> Hv."""
    t, _ = lanczos(hvp, n, iters, generator, like)
    return torch.linalg.eigvalsh(t)[-1]


def lanczos_top_k(hvp, n: int, k: int, iters: int, generator: torch.Generator,
                  like: torch.Tensor, vectors: bool = False):
    """The k largest Ritz values (descending, float64) after `iters` Lanczos steps (at least k),
    and with `vectors` their Ritz vectors (k, n) in `like`'s dtype, unit norm."""
    t, basis = lanczos(hvp, n, max(iters, k), generator, like, keep_basis=vectors)
    values, s = torch.linalg.eigh(t)
    k = min(k, len(values))
    values, s = values.flip(0)[:k], s.flip(1)[:, :k]
    if not vectors:
        return values, None
    ritz = (s.T.to(basis.dtype) @ basis)  # (k, n)
    return values, ritz / ritz.norm(dim=1, keepdim=True).clamp_min(1e-30)


def top_eigenpairs(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], k: int,
                   iters: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The k largest eigenvalues of the training-loss Hessian over `batches` (HessianBlock:
    trainable parameters the loss reaches), descending (float64), and their unit Ritz vectors as
    [{parameter name: tensor shaped like that parameter}] (parameters outside the block are
    absent). `iters` Lanczos steps (raised to k if smaller; exact once >= the block size)."""
    block = HessianBlock(model, batches)
    values, ritz = lanczos_top_k(block.hvp, block.n, k, iters, generator, block.like,
                                 vectors=True)
    return values.detach(), [block.unflatten(r) for r in ritz]


# ------------------------------------------------------------------ trace
def rademacher(n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """n independent +-1 entries (from `generator`, on the CPU), in `like`'s dtype and device."""
    z = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8)
    return (z.to(like.device, like.dtype) * 2 - 1)


def hutchinson_trace(block: HessianBlock, samples: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hutchinson's estimator tr(A) = E[z^T A z] (z Rademacher) for the whole block and for each
    group's diagonal block H_gg, whose trace is E[z_g^T (Hz)_g]: one Hessian-vector product per
    sample serves every group. Returns (means, standard errors), float64 tensors of length
    len(block.groups) + 1 (the groups in block.groups' order, then the whole block); standard
    error = sample standard deviation / sqrt(samples) (NaN for one sample)."""
    per_sample = []
    for _ in range(samples):
        z = rademacher(block.n, generator, block.like)
        groups = block.per_group_dot(z, block.hvp(z))
        per_sample.append(torch.cat([groups, groups.sum().view(1)]))
    s = torch.stack(per_sample)  # (samples, groups + 1)
    se = s.std(0) / samples ** 0.5 if samples > 1 else torch.full_like(s[0], float("nan"))
    return s.mean(0), se


# ------------------------------------------------------------------ spectral density
def slq_nodes(block: HessianBlock, runs: int, iters: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stochastic Lanczos quadrature: `runs` Lanczos runs of `iters` steps from random unit
    vectors v. For each, T = S diag(theta) S^T; the quadrature sum_i S[0,i]^2 f(theta_i) equals
    v^T f(H) v for every polynomial f of degree < 2 iters, and E[v^T f(H) v] = tr f(H) / n. Returns
    (nodes, weights), float64, all runs concatenated, the weights divided by `runs` (they sum to
    1: a probability distribution approximating the eigenvalue distribution)."""
    nodes, weights = [], []
    for _ in range(runs):
        t, _ = lanczos(block.hvp, block.n, iters, generator, block.like)
        theta, s = torch.linalg.eigh(t)
        nodes.append(theta)
        weights.append(s[0] ** 2 / runs)
    return torch.cat(nodes), torch.cat(weights)


def density_grid(nodes: torch.Tensor, weights: torch.Tensor, bins: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quadrature smoothed onto a grid: a Gaussian of width sigma around each node, weighted.
    sigma = (largest - smallest node) / bins (1e-6 of the largest |node| or 1e-12 when all nodes
    coincide); `bins` equally spaced centres from smallest - 3 sigma to largest + 3 sigma.
    Returns (centres, mass per bin summing to 1, sigma): mass / bin width is the density of
    eigenvalues per unit; mass * n the expected number of eigenvalues in the bin."""
    lo, hi = nodes.min(), nodes.max()
    sigma = torch.maximum((hi - lo) / bins, (hi.abs().maximum(lo.abs()) * 1e-6).clamp_min(1e-12))
    centres = torch.linspace(0, 1, bins, dtype=torch.float64, device=nodes.device)
    centres = (lo - 3 * sigma) + centres * ((hi - lo) + 6 * sigma)
    kernel = torch.exp(-0.5 * ((centres[:, None] - nodes[None, :]) / sigma) ** 2)
    mass = kernel @ weights
    return centres, mass / mass.sum().clamp_min(1e-300), sigma


def slq_density(block: HessianBlock, runs: int, iters: int, bins: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    """slq_nodes and density_grid in one: {nodes, weights, centres, mass, sigma}."""
    nodes, weights = slq_nodes(block, runs, iters, generator)
    centres, mass, sigma = density_grid(nodes, weights, bins)
    return {"nodes": nodes, "weights": weights, "centres": centres, "mass": mass, "sigma": sigma}
