"""Step-by-step variant differences: for each pair of runs that share the seed (so the initial
weights and the data order) and differ in one key (sweep.pairs), the per-step difference of
`train/loss`, variant minus reference, on the steps both recorded; per group of pairs (the key,
the two values, the other keys) its mean and min-max band over the seeds; per pair the first
step at which the two curves differ (the recorded float values compared exactly, `!=`) and the
largest |difference|; the figure `<study>_diff.png`.

"0 at every step" means the variant computes exactly what the reference does (a custom ReLU
Function against nn.ReLU); a difference that starts at step k says when the change first
reaches the loss (a frozen layer: step 1, after the first update; no zero_grad: step 2, the
first update made with an accumulated gradient)."""

from __future__ import annotations

import pandas as pd

from autograd_lab.errors import UserError, clip
from autograd_lab.sweep.board import band_values
from autograd_lab.sweep.figures import MAX_LEGEND, pyplot
from autograd_lab.sweep.pairs import COLUMNS, _order, pair_runs
from autograd_lab.sweep.runs import BAND_KEY
from autograd_lab.sweep.tables import _short, data_name, study_of
from autograd_lab.text import fmt_number

METRIC = "train/loss"

# the columns of a frame of differences that are neither the pair nor the other keys
STEP_COLUMNS = ["step", "reference_metric", "variant_metric", "difference"]

NEVER = "never"

READING = ("Each pair of runs shares the seed (the same initial weights and data order) and "
           "differs in one key;\n`first differing step` is the first step at which the "
           "variant's train/loss differs from the reference's,\nthe recorded values compared "
           "exactly: \"never\" (0 at every step) means the variant computes exactly what the "
           "reference does.")


def is_scan(runs: pd.DataFrame, key: str) -> bool:
    """Whether `key` is a numeric scan (a learning rate, a size: every value a number, not
    true/false) rather than a variant: its curves are compared by the loss figure, not
    step by step against one reference value."""
    values = runs[key].dropna()
    return bool(len(values)) and values.map(
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)).all()


