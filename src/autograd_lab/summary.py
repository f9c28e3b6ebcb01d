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

from pathlib import Path

import pandas as pd

from . import RUN_FORMAT_VERSION
from .config import UserError, flatten, path_safe
from .sweep import json_kind, metrics_problem, read_run_json

METRICS = ["train_loss", "best_train_loss", "val_loss", "val_acc", "steps"]
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


def find_runs(path) -> list[Path]:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    # A Hydra job dir (.hydra/) without run.json is a run whose process was killed (SIGKILL,
    # power loss) before it could record anything: it is listed, as interrupted.
    # A job submitted to SLURM and not yet started has only its slurm.json. One walk.
    found = set()
    for p in path.rglob("*"):
        if p.name in ("run.json", "slurm.json"):
            found.add(p.parent)
        elif p.name == "config.yaml" and p.parent.name == ".hydra":
            found.add(p.parent.parent)
    runs = sorted(d for d in found if "summary" not in d.relative_to(path).parts)
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
    A run whose files do not parse has status `broken` and what is wrong as its error."""
    base = Path(path)
    rows, results, configless = [], set(), []
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
        row.update(_flatten(record.get("config") or {}))
        row.update({f"{k}": v for k, v in (record.get("choices") or {}).items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["results"] = sorted(results)  # measured, not configured: never swept keys
    frame.attrs["configless"] = configless  # no config known: they tell nothing about keys
    frame.attrs["swept"] = swept_keys(frame)
    return frame


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
    """Every run's metrics.parquet, long format, with a `run` column. A file that does not
    parse is left out, and named with what is wrong in `attrs["broken"]` ({run: problem})."""
    base = Path(path)
    parts, broken = [], {}
    for run_dir in find_runs(base):
        file, name = run_dir / "metrics.parquet", _name(run_dir, base)
        if not file.is_file():
            continue
        try:
            curve = pd.read_parquet(file)
        except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else \
                type(e).__name__
            broken[name] = f"metrics.parquet does not parse (truncated?): {reason}"
            continue
        missing = [c for c in ("step", "epoch", "name", "value") if c not in curve]
        if missing:
            broken[name] = f"metrics.parquet lacks the columns {', '.join(missing)}"
            continue
        curve.insert(0, "run", name)
        parts.append(curve)
    if not parts:
        frame = pd.DataFrame(columns=["run", "step", "epoch", "name", "value"])
    else:
        frame = pd.concat(parts, ignore_index=True)
    frame.attrs["broken"] = broken
    return frame


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
    ± std where n > 1; completed runs only (the others are listed on their own)."""
    done = runs[runs.status == "completed"]
    cols = [(c, h, k) for c, h, k in columns if c in done and done[c].notna().any()]
    keys = [k for k in by if k != "seed"]
    keyed = done.assign(**{k: done[k].map(_value_text) for k in keys})
    groups = keyed.groupby(keys, sort=True) if keys else [((), keyed)]
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = {_short(k, keys): v for k, v in zip(keys, key, strict=True)}
        row["n"] = len(group)
        for col, header, scale in cols:
            values = group[col].astype(float) * scale
            text = fmt_number(values.mean())
            if len(values.dropna()) > 1 and values.std() > 0:  # a spread only where there is one
                text += f" ± {fmt_number(values.std(), digits=2)}"
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


