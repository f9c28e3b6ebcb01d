"""Run directories -> pandas frames -> CSV / Parquet / markdown / PNG.

For notebooks:

    from autograd_lab.summary import load_runs, load_curves
    runs = load_runs("multirun/zero_grad_study/2026-11-26_12-00-00")  # one row per run
    curves = load_curves("multirun/zero_grad_study/2026-11-26_12-00-00")  # long format

`summarize(path)` writes `summary/` there: runs.parquet, runs.csv, curves.parquet, summary.md
(grouped by the swept keys, mean ± std over seeds) and one loss-curve PNG per study. Any folder
of runs works: a sweep, several sweeps, single runs, a partial sweep.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from . import RUN_FORMAT_VERSION
from .config import UserError, clip, flatten, path_safe
from .sweep import json_kind, metrics_problem, read_run_json

METRICS = ["train_loss", "best_train_loss", "val_loss", "val_acc", "val_step", "steps"]
NUMBERS = ["images_per_s", "seconds_per_step", "wall_seconds", "train_seconds", "val_seconds",
           "val_peak_cuda_mib", "peak_cuda_mib",
           "process_peak_rss_mib"]  # process-wide (a sweep's earlier jobs too): never compared
# keys that differ between runs without being what a study compares
CHOICES = ("model", "data", "optim", "variant", "experiment", "size", "probes", "profiler",
           "trainer")
NOT_SWEPT = {"seed", "data.root", "resume", "threads", "trainer.progress_bar", "log.flush_every_s",
             "log.progress_every_s"}
LABELS = {"zero_grad_study": ("train.zero_grad", {True: "Zero gradients",
                                                  False: "No zero gradients"})}


# folders a run writes inside itself, never holding another run: find_runs does not walk them
RUN_INSIDE = {"summary", "checkpoints", "profiler", "csv", "__pycache__"}


def find_runs(path) -> list[Path]:
    """The run directories below `path` (itself included); [] for a sweep folder (Hydra's
    multirun.yaml) whose jobs have not started; a UserError for a folder without runs."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    # A Hydra job dir (.hydra/) without run.json is a run whose process was killed (SIGKILL,
    # power loss) before it could record anything: it is listed, as interrupted.
    # A job submitted to SLURM and not yet started has only its slurm.json. One walk, which
    # does not enter the folders a run writes inside itself (thousands of runs: a few seconds).
    found = set()
    for folder, dirs, files in os.walk(path):
        here = Path(folder)
        if "run.json" in files or "slurm.json" in files:
            found.add(here)
        if here.name == ".hydra" and "config.yaml" in files:
            found.add(here.parent)
        dirs[:] = [d for d in dirs if d not in RUN_INSIDE and not d.endswith(".tmp")]
    runs = sorted(d for d in found if "summary" not in d.relative_to(path).parts)
    if not runs and (path / "multirun.yaml").is_file():
        return []  # a sweep whose first job has not made its folder yet: "no runs yet"
    if not runs:
        raise UserError(f"{path}: no runs found (no run.json below it); point at a run or "
                        f"sweep directory")
    return runs


def _flatten(d: dict) -> dict:
    return flatten(d, lambda v: str(v) if isinstance(v, list) else v)


KILLED = "no run.json: the process was killed before it recorded a result (or is still " \
    "running); re-run the same command to continue it"


def _hydra_config(run_dir: Path) -> tuple[dict, dict]:
    """The resolved config and group choices Hydra saved in RUN_DIR/.hydra ({} when absent)."""
    from omegaconf import OmegaConf

    config, choices = {}, {}
    try:
        loaded = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        try:
            config = OmegaConf.to_container(loaded, resolve=True)
        except Exception:  # an interpolation only the app resolves (a custom resolver)
            config = OmegaConf.to_container(loaded)
        hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml")
        choices = {k: v for k, v in OmegaConf.to_container(
            hydra.hydra.runtime.choices).items() if not k.startswith("hydra")}
    except Exception:  # absent, or a half-written Hydra file: the run is still listed
        pass
    return (config if isinstance(config, dict) else {}), choices


# the parts of a run record that are mappings: anything else there is a damaged record
SECTIONS = ("config", "final", "params", "profiler", "probes", "detach", "choices", "memory")


