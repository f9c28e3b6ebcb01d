"""The sweep's figures (matplotlib, headless): loss curves per group with seed bands, cost bars,
and the stability study's sharpness against 2/lr."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from autograd_lab.disk.files import atomic_write_bytes
from autograd_lab.errors import clip
from autograd_lab.sweep.tables import (
    COST,
    data_name,
    group_label,
    key_values_text,
)
from autograd_lab.text import as_typed


# ------------------------------------------------------------------ the study's figure
def plot_stability(runs, curves, out_dir) -> Path:
    """figure_stability as out_dir/stability_sharpness.png. Returns the PNG."""
    import io

    import matplotlib.pyplot as plt


    out = Path(out_dir)
    fig = figure_stability(runs, curves)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "stability_sharpness.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def figure_stability(runs, curves):
    """Sharpness over the steps, one curve per run (labelled by its learning rate), with each
    run's stability limit as a dashed line in the same colour; log y when the values span
    decades. `runs`, `curves`: the frames of sweep.runs.load_runs / load_curves. A Figure."""

    plt = pyplot()

    sharp = curves[curves.name == "probes/sharpness"]
    limit = curves[curves.name == "probes/stability_limit"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lr_col = "optim.lr" if "optim.lr" in runs else None
    order = runs.sort_values(lr_col) if lr_col else runs
    values = []
    for _, run in order.iterrows():
        s = sharp[sharp.run == run.run].sort_values("step")
        if s.empty:
            continue
        label = f"lr={run[lr_col]:g}" if lr_col else str(run.run)
        others = [k for k in runs.attrs.get("swept", []) if k not in ("optim.lr",) and k in run
                  and runs[k].astype(str).nunique() > 1]  # what differs within these runs
        if others:
            label += " (" + ", ".join(f"{k}={run[k]}" for k in others) + ")"
        line, = ax.plot(s.step, s.value, lw=1.2, label=f"{label}: sharpness")
        values += s.value[s.value > 0].tolist()
        lim = limit[limit.run == run.run].sort_values("step")
        if not lim.empty:
            ax.plot(lim.step, lim.value, ls="--", lw=1, color=line.get_color(),
                    label=f"{label}: stability limit")
            values += lim.value[lim.value > 0].tolist()
    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="top Hessian eigenvalue",
           title="Sharpness against the stability limit (dashed: 2/lr, (2+2β)/lr with momentum)")

    if 0 < len(ax.get_legend_handles_labels()[0]) <= MAX_LEGEND:  # a screenful at most
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def pyplot():
    """matplotlib.pyplot, on the file-only Agg backend unless pyplot is already in use (a
    notebook's inline backend stays: its figures show in the notebook)."""
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# A figure stays readable at any sweep size: at most MAX_LEGEND named lines (a screenful of
# legend); past that, a numeric swept key (a learning rate) is drawn as a colour scale, with the
# last value of each line against it as an x-axis beside. At most MAX_BARS bars a cost panel;
# past that, the same key is the x-axis.
MAX_LEGEND = 12

MAX_BARS = 40

STYLES = ("-", "--", ":", "-.")  # the other keys' few values, when a colour scale draws one


def _numeric_key(runs: pd.DataFrame, keys: list[str]) -> str | None:
    """Of the swept keys, the numeric one (numbers, not true/false) with the most values, which a
    figure of many groups draws as a colour scale or an x-axis; None when there is none."""
    best, most = None, 1
    for key in keys:
        values = runs[key].dropna()
        if len(values) and values.map(lambda v: isinstance(v, (int, float))
                                      and not isinstance(v, bool)).all():
            if values.nunique() > most:
                best, most = key, values.nunique()
    return best


def _scale(values):
    """A colour normalisation for `values`: log when they are positive and span two decades."""
    from matplotlib.colors import LogNorm, Normalize

    low, high = float(min(values)), float(max(values))
    if low > 0 and high >= 100 * low:
        return LogNorm(low, high)
    return Normalize(low, high if high > low else low + 1)


def group_curves(runs: pd.DataFrame, curves: pd.DataFrame, keys: list[str], metric: str) -> dict:
    """Per step, each group's mean, min, max and count over its runs for `metric`: {stat: frame
    indexed by step, one column a group, in sorted order; "keys": {column: the tuple of the
    group's keys' values}}. One pivot for all runs, one groupby for all groups."""
    rows = curves[curves.name == metric]
    if rows.empty or runs.empty:
        return {}
    texts = [runs[k].map(as_typed).tolist() for k in keys]
    tuples = list(zip(*texts, strict=True)) if keys else [()] * len(runs)
    ids = ["\x1f".join(t) for t in tuples]  # one plain label a group for pandas
    group_of = pd.Series(ids, index=runs.run.astype(str).values)
    key_of = dict(zip(ids, tuples, strict=True))
    wide = rows.pivot_table(index="step", columns="run", values="value", observed=True)
    wide.columns = wide.columns.astype(str)
    wide = wide.loc[:, wide.columns.isin(group_of.index)]
    if wide.empty:
        return {}
    grouped = wide.T.groupby(group_of.reindex(wide.columns).values, sort=True)
    return {"mean": grouped.mean().T, "min": grouped.min().T, "max": grouped.max().T,
            "n": grouped.count().T, "keys": key_of}


def figure_curves(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str], study: str,
                  metric: str = "train/loss"):
    """The study's `metric` per step, one line per group (mean over its seeds) with a min-max
    band; a log axis when the curves span more than a decade. Up to MAX_LEGEND groups each line
    is named in the legend; past that, a numeric swept key colours the lines (colour bar) and a
    second panel draws each group's last value against it, so a 3,000-value learning-rate
    sweep reads as one figure of normal size. Returns a matplotlib Figure."""
    plt = pyplot()

    keys = [k for k in by if k != "seed"]
    stats = group_curves(runs, curves, keys, metric)
    mean = stats.get("mean", pd.DataFrame())
    n_lines = mean.shape[1]
    seeds = int(stats["n"].max().max()) if n_lines else 0
    values = pd.concat([stats["min"], stats["max"]]) if n_lines else pd.DataFrame()
    positive = values[values > 0].min().min() if n_lines else float("nan")
    log = bool(n_lines and values.max().max() > 10 * positive)
    band = f"mean over {seeds} seeds, band min-max" if seeds > 1 else "one run per line"
    title = f"{study} on {data_name(runs)}: {metric} per step ({band})"
    if n_lines > MAX_LEGEND:  # too many lines for bands: each line is its group's mean
        return _figure_many_curves(runs, keys, stats, metric,
                                   title.replace(", band min-max", ""), log)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in mean.columns:
        line_data = mean[key].dropna()
        line, = ax.plot(line_data.index, line_data.values, lw=1.0,
                        marker="." if len(line_data) < 10 else None,  # a few points: show each
                        label=clip(group_label(study, dict(zip(keys, stats["keys"][key],
                                                          strict=True))), 80))
        if stats["n"][key].max() > 1:
            ax.fill_between(line_data.index, stats["min"][key].dropna(),
                            stats["max"][key].dropna(), color=line.get_color(), alpha=0.2,
                            lw=0)
    if log:
        ax.set_yscale("log")  # a run that blows up would flatten every other curve
    ax.set(xlabel="optimizer step", ylabel=metric.replace("/", " "), title=title)
    if n_lines > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    elif n_lines:
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def _figure_many_curves(runs, keys: list[str], stats: dict, metric: str, title: str,
                        log: bool):
    """figure_curves past MAX_LEGEND groups: lines coloured by the numeric swept key (colour
    bar), the other keys' values as line styles when they are few; beside it, each group's
    last value against that key. Without a numeric key: thin grey lines, and summary.md has
    the groups' numbers."""
    import numpy as np
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm

    plt = pyplot()
    mean = stats["mean"]
    colour_key = _numeric_key(runs, keys)
    fig, axes = plt.subplots(1, 2 if colour_key else 1, figsize=(13 if colour_key else 8, 4.5),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2]}
                             if colour_key else None)
    ax = axes[0][0]
    segments, groups = [], []
    for key in mean.columns:
        line = mean[key].dropna()
        if len(line):
            segments.append(np.column_stack([line.index.to_numpy(float), line.to_numpy()]))
            groups.append(stats["keys"][key])
    others = [k for k in keys if k != colour_key]
    families = sorted({tuple(g[keys.index(k)] for k in others) for g in groups})
    styled = colour_key is not None and 1 < len(families) <= len(STYLES)
    if colour_key is None:
        ax.add_collection(LineCollection(segments, colors="0.3", linewidths=0.6, alpha=0.3))
        ax.set_title(f"{title}\n{len(groups):,} groups, too many to name: their numbers are in "
                     f"summary.md", fontsize=9)
    else:
        index = keys.index(colour_key)
        value = np.array([float(g[index]) for g in groups])
        norm, cmap = _scale(value), plt.get_cmap("viridis")
        family = [tuple(g[keys.index(k)] for k in others) for g in groups]
        ax.add_collection(LineCollection(
            segments, colors=cmap(norm(value)), linewidths=0.8, alpha=0.8,
            linestyles=[STYLES[families.index(f)] for f in family] if styled else "solid"))
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=colour_key, pad=0.01)
        if styled:  # the other keys: a legend of line styles, one entry a value
            from matplotlib.lines import Line2D

            ax.legend([Line2D([], [], color="k", ls=STYLES[i]) for i in range(len(families))],
                      [clip(key_values_text(dict(zip(others, f, strict=True))), 60)
                       for f in families],
                      fontsize=8)
        ax.set_title(f"{title}\n{len(groups):,} groups, colour: {colour_key}"
                     + ("" if styled or len(families) < 2 else
                        f" (the other keys' {len(families)} values share each colour)"),
                     fontsize=9)
        last = np.array([seg[-1, 1] for seg in segments])
        side = axes[0][1]
        side.scatter(value, last, c=cmap(norm(value)), s=8)
        if isinstance(norm, LogNorm):
            side.set_xscale("log")
        if log and (last > 0).all():
            side.set_yscale("log")
        side.set(xlabel=colour_key, ylabel=f"last {metric} (group mean)",
                 title=f"last {metric} against {colour_key}")
    ax.autoscale()
    if log:
        ax.set_yscale("log")  # a run that blows up would flatten every other curve
    ax.set(xlabel="optimizer step", ylabel=metric.replace("/", " "))
    fig.tight_layout()
    return fig