def figure_curves(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str], study: str,
                  metric: str = "train/loss"):
    """The study's `metric` per step, one line per group (mean over its seeds) with a min-max
    band; a log axis when the curves span more than a decade; the legend outside the axes when
    it is long. Returns a matplotlib Figure."""
    plt = pyplot()

    rows = curves[curves.name == metric]
    keys = [k for k in by if k != "seed"]
    groups = runs.groupby([runs[k].map(_value_text) for k in keys], sort=True) if keys \
        else [((), runs)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    n_lines, low, high, seeds = 0, float("inf"), 0.0, 0
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        per_run = rows[rows.run.isin(group.run)].pivot_table(index="step", columns="run",
                                                             values="value")
        if per_run.empty:
            continue
        mean = per_run.mean(axis=1)
        line, = ax.plot(mean.index, mean.values, lw=1.0,
                        marker="." if len(mean) < 10 else None,  # a few points: show each
                        label=_label(study, dict(zip(keys, key, strict=True))))
        if per_run.shape[1] > 1:
            ax.fill_between(mean.index, per_run.min(axis=1), per_run.max(axis=1),
                            color=line.get_color(), alpha=0.2, lw=0)
        n_lines += 1
        seeds = max(seeds, per_run.shape[1])
        positive = per_run[per_run > 0]
        low, high = min(low, positive.min().min()), max(high, per_run.max().max())
    if n_lines and high > 10 * low:
        ax.set_yscale("log")  # a run that blows up would flatten every other curve
    band = f"mean over {seeds} seeds, band min-max" if seeds > 1 else "one run per line"
    ax.set(xlabel="optimizer step", ylabel=metric.replace("/", " "),
           title=f"{study} on {_data_name(runs)}: {metric} per step ({band})")
    if n_lines > 6:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    elif n_lines:
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def figure_cost(runs: pd.DataFrame, by: list[str], study: str):
    """The per-job time and memory figures side by side, a bar per group (mean over seeds, the
    seeds as dots), or None when there is nothing to compare. These belong to each job,
    whatever ran before it in the process; peak RSS does not, so it is never plotted."""
    plt = pyplot()

    done = runs[runs.status == "completed"]
    panels = [(c, h, k) for c, h, k in COST if c != "images_per_s" and c in done
              and not c.startswith("profiler.")
              and done[c].notna().any() and (done[c].fillna(0) != 0).any()]
    keys = [k for k in by if k != "seed"]
    if not panels or not keys or len(done) < 2:
        return None
    labels = done[keys].apply(lambda r: _fmt(dict(r.items())), axis=1)
    order = sorted(labels.unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels) + 1.5,
                                                      0.45 * len(order) + 1.6), squeeze=False)
    for ax, (col, header, scale) in zip(axes[0], panels, strict=True):
        values = [done[labels == g][col].astype(float) * scale for g in order]
        ax.barh(range(len(order)), [v.mean() for v in values], color="tab:blue", alpha=0.6)
        for i, v in enumerate(values):
            ax.plot(v, [i] * len(v), "k.", ms=4)
        ax.set_yticks(range(len(order)), order if ax is axes[0][0] else [""] * len(order))
        ax.set_title(header, fontsize=10)
        ax.invert_yaxis()
    fig.suptitle(f"{study} on {_data_name(done)}: per-job time and memory (bars: mean over "
                 f"seeds, dots: runs)")
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

    from .records import atomic_write_bytes

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


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, disable_numparse=True)  # our numbers, as formatted


def _write_summary(path: Path, runs, by) -> tuple[Path, pd.DataFrame]:
    from .records import atomic_write_bytes, write_csv, write_parquet

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
    intact = runs[~runs.status.isin(["broken", "running"])]
    broken = runs[runs.status == "broken"]
    failed = intact[intact.status != "completed"]
    text = [f"# Summary: {', '.join(sorted(_studies(runs).unique()))}", "", f"`{path}`", ""]
    counts = runs.status.value_counts()
    text += [f"{len(runs)} runs: " + ", ".join(f"{counts[s]} {s}" for s in (
        "completed", "running", "diverged", "failed", "interrupted", "broken") if s in counts)
        + ". "
        f"Grouped by {', '.join(k for k in by if k != 'seed') or 'nothing (one group)'}"
        f"{'; seeds pooled (n runs a group)' if 'seed' in by else ''}. Every run's every "
        f"column: runs.csv; curves: curves.parquet.", ""]
    results, cost = group_table(intact, by, RESULTS), group_table(intact, by, COST)
    if len(results) and any(h in results for _, h, _ in RESULTS):
        text += ["## Results (completed runs)", "", _markdown(results), ""]
    else:
        text += ["No run completed: nothing to average.", ""]
    if len(cost) and any(h in cost for _, h, _ in COST):
        text += ["## Time and memory per job", "",
                 "Figures that belong to each job, whatever ran before it in the process "
                 "(exact bytes, in MiB; seconds per step is the median after a warm-up).", "",
                 _markdown(cost), ""]
    if len(failed):
        shown = failed.assign(error=failed.error.fillna("").astype(str).map(
            lambda e: e if len(e) <= 110 else e[:107] + "..."))
        text += ["## Runs that did not complete", "",
                 "Not in the tables above. Re-running the same command continues an interrupted "
                 "run from its checkpoint.", "",
                 _markdown(shown[["run", "status", "error"]]), ""]
    if len(running):
        text += ["## Runs still with SLURM", "",
                 "Not in the tables above yet: summarize again when they end.", "",
                 _markdown(running[["run", "error"]].rename(columns={"error": "state"})), ""]
    if len(broken):
        text += ["## Broken runs", "",
                 "Their files do not parse, so they are not in the tables above. Re-running the "
                 "command that made one runs it again (or continues it from its checkpoint).", "",
                 broken.rename(columns={"error": "problem"})[["run", "problem"]]
                 .to_markdown(index=False), ""]
    out = path / "summary"
    try:
        out.mkdir(exist_ok=True)
        write_parquet(out / "runs.parquet", runs.astype({c: str for c in runs.columns
                                                         if runs[c].dtype == object}))
        write_csv(out / "runs.csv", runs)
        write_parquet(out / "curves.parquet", curves)
        atomic_write_bytes(out / "summary.md", "\n".join(text).encode())
        pngs = plot_curves(intact, curves[curves.run.isin(intact.run)], by, out)
        from .dashboard import write_summary_run

        # the TensorBoard run `summary`: seed bands and these PNGs
        write_summary_run(out, intact, curves, by, pngs)
    except OSError as e:
        where = e.filename or out
        raise UserError(f"cannot write the summary: {where}: "
                        f"{e.strerror or type(e).__name__}") from None
    return out, runs