def _record_problem(record: dict, run_dir: Path) -> str | None:
    """What makes a run.json object no run record, or None (a newer format is a UserError)."""
    version = record.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        return "run.json is not a run record (its format_version is not a number)"
    if version > RUN_FORMAT_VERSION:
        raise UserError(f"{run_dir}: written by a newer autograd-lab (format {version}; this "
                        f"one reads up to {RUN_FORMAT_VERSION}); upgrade to summarize it")
    if not isinstance(record.get("status"), str):
        return "run.json is not a run record (it has no status)"
    for key in SECTIONS:
        if record.get(key) is not None and not isinstance(record[key], dict):
            return f"run.json is not a run record (its {key} is a JSON {json_kind(record[key])})"
    return None


def _read_record(run_dir: Path) -> dict:
    """The run's record, safe to read: a run killed before it wrote run.json is `interrupted`; a
    run whose run.json or metrics.parquet does not parse is `broken`, with what is wrong as its
    error (and the config Hydra saved, when run.json has none)."""
    record, problem = read_run_json(run_dir)
    if record is None and problem is None:  # no run.json
        config, choices = _hydra_config(run_dir)
        record = {"status": "interrupted", "error": KILLED, "config": config,
                  "choices": choices}
        problem = metrics_problem(run_dir, required=False)
    elif record is not None:
        problem = _record_problem(record, run_dir)
        if problem is None:
            final = record.get("final") or {}
            problem = metrics_problem(run_dir, required=record["status"] in (
                "completed", "diverged"), steps=final.get("steps"))
    if problem is None:
        return record
    record = {k: v for k, v in (record or {}).items()
              if k not in SECTIONS or isinstance(v, dict)}
    was = record.get("status")
    if not record.get("config"):
        record["config"], record["choices"] = _hydra_config(run_dir)
    record["status"] = "broken"
    record["error"] = problem + (f" (run.json says {was})" if isinstance(was, str) else "")
    return record


def load_runs(path) -> pd.DataFrame:
    """One row per run: swept keys and the whole config, status, metrics, time, memory.
    A run whose files do not parse has status `broken` and what is wrong as its error; a run
    whose configuration another run has too is `duplicate` (_mark_duplicates). A sweep folder
    without job folders yet gives no rows."""
    base = Path(path)
    rows, results, configless, identities = [], set(), [], []
    from .slurm import read_marker, slurm_job_states

    run_dirs = find_runs(base)
    active = slurm_job_states(run_dirs)  # jobs SLURM still has (pending, running, ...)
    for run_dir in run_dirs:
        record = _read_record(run_dir)
        if run_dir in active and record.get("status") != "completed":
            record["status"] = "running"
            record["error"] = (f"SLURM job {read_marker(run_dir).get('job_id')} is "
                               f"{active[run_dir]}")
        row = {"run": _name(run_dir, base), "status": record.get("status"),
               "error": record.get("error")}
        row.update({k: (record.get("final") or {}).get(k) for k in METRICS})
        row.update({k: record.get(k) for k in NUMBERS})
        if row["process_peak_rss_mib"] is None:  # run directories from before the rename
            row["process_peak_rss_mib"] = record.get("peak_rss_mib")
        params = record.get("params") or {}
        row["trainable_params"] = params.get("trainable")
        row["frozen_params"] = params.get("frozen")
        for section in ("profiler", "probes", "detach", "memory"):
            for k, v in _flatten(record.get(section) or {}).items():
                if not isinstance(v, (list, dict)):
                    row[f"{section}.{k}"] = v
                    results.add(f"{section}.{k}")
        if not record.get("config"):
            configless.append(row["run"])
        else:
            identities.append((row, _identity(record["config"])))
        row.update(_flatten(record.get("config") or {}))
        row.update({f"{k}": v for k, v in (record.get("choices") or {}).items()})
        rows.append(row)
    _mark_duplicates(identities)
    frame = pd.DataFrame(rows, columns=None if rows else ["run", "status", "error", *METRICS])
    frame.attrs["results"] = sorted(results)  # measured, not configured: never swept keys
    frame.attrs["configless"] = configless  # no config known: they tell nothing about keys
    counted = frame[frame.status != "duplicate"] if len(frame) else frame
    counted.attrs.update(frame.attrs)
    frame.attrs["swept"] = swept_keys(counted)
    return frame


def _identity(config: dict) -> str:
    """A configuration's identity: its result-relevant keys (config.comparable), as text."""
    import json

    from .config import comparable

    return json.dumps(comparable(config), sort_keys=True, default=str)


# which of several runs of one configuration is the one counted: a result first
_PREFERRED = {"completed": 0, "diverged": 1, "interrupted": 2, "failed": 3}


