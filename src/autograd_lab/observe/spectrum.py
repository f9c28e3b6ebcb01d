"""The spectrum probe's row and its TensorBoard histogram (probes.py decides when it runs; the
math is curvature.py's).

One call takes the Hessian block of the training loss on the probe set once and from it:

  probes/hessian_trace/<group>, /all      Hutchinson's trace of each group's diagonal block and of
                                          the whole block (the same Rademacher products)
  probes/hessian_trace_se/<group>, /all   their standard errors (sample std / sqrt(samples))
  probes/hessian_top/<i>                  the i-th largest eigenvalue (i = 1..k), Lanczos
  probes/hessian_density/center/<b>       the spectral density by stochastic Lanczos quadrature,
  probes/hessian_density/weight/<b>       smoothed onto `bins` grid points b = 0..bins-1: the
                                          centre and the share of the eigenvalues (weights sum
                                          to 1) of each bin
  probes/hessian_density/size             n, the number of eigenvalues (parameters in the block)

The density rows go to metrics.parquet only (the recorder's `parquet_only` prefixes); TensorBoard
gets them as one histogram per probed step (`probes/hessian_density`), bucket counts = the
expected number of eigenvalues in each bin.
"""

from __future__ import annotations

import torch

from autograd_lab.observe.curvature import (
    HessianBlock,
    hutchinson_trace,
    lanczos_top_k,
    slq_density,
)

DENSITY = "probes/hessian_density/"
HISTOGRAM = "probes/hessian_density"


def spectrum_row(model, batches, top_k: int, top_iters: int, samples: int, runs: int,
                 iters: int, bins: int, generator: torch.Generator
                 ) -> tuple[list[str], torch.Tensor]:
    """(names, values) of one spectrum probe call: a float64 device tensor, no host sync."""
    block = HessianBlock(model, batches)
    trace, se = hutchinson_trace(block, samples, generator)
    top, _ = lanczos_top_k(block.hvp, block.n, top_k, top_iters, generator, block.like)
    density = slq_density(block, runs, iters, bins, generator)
    groups = [*block.groups, "all"]
    names = ([f"probes/hessian_trace/{g}" for g in groups]
             + [f"probes/hessian_trace_se/{g}" for g in groups]
             + [f"probes/hessian_top/{i + 1}" for i in range(len(top))]
             + [f"{DENSITY}size"]
             + [f"{DENSITY}center/{b}" for b in range(bins)]
             + [f"{DENSITY}weight/{b}" for b in range(bins)])
    device = trace.device
    row = torch.cat([trace, se, top.to(device),
                     torch.tensor([float(block.n)], dtype=torch.float64, device=device),
                     density["centres"].to(device), density["mass"].to(device)])
    return names, row


def is_spectrum(names: list[str]) -> bool:
    return f"{DENSITY}size" in names


def write_density(writer, step: int, values: dict[str, float]) -> None:
    """The density of one probed step as a TensorBoard histogram: buckets at the grid's bins,
    counts = n x weight (the expected number of eigenvalues in the bin), so num = n, sum ~ tr(H)
    and sum_squares ~ tr(H^2) (of the smoothed density)."""
    n = values[f"{DENSITY}size"]
    bins = sum(1 for k in values if k.startswith(f"{DENSITY}center/"))
    centres = torch.tensor([values[f"{DENSITY}center/{b}"] for b in range(bins)],
                           dtype=torch.float64)
    counts = torch.tensor([values[f"{DENSITY}weight/{b}"] for b in range(bins)],
                          dtype=torch.float64) * n
    half = float(centres[1] - centres[0]) / 2 if bins > 1 else 0.5
    writer.add_histogram_raw(
        HISTOGRAM, min=float(centres[0]) - half, max=float(centres[-1]) + half, num=n,
        sum=float(counts @ centres), sum_squares=float(counts @ centres.square()),
        bucket_limits=(centres + half).tolist(), bucket_counts=counts.tolist(),
        global_step=step)
