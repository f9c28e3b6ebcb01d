"""The sweep's Hessian-spectrum figure: how the spectral density (the spectrum probe's
stochastic-Lanczos-quadrature density, metrics.parquet rows probes/hessian_density/...) moves
over training, one panel per group of runs, a few probed steps per panel."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from autograd_lab.errors import clip
from autograd_lab.sweep.figures import pyplot
from autograd_lab.sweep.tables import data_name, group_label, study_of
from autograd_lab.text import as_typed

DENSITY = "probes/hessian_density/"
MAX_PANELS = 9   # groups drawn (the first ones in sorted order); the title says how many more
MAX_STEPS = 4    # probed steps drawn per panel: the first, the last and evenly between
GRID = 400       # points of the common eigenvalue axis a group's runs are averaged on


def density_frames(curves: pd.DataFrame) -> pd.DataFrame:
    """The density rows as one row per (run, step, bin): centre, weight (share of the
    eigenvalues in the bin) and width (the grid's spacing)."""
    rows = curves[curves.name.astype(str).str.startswith(DENSITY)]
    if rows.empty:
        return pd.DataFrame(columns=["run", "step", "bin", "centre", "weight", "width"])
    parts = rows.name.astype(str).str.slice(len(DENSITY)).str.split("/", expand=True)
    rows = rows.assign(kind=parts[0].values, bin=pd.to_numeric(parts[1], errors="coerce").values)
    rows = rows[rows.kind.isin(["center", "weight"])]
    wide = rows.pivot_table(index=["run", "step", "bin"], columns="kind", values="value",
                            observed=True).reset_index().dropna()
    wide = wide.rename(columns={"center": "centre"}).sort_values(["run", "step", "bin"])
    wide["width"] = wide.groupby(["run", "step"]).centre.transform(
        lambda c: (c.max() - c.min()) / max(len(c) - 1, 1))
    return wide[["run", "step", "bin", "centre", "weight", "width"]]


def _steps(available: list[int]) -> list[int]:
    if len(available) <= MAX_STEPS:
        return available
    picks = np.linspace(0, len(available) - 1, MAX_STEPS).round().astype(int)
    return [available[i] for i in dict.fromkeys(picks)]


def _mean_density(frame: pd.DataFrame, grid: np.ndarray) -> np.ndarray:
    """The runs' densities (share per unit eigenvalue) on `grid`, averaged; 0 outside a run's
    range."""
    out = []
    for _, one in frame.groupby("run", observed=True):
        width = float(one.width.iloc[0]) or 1.0
        out.append(np.interp(grid, one.centre.values, one.weight.values / width, left=0,
                             right=0))
    return np.mean(out, axis=0)


def _limit(curves: pd.DataFrame, run_ids) -> float | None:
    """The runs' stability limit (probes/stability_limit, e.g. 2/lr), their median's last value;
    None when the runs have none (no sharpness probe, or Adam)."""
    rows = curves[(curves.name.astype(str) == "probes/stability_limit")
                  & curves.run.astype(str).isin({str(r) for r in run_ids})]
    if rows.empty:
        return None
    last = rows.sort_values("step").groupby("run", observed=True).value.last()
    return float(last.median())


def figure_spectrum(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str]):
    """The Hessian's spectral density at a few probed steps (colour: early to late), one panel
    per group of runs (the `by` keys' values; seeds pooled: the density averaged over them on a
    common eigenvalue axis), with the runs' stability limit (2/lr for plain SGD) as a dashed
    line where the sharpness probe logged one. The density axis is logarithmic where the
    outliers need it (the bulk near 0 holds almost all eigenvalues, the few large ones a tiny
    share). `runs`, `curves`: the frames of sweep.runs.load_runs / load_curves. A Figure, or
    None when no run has density rows."""
    dens = density_frames(curves)
    if dens.empty:
        return None
    plt = pyplot()
    keys = [k for k in by if k != "seed" and k in runs]
    runs = runs[runs.run.astype(str).isin(set(dens.run.astype(str)))]
    labels = {}
    for _, run in runs.iterrows():
        labels[str(run.run)] = tuple(as_typed(run[k]) for k in keys)
    dens = dens.assign(group=dens.run.astype(str).map(labels)).dropna(subset=["group"])
    groups = sorted(set(labels.values()))
    shown = groups[:MAX_PANELS]
    study = study_of(runs).iloc[0] if len(runs) else "runs"
    cols = min(3, len(shown))
    nrows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows + 0.6),
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    seeds = 1
    for ax, group in zip(axes.flat, shown, strict=False):
        mine = dens[dens.group == group]
        steps = _steps(sorted(int(s) for s in mine.step.unique()))
        lo, hi = mine.centre.min(), mine.centre.max()
        grid = np.linspace(lo, hi, GRID)
        peak, floor = 0.0, math.inf
        for i, step in enumerate(steps):
            at = mine[mine.step == step]
            seeds = max(seeds, at.run.nunique())
            y = _mean_density(at, grid)
            colour = cmap(i / max(len(steps) - 1, 1) * 0.9)
            ax.plot(grid, y, lw=1.2, color=colour, label=f"step {step}")
            peak = max(peak, float(y.max()))
            positive = y[y > 0]
            floor = min(floor, float(positive.min())) if positive.size else floor
        if peak > 0 and floor < peak * 1e-3:  # the outliers' share is orders below the bulk's
            ax.set_yscale("log")
            ax.set_ylim(peak * 1e-7, peak * 3)
        limit = _limit(curves, mine.run.unique())
        if limit is not None:  # where the top eigenvalue stops gradient descent being stable
            ax.axvline(limit, ls="--", lw=1, color="0.4", label=f"stability limit {limit:.3g}")
        kv = dict(zip(keys, group, strict=True))
        ax.set_title(clip(group_label(study, kv), 60), fontsize=9)
        ax.set_xlabel("Hessian eigenvalue")
        ax.set_ylabel("eigenvalue density (fraction per unit)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    more = f"; first {len(shown)} of {len(groups)} groups" if len(groups) > len(shown) else ""
    pooled = f", mean over {seeds} seeds" if seeds > 1 else ""
    fig.suptitle(f"{study} on {data_name(runs)}: Hessian spectral density over training "
                 f"(stochastic Lanczos quadrature{pooled}{more})", fontsize=10)
    fig.tight_layout()
    return fig