def _mark_duplicates(identities: list) -> None:
    """Runs of one configuration (the same identity, whatever the override spelling that named
    their folders: `train.zero_grad=true` and `seed=0,train.zero_grad=true`) are one run: the
    completed one (else the furthest along) is counted, each other one gets the status
    `duplicate` and names it, so no summary pools one configuration twice."""
    by_identity: dict = {}
    for row, identity in identities:
        if row["status"] in _PREFERRED:  # broken or still with SLURM: listed on their own
            by_identity.setdefault(identity, []).append(row)
    for same in by_identity.values():
        if len(same) < 2:
            continue
        same.sort(key=lambda r: (_PREFERRED[r["status"]], len(r["run"]), r["run"]))
        for row in same[1:]:
            row["error"] = (f"the same configuration as {same[0]['run']} ({row['status']}): "
                            f"counted once, as that run")
            row["status"] = "duplicate"


def _name(run_dir: Path, base: Path) -> str:
    return str(run_dir.relative_to(base)) if run_dir != base else run_dir.name


def swept_keys(frame: pd.DataFrame) -> list[str]:
    """Config keys whose value differs between the runs (what the sweep compared); runs whose
    config is unknown (a broken run.json without .hydra/) are left out of the comparison."""
    keys, results = [], set(frame.attrs.get("results", []))
    configless = frame.attrs.get("configless", [])
    known = frame[~frame.run.isin(configless)] if configless and "run" in frame else frame
    for col in frame.columns:
        is_key = col in CHOICES or ("." in col and col not in results)
        if is_key and col not in NOT_SWEPT and known[col].astype(str).nunique() > 1:
            keys.append(col)
    # a group choice names what it sets: a key that varies exactly with one (variant and the
    # train.freeze it sets, data and data.name) is left out, and the choice kept
    text = {k: known[k].astype(str) for k in keys}
    choices = [k for k in keys if k in CHOICES]
    return [k for k in keys if k in CHOICES or not any(
        _same_partition(text[k], text[c]) for c in choices)]


def _same_partition(a: pd.Series, b: pd.Series) -> bool:
    """Whether two columns split the rows into the same groups (one determines the other)."""
    pairs = pd.DataFrame({"a": a.values, "b": b.values}).drop_duplicates()
    return pairs.a.is_unique and pairs.b.is_unique