def figure_cost(runs: pd.DataFrame, by: list[str], study: str):
    """The per-job time and memory figures side by side, a bar per group (mean over seeds, the
    seeds as dots), or None when there is nothing to compare. Past MAX_BARS groups, each panel
    draws the runs against the numeric swept key instead (or, without one, the spread of the
    groups' means). These belong to each job, whatever ran before it in the process; peak RSS
    does not, so it is never plotted."""
    plt = pyplot()

    from matplotlib.colors import LogNorm

    done = runs[runs.status == "completed"]
    panels = [(c, h, k) for c, h, k in COST if c != "images_per_s" and c in done
              and not c.startswith("profiler.")
              and done[c].notna().any() and (done[c].fillna(0) != 0).any()]
    keys = [k for k in by if k != "seed"]
    if not panels or not keys or len(done) < 2:
        return None
    labels = pd.Series([key_values_text(dict(zip(keys, r, strict=True))) for r in
                        zip(*[done[k] for k in keys], strict=True)], index=done.index)
    order = sorted(labels.unique())
    many = len(order) > MAX_BARS
    height = 3.6 if many else 0.45 * len(order) + 1.6
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels) + 1.5, height),
                             squeeze=False)
    x_key = _numeric_key(done, keys) if many else None
    for ax, (col, header, scale) in zip(axes[0], panels, strict=True):
        values = pd.to_numeric(done[col], errors="coerce").astype(float) * scale
        if many and x_key:
            x = done[x_key].astype(float)
            ax.plot(x, values, "k.", ms=2, alpha=0.5)
            if isinstance(_scale(x), LogNorm):
                ax.set_xscale("log")
            ax.set_xlabel(x_key, fontsize=8)
        elif many:
            ax.hist(values.groupby(labels).mean().dropna(), bins=30, color="tab:blue",
                    alpha=0.6)
            ax.set_xlabel(f"mean over a group's seeds ({len(order):,} groups)", fontsize=8)
        else:
            per_group = [values[labels == g] for g in order]
            ax.barh(range(len(order)), [v.mean() for v in per_group], color="tab:blue",
                    alpha=0.6)
            for i, v in enumerate(per_group):
                ax.plot(v, [i] * len(v), "k.", ms=4)
            ax.set_yticks(range(len(order)), [clip(o, 60) for o in order] if ax is axes[0][0]
                          else [""] * len(order))
            ax.invert_yaxis()
        ax.set_title(header, fontsize=10)
    shown = ("dots: runs" if many and x_key else "groups' means" if many
             else "bars: mean over seeds, dots: runs")
    fig.suptitle(f"{study} on {data_name(done)}: per-job time and memory ({shown})")
    fig.tight_layout()
    return fig