def pairs_by(runs: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """The summary's pairs: pair_runs for each key of `by` (the swept keys when None) that
    varies between the runs and is a variant, not a numeric scan (is_scan); the seed, keys that
    do not vary and scans are left out, never an error. pair_runs(runs, "optim.lr") pairs a
    scan when asked."""
    keys = runs.attrs.get("swept", []) if by is None else by
    frames = []
    for key in dict.fromkeys(k for k in keys if k != BAND_KEY and k in runs):
        if is_scan(runs, key):
            continue
        try:
            frames.append(pair_runs(runs, key))
        except UserError:  # the same value in every run: nothing to pair on
            continue
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def step_differences(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str] | None = None,
                     metric: str = METRIC, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per pair and step both runs recorded: the pair's columns (sweep.pairs: key,
    reference_value, variant_value, reference_run, variant_run, seed, the other keys), then step,
    reference_metric, variant_metric (the recorded `metric` values; not "variant", which is a
    config group's column) and difference (variant - reference).
    A step recorded twice in a run (a resumed run) counts with its last value."""
    pairs = pairs_by(runs, by) if pairs is None else pairs
    columns = [*pairs.columns, *STEP_COLUMNS]
    rows = curves[curves.name == metric]
    if pairs.empty or rows.empty:
        return pd.DataFrame(columns=columns)
    rows = pd.DataFrame({"run": rows.run.astype(str).values, "step": rows.step.values,
                         "value": rows.value.values})
    rows = rows.drop_duplicates(["run", "step"], keep="last")
    ref = rows.rename(columns={"run": "reference_run", "value": "reference_metric"})
    var = rows.rename(columns={"run": "variant_run", "value": "variant_metric"})
    out = pairs.merge(ref, on="reference_run").merge(var, on=["variant_run", "step"])
    out["difference"] = out.variant_metric - out.reference_metric
    return out.sort_values(["key", "variant_run", "reference_run", "step"],
                           ignore_index=True)[columns]


def _others(diffs: pd.DataFrame) -> list[str]:
    """The other keys' columns of a frame of differences (those that are not the pair's own)."""
    return [c for c in diffs.columns if c not in COLUMNS and c not in STEP_COLUMNS]


def first_differences(diffs: pd.DataFrame) -> pd.DataFrame:
    """Per pair of a step_differences frame: steps (how many were compared), first_step (the
    first step whose values differ, `!=` on the recorded floats; None when they never do; two
    NaNs count as equal), max_abs (the largest |difference|, NaNs left out) and max_step (where
    it is, the first such step)."""
    pair = ["key", "reference_value", "variant_value", "reference_run", "variant_run", "seed"]
    head = pair + _others(diffs)
    if diffs.empty:
        return pd.DataFrame(columns=[*head, "steps", "first_step", "max_abs", "max_step"])
    ref, var = diffs.reference_metric, diffs.variant_metric
    frame = diffs.assign(_differs=((var != ref) & ~(ref.isna() & var.isna())),
                         _abs=diffs.difference.abs())
    ids = ["key", "variant_run", "reference_run"]
    pair_of = frame.groupby(ids, sort=False)  # vectorised: thousands of pairs, no Python loop
    out = pair_of[[c for c in head if c not in ids]].first()
    out["steps"] = pair_of.size()
    out["first_step"] = frame[frame._differs].groupby(ids).step.min().astype("Int64")
    out["max_abs"] = pair_of._abs.max()
    largest = frame[frame._abs > 0].sort_values("step", kind="stable")
    largest = largest.loc[largest.groupby(ids, sort=False)._abs.idxmax()]
    out["max_step"] = largest.set_index(ids).step.astype("Int64")
    out = out.reset_index()[[*head, "steps", "first_step", "max_abs", "max_step"]]
    return out.sort_values(["key", *_others(diffs), "variant_value", "seed"],
                           ignore_index=True, key=lambda s: s.astype(str).map(_order))


def diff_table(firsts: pd.DataFrame) -> pd.DataFrame:
    """first_differences as the summary's table: text columns, "never" where the curves never
    differ, "steps" the number compared; the reference runs are in diff.parquet (a line a
    person can read)."""
    if firsts.empty:
        return pd.DataFrame()
    others = [c for c in firsts.columns if c not in COLUMNS
              and c not in ("steps", "first_step", "max_abs", "max_step")]
    table = pd.DataFrame({
        "key": firsts.key, "value": firsts.variant_value,  # not "variant": a config group
        "reference": firsts.reference_value,
        **{_short(k, others): firsts[k].fillna("") for k in others},
        "seed": firsts.seed, "steps": firsts.steps.astype(str),
        "first differing step": firsts.first_step.map(lambda s: NEVER if pd.isna(s) else str(s)),
        "max abs. diff": firsts.max_abs.map(fmt_number),
        "at step": firsts.max_step.map(lambda s: "-" if pd.isna(s) else str(s)),
        "variant run": firsts.variant_run})  # its reference run: diff.parquet
    # another key's column only where it tells pairs apart (a factorial sweep's `model`): a
    # value it has in every pair that sets it (the default beside a one-key variant) is noise
    shown = [_short(k, others) for k in others]
    same = [c for c in shown if table[c][table[c] != ""].nunique() < 2]
    return table.drop(columns=same)


def group_label(row: dict, others: list[str]) -> str:
    """A group of pairs in words: `key: variant − reference (other=value, ...)`."""
    rest = ", ".join(f"{_short(k, others)}={row[k]}" for k in others
                     if isinstance(row.get(k), str))
    return (f"{row['key']}: {row['variant_value']} − {row['reference_value']}"
            + (f" ({rest})" if rest else ""))


def _groups(diffs: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """[(the group's key values, frame indexed by step with mean, min, max and n of the
    difference over its pairs)], a group being the key, its two values and the other keys."""
    if diffs.empty:
        return []
    keys = ["key", "variant_value", "reference_value", *_others(diffs)]
    frame = diffs[[*keys, *STEP_COLUMNS]].copy()
    frame[keys] = frame[keys].astype(object).where(frame[keys].notna(), None)
    out = []
    for values, group in frame.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, values, strict=True))
        ref, var = group.reference_metric, group.variant_metric
        differs = (var != ref) & ~(var.isna() & ref.isna())
        row["first_step"] = int(group.step[differs].min()) if differs.any() else None
        row["max_abs"] = float(group.difference.abs().max())
        stats = group.groupby("step").difference.agg(["mean", "min", "max", "count"])
        out.append((row, stats.rename(columns={"count": "n"})))
    return out


def diff_bands(diffs: pd.DataFrame) -> dict:
    """{group label: frame indexed by step with mean, min, max and n of the difference over the
    group's pairs (its seeds)}, the groups in key order."""
    others = _others(diffs)
    return {group_label(row, others): frame for row, frame in _groups(diffs)}


def tensorboard_diffs(bands: dict, metric: str = METRIC) -> tuple[dict, dict]:
    """The summary run's scalars for diff_bands: ({step: [serialised Summary.Value]}, {chart
    title: ("Margin", [(mean, min, max tags)])}) under `diff/<metric>/<group>/mean|min|max`."""
    name = metric.replace("/", "_")
    values: dict = {}
    charts = {}
    for label, frame in bands.items():
        tag = clip(label.replace(" − ", "-vs-").replace(": ", "=").replace(" ", ""), 200)

        def tags(_metric, stat, tag=tag):
            return f"diff/{name}/{tag}/{stat}"

        for step, more in band_values({metric: frame}, set(), tags).items():
            values.setdefault(step, []).extend(more)
        charts[f"{label}: variant − reference, mean over seeds, band min-max"] = (
            "Margin", [tuple(tags(metric, s) for s in ("mean", "min", "max"))])
    return values, charts


def _reading(row: dict) -> str:
    """A pair group's legend note: how its difference starts and how large it gets."""
    if row["first_step"] is None:
        return "exactly 0 at every step"
    return (f"differs from step {row['first_step']} on, largest |Δ| "
            f"{fmt_number(row['max_abs'])}")


def figure_diff(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str] | None = None,
                study: str | None = None, metric: str = METRIC):
    """variant − reference of `metric` per step, one panel per key, one line per group of pairs
    (the mean over its seeds, a min-max band), a zero line, a symmetric log axis when the
    differences span decades (an exact 0, 1e-7 and 1 all visible); None without pairs."""
    import numpy as np

    diffs = step_differences(runs, curves, by, metric)
    if diffs.empty:
        return None
    plt = pyplot()
    keys = list(dict.fromkeys(diffs.key))
    groups, others = _groups(diffs), _others(diffs)
    study = study or ", ".join(sorted(study_of(runs).unique()))
    seeds = int(max(f["n"].max() for _, f in groups))
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 3.0 * len(keys) + 0.9), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        mine = [(row, frame) for row, frame in groups if row["key"] == key]
        varying = [k for k in others if len({str(row[k]) for row, _ in mine}) > 1]
        ax.axhline(0, color="k", lw=0.8, ls=":", zorder=1)
        many = len(mine) > MAX_LEGEND
        for row, frame in mine:
            rest = ", ".join(f"{_short(k, varying)}={row[k]}" for k in varying)
            label = (f"{row['variant_value']} − {row['reference_value']}"
                     + (f" ({rest})" if rest else ""))
            line, = ax.plot(frame.index, frame["mean"], lw=0.8 if many else 1.3,
                            marker="." if len(frame) < 30 and not many else None,
                            label=f"{clip(label, 70)}: {_reading(row)}")
            if frame["n"].max() > 1 and not many:
                ax.fill_between(frame.index, frame["min"], frame["max"], alpha=0.2, lw=0,
                                color=line.get_color())
        values = np.concatenate([f[["min", "max"]].to_numpy(float).ravel() for _, f in mine])
        values = np.abs(values[np.isfinite(values)])
        nonzero = values[values > 0]
        if len(nonzero) and nonzero.max() > 100 * nonzero.min():
            linthresh = 10.0 ** np.floor(np.log10(nonzero.min()))
            ax.set_yscale("symlog", linthresh=linthresh, linscale=1.0)
            ax.set_ylabel(f"variant − reference\n(symlog: linear within ±{linthresh:g})",
                          fontsize=8)
        else:
            ax.set_ylabel("variant − reference", fontsize=8)
            if not len(nonzero):
                ax.set_ylim(-1, 1)  # every difference is exactly 0: the zero line centred
        ax.set_title(key, fontsize=10, loc="left")
        if not many:
            ax.legend(fontsize=8, title="variant − reference", title_fontsize=8,
                      loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # no line
            # of a noisy difference is hidden behind it
        else:
            ax.text(0.99, 0.02, f"{len(mine):,} groups: their first differing steps are in "
                    f"summary.md", transform=ax.transAxes, ha="right", fontsize=8)
    axes[-1, 0].set_xlabel("optimizer step")
    band = f"mean over {seeds} seeds, band min-max" if seeds > 1 else "one pair per line"
    fig.suptitle(f"{study} on {data_name(runs)}: {metric} of the variant minus that of the "
                 f"reference run\nof the same seed (same initial weights and data order), "
                 f"per step ({band})", fontsize=10)
    fig.tight_layout()
    return fig