def load_curves(path) -> pd.DataFrame:
    """Every run's metrics.parquet, long format, with a `run` column (`run` and `name` are
    categorical: thousands of runs stay small). A file that does not parse is left out, and
    named with what is wrong in `attrs["broken"]` ({run: problem})."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = Path(path)
    tables, names, broken = [], [], {}
    columns = ["step", "epoch", "name", "value"]
    for run_dir in find_runs(base):
        file, name = run_dir / "metrics.parquet", _name(run_dir, base)
        if not file.is_file():
            continue
        try:
            table = pq.read_table(file, read_dictionary=["name"])  # a tag's text once
        except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...
            reason = clip(str(e), 120) or type(e).__name__
            broken[name] = f"metrics.parquet does not parse (truncated?): {reason}"
            continue
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            broken[name] = f"metrics.parquet lacks the columns {', '.join(missing)}"
            continue
        try:  # one schema for all: the harness's types
            table = _harness_types(table.select(columns))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
            broken[name] = f"metrics.parquet has columns of other types: {clip(str(e), 120)}"
            continue
        tables.append(table)
        names.append(name)
    if not tables:
        frame = pd.DataFrame(columns=["run", *columns])
        frame.attrs["broken"] = broken
        return frame
    rows = np.repeat(np.arange(len(names), dtype=np.int32), [len(t) for t in tables])
    table = pa.concat_tables(tables)
    del tables
    frame = table.to_pandas()  # name: categorical, never a string a row
    del table
    frame.insert(0, "run", pd.Categorical.from_codes(rows, categories=pd.Index(names)))
    frame.attrs["broken"] = broken
    return frame


def _harness_types(table):
    """A metrics.parquet table with the harness's column types (step, epoch: int64; name: a
    dictionary of strings; value: float64), whatever its writer made of them (an empty name
    column is stored as numbers by pandas)."""
    import pyarrow as pa

    name = table.column("name")
    if len(name) == 0:
        name = pa.chunked_array([], pa.large_string())
    elif pa.types.is_dictionary(name.type):
        name = name.cast(pa.dictionary(pa.int32(), pa.large_string()))
    else:
        name = name.cast(pa.large_string())
    name = name.cast(pa.large_string()).dictionary_encode() if not pa.types.is_dictionary(
        name.type) else name
    return pa.table({"step": table.column("step").cast(pa.int64()),
                     "epoch": table.column("epoch").cast(pa.int64()), "name": name,
                     "value": table.column("value").cast(pa.float64())})


# The summary tables: (column, header, scale). Bytes are shown in MiB.
RESULTS = (("train_loss", "train loss", 1.0), ("best_train_loss", "best train loss", 1.0),
           ("val_loss", "val loss", 1.0), ("val_acc", "val acc", 1.0))
COST = (("seconds_per_step", "s/step (median)", 1.0), ("images_per_s", "images/s", 1.0),
        ("memory.saved_for_backward_bytes", "saved for backward MiB", 2**-20),
        ("memory.grad_bytes", ".grad MiB", 2**-20),
        ("memory.optimizer_state_bytes", "optimizer state MiB", 2**-20),
        ("memory.val_saved_bytes", "val graph MiB", 2**-20),
        ("trainable_params", "trainable params", 1.0),
        ("peak_cuda_mib", "peak CUDA MiB", 1.0),
        ("profiler.breakdown_ms.forward", "forward ms", 1.0),
        ("profiler.breakdown_ms.backward", "backward ms", 1.0),
        ("profiler.breakdown_ms.optimizer", "optimizer ms", 1.0))


def fmt_number(x, digits: int = 3) -> str:
    """Plain notation with `digits` significant digits (0.163, 2.19, 6,842); powers of ten
    only where the size needs them (1.1e7, 3.2e-5)."""
    if x is None or pd.isna(x):
        return "-"
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
        return f"{float(mantissa):.{digits}g}e{int(exponent)}"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _short(key: str, keys: list[str]) -> str:
    """A key's last part (train.zero_grad -> zero_grad) unless two keys would then read the
    same."""
    last = key.rsplit(".", 1)[-1]
    return last if sum(k.rsplit(".", 1)[-1] == last for k in keys) == 1 else key


def _value_text(value) -> str:
    return str(value).lower() if str(value) in ("True", "False") else str(value)


def group_table(runs: pd.DataFrame, by: list[str], columns=RESULTS + COST) -> pd.DataFrame:
    """Per group of runs (the keys in `by`, seeds pooled): n, and each column's mean, with
    ± std where n > 1; completed runs only (the others are listed on their own). One pandas
    groupby for all groups: thousands of groups take a second."""
    import numpy as np

    done = runs[runs.status == "completed"]
    cols = [(c, h, k) for c, h, k in columns if c in done and done[c].notna().any()]
    keys = [k for k in by if k != "seed"]
    values = pd.DataFrame({c: pd.to_numeric(done[c], errors="coerce").astype(float) * k
                           for c, _, k in cols}, index=done.index)
    grouped = values.groupby([done[k].map(_value_text) for k in keys] if keys
                             else np.zeros(len(done), dtype=int), sort=True)
    size, mean, std, count = grouped.size(), grouped.mean(), grouped.std(), grouped.count()
    rows = []
    for i, key in enumerate(size.index):
        key = key if isinstance(key, tuple) else (key,)
        row = {_short(k, keys): v for k, v in zip(keys, key, strict=True)} if keys else {}
        row["n"] = int(size.iloc[i])
        for col, header, _ in cols:
            text = fmt_number(mean[col].iloc[i])
            if count[col].iloc[i] > 1 and std[col].iloc[i] > 0:  # a spread only where there is
                text += f" ± {fmt_number(std[col].iloc[i], digits=2)}"
            row[header] = text
        rows.append(row)
    return pd.DataFrame(rows)


def _label(study, key_values: dict) -> str:
    if study in LABELS:
        key, names = LABELS[study]
        value = key_values.get(key)
        value = {"True": True, "False": False, "true": True, "false": False}.get(value, value)
        if value in names:
            rest = {k: v for k, v in key_values.items() if k != key}
            return names[value] + (f" ({_fmt(rest)})" if rest else "")
    return _fmt(key_values) or "all runs"


def _fmt(key_values: dict) -> str:
    keys = list(key_values)
    return ", ".join(f"{_short(k, keys)}={_value_text(v)}" for k, v in key_values.items())


def _studies(runs: pd.DataFrame) -> pd.Series:
    return runs["study"].fillna("runs").astype(str) if "study" in runs else \
        pd.Series("runs", index=runs.index)


def _data_name(runs: pd.DataFrame) -> str:
    names = sorted(runs["data.name"].dropna().astype(str).unique()) if "data.name" in runs \
        else []
    return ", ".join(names) or "unknown data"


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
    texts = [runs[k].map(_value_text).tolist() for k in keys]
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
    title = f"{study} on {_data_name(runs)}: {metric} per step ({band})"
    if n_lines > MAX_LEGEND:  # too many lines for bands: each line is its group's mean
        return _figure_many_curves(runs, keys, stats, metric,
                                   title.replace(", band min-max", ""), log)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key in mean.columns:
        line_data = mean[key].dropna()
        line, = ax.plot(line_data.index, line_data.values, lw=1.0,
                        marker="." if len(line_data) < 10 else None,  # a few points: show each
                        label=clip(_label(study, dict(zip(keys, stats["keys"][key],
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
                      [clip(_fmt(dict(zip(others, f, strict=True))), 60) for f in families],
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
    labels = pd.Series([_fmt(dict(zip(keys, r, strict=True))) for r in
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
    fig.suptitle(f"{study} on {_data_name(done)}: per-job time and memory ({shown})")
    fig.tight_layout()
    return fig


def plot_study(runs, curves: pd.DataFrame | None = None, by: list[str] | None = None) -> list:
    """The summary's figures, for a notebook: per study, the loss curves (and the per-job cost
    figure where there is one to compare, and sharpness against 2/lr where it was measured).
    `runs`: a sweep or run folder, or load_runs' frame (then pass `curves`). The same figures
    `summarize` writes as PNGs."""
    return [fig for _, fig in _figures(runs, curves, by)]


def _figures(runs, curves=None, by=None) -> list:
    """[(file name, Figure)] for plot_study and the summary."""
    if not isinstance(runs, pd.DataFrame):
        path = runs
        runs, curves = load_runs(path), load_curves(path)
    by = runs.attrs.get("swept", []) if by is None else list(by)
    intact = runs[runs.status.isin(["completed", "diverged", "interrupted"])]
    out = []
    studies = _studies(intact)
    for study in sorted(studies.unique()):
        subset = intact[studies == study]
        mine = curves[curves.run.isin(subset.run)]
        name = path_safe(study, limit=200)  # a file name, whatever the study is called
        out.append((f"{name}_loss.png", figure_curves(subset, mine, by, study)))
        cost = figure_cost(subset, by, study)
        if cost is not None:
            out.append((f"{name}_cost.png", cost))
        if (mine.name == "probes/sharpness").any():  # sharpness against each run's 2/lr
            from .dynamics import figure_stability

            out.append((f"{name}_sharpness.png", figure_stability(subset, mine)))
    return out


def plot_curves(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str], out: Path) -> list[Path]:
    """Write the summary's figures (plot_study's) into `out` as PNGs; returns their paths."""
    import io

    import matplotlib.pyplot as plt

    from .files import atomic_write_bytes

    written = []
    for name, fig in _figures(runs, curves, by):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())
        written.append(out / name)
    return written


def summarize(path, by: list[str] | None = None) -> Path:
    """Write path/summary/ and return it."""
    return summarize_runs(path, by)[0]


def _summary_lock(path: Path):
    """One writer for a summary folder too (two `summarize` calls, or one beside a sweep's end):
    a second gets the lock's one-line error. A folder that cannot be made is left to the
    writes below, which report it."""
    import contextlib

    from .lock import RunLock

    try:
        (path / "summary").mkdir(parents=True, exist_ok=True)
    except OSError:
        return contextlib.nullcontext()
    return RunLock(path / "summary")


def summarize_runs(path, by: list[str] | None = None) -> tuple[Path, pd.DataFrame]:
    """Write path/summary/; return it and the runs table written there. Runs whose files do
    not parse are listed as broken (status `broken`, what is wrong as the error) and left out of
    the grouped table and the plots; the others are summarised as usual. A summary that cannot
    be written is a UserError."""

    path = Path(path)
    runs = load_runs(path)
    with _summary_lock(path):
        return _write_summary(path, runs, by)


def _remove_leftovers(out: Path) -> None:
    """The temporary files and folders (`.NAME.tmp`) a killed summary left in `out`: never
    read, removed before this summary writes its own."""
    import shutil

    for entry in out.glob(".*.tmp"):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)  # our numbers, as formatted


def _write_summary(path: Path, runs, by) -> tuple[Path, pd.DataFrame]:
    from .files import atomic_write_bytes, write_csv, write_parquet

    curves = load_curves(path)
    for name, problem in curves.attrs.get("broken", {}).items():  # a footer that parsed, data
        at = runs.index[(runs.run == name) & (runs.status != "broken")]  # that did not
        runs.loc[at, "error"] = [f"{problem} (run.json says {s})" for s in runs.status[at]]
        runs.loc[at, "status"] = "broken"
    by = list(by) if by else runs.attrs["swept"]
    unknown = [k for k in by if k not in runs]
    if unknown:
        raise UserError(f"--by {unknown[0]}: no such key in these runs; swept keys are: "
                        f"{', '.join(runs.attrs['swept']) or '(none)'}")
    running = runs[runs.status == "running"]  # SLURM still has them: no result yet
    intact = runs[~runs.status.isin(["broken", "running", "duplicate"])]
    broken = runs[runs.status == "broken"]
    duplicate = runs[runs.status == "duplicate"]
    failed = intact[intact.status != "completed"]
    studies = ', '.join(sorted(_studies(runs).unique()))
    text = [f"# Summary: {studies}" if studies else "# Summary", "", f"`{path}`", ""]
    counts = runs.status.value_counts()
    if runs.empty:
        text += ["No runs yet: the sweep has not started a job. Summarize again (or let the "
                 "sweep end) when its jobs have run.", ""]
    text += [] if runs.empty else [f"{len(runs)} runs: " + ", ".join(
        f"{counts[s]} {s}" for s in ("completed", "running", "diverged", "failed",
                                      "interrupted", "broken", "duplicate") if s in counts)
        + ". "
        f"Grouped by {', '.join(k for k in by if k != 'seed') or 'nothing (one group)'}"
        f"{'; seeds pooled (n runs a group)' if 'seed' in by else ''}. Every run's every "
        f"column: runs.csv; curves: curves.parquet.", ""]
    results, cost = group_table(intact, by, RESULTS), group_table(intact, by, COST)
    if len(results) and any(h in results for _, h, _ in RESULTS):
        text += ["## Results (completed runs)", "", _markdown(results), ""]
    elif not runs.empty:
        text += ["No run completed: nothing to average.", ""]
    if len(cost) and any(h in cost for _, h, _ in COST):
        text += ["## Time and memory per job", "",
                 "Figures that belong to each job, whatever ran before it in the process "
                 "(exact bytes, in MiB; seconds per step is the median after a warm-up).", "",
                 _markdown(cost), ""]
    if len(failed):
        shown = failed.assign(error=failed.error.fillna("").astype(str).map(
            lambda e: clip(e, 110)))
        text += ["## Runs that did not complete", "",
                 "Not in the tables above. Re-running the same command continues an interrupted "
                 "run from its checkpoint.", "",
                 _markdown(shown[["run", "status", "error"]]), ""]
    if len(running):
        text += ["## Runs still with SLURM", "",
                 "Not in the tables above yet: summarize again when they end.", "",
                 _markdown(running[["run", "error"]].rename(columns={"error": "state"})), ""]
    if len(duplicate):
        text += ["## Runs of a configuration already counted", "",
                 "Each has the same result-relevant configuration as a run above (its folder "
                 "was named by another spelling of the overrides): counted once, as that run.",
                 "", _markdown(duplicate[["run", "error"]].rename(columns={"error": "same as"})),
                 ""]
    if len(broken):
        text += ["## Broken runs", "",
                 "Their files do not parse, so they are not in the tables above. Re-running the "
                 "command that made one runs it again (or continues it from its checkpoint).", "",
                 broken.rename(columns={"error": "problem"})[["run", "problem"]]
                 .to_markdown(index=False), ""]
    out = path / "summary"
    try:
        out.mkdir(exist_ok=True)
        _remove_leftovers(out)
        write_parquet(out / "runs.parquet", runs.astype({c: str for c in runs.columns
                                                         if runs[c].dtype == object}))
        write_csv(out / "runs.csv", runs)
        write_parquet(out / "curves.parquet", curves)
        atomic_write_bytes(out / "summary.md", "\n".join(text).encode())
        pngs = plot_curves(intact, curves[curves.run.isin(intact.run)], by, out)
        for old in out.glob("*.png"):  # an earlier summary's figure this one does not draw
            if old not in pngs and old.is_file() and not old.is_symlink():
                old.unlink()
        from .dashboard import write_summary_run

        # the TensorBoard run `summary`: seed bands and these PNGs
        write_summary_run(out, intact, curves, by, pngs)
    except OSError as e:
        where = e.filename or out
        raise UserError(f"cannot write the summary: {where}: "
                        f"{e.strerror or type(e).__name__}") from None
    return out, runs
