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
NOT_SWEPT = {"seed", "data.root", "resume", "threads", "trainer.progress_bar", "log.flush_every_s"}
LABELS = {"zero_grad_study": ("train.zero_grad", {True: "Zero gradients",
                                                  False: "No zero gradients"})}


def find_runs(path) -> list[Path]:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    # A Hydra job dir (.hydra/) without run.json is a run whose process was killed (SIGKILL,
    # power loss) before it could record anything: it is listed, as interrupted.
    found = {p.parent for p in path.rglob("run.json")} | \
        {p.parent.parent for p in path.rglob(".hydra/config.yaml")}
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
    for run_dir in find_runs(base):
        record = _read_record(run_dir)
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


def group_table(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean ± std over seeds of the final metrics, time and memory, per group."""
    cols = [c for c in ["train_loss", "best_train_loss", "val_loss", "val_acc", "images_per_s",
                        "seconds_per_step", "val_seconds", "memory.saved_for_backward_bytes",
                        "memory.grad_bytes", "memory.optimizer_state_bytes",
                        "memory.val_saved_bytes", "val_peak_cuda_mib", "peak_cuda_mib",
                        "trainable_params", "profiler.breakdown_ms.forward",
                        "profiler.breakdown_ms.backward", "profiler.breakdown_ms.optimizer"]
            if c in runs and runs[c].notna().any()]
    if not by:
        runs = runs.assign(all="all")
        by = ["all"]
    keyed = runs.assign(**{k: runs[k].astype(str) for k in by})
    stats = keyed.groupby(by, sort=True)[cols].agg(["mean", "std"])
    table = pd.DataFrame(index=stats.index)
    for c in cols:
        mean, std = stats[(c, "mean")], stats[(c, "std")].fillna(0)
        table[c] = [f"{m:.4g} ± {s:.2g}" for m, s in zip(mean, std, strict=True)]
    table.insert(0, "runs", keyed.groupby(by, sort=True).size())
    table.insert(1, "completed", keyed.assign(ok=keyed.status == "completed")
                 .groupby(by, sort=True).ok.sum())
    return table.reset_index()


def _label(study, key_values: dict) -> str:
    if study in LABELS:
        key, names = LABELS[study]
        value = key_values.get(key)
        value = {"True": True, "False": False}.get(value, value)
        if value in names:
            rest = {k: v for k, v in key_values.items() if k != key}
            return names[value] + (f" ({_fmt(rest)})" if rest else "")
    return _fmt(key_values) or "all runs"


def _fmt(key_values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in key_values.items())


def plot_curves(runs: pd.DataFrame, curves: pd.DataFrame, by: list[str], out: Path) -> list[Path]:
    """One figure per study: train/loss per group, mean over seeds with a min-max band."""
    import io

    import matplotlib

    from .records import atomic_write_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    loss = curves[curves.name == "train/loss"]
    studies = runs["study"].fillna("runs").astype(str) if "study" in runs else \
        pd.Series("runs", index=runs.index)
    for study in sorted(studies.unique()):
        subset = runs[studies == study]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        groups = subset.groupby([subset[k].astype(str) for k in by], sort=True) if by \
            else [((), subset)]
        for key, group in groups:
            key = key if isinstance(key, tuple) else (key,)
            per_run = loss[loss.run.isin(group.run)].pivot_table(
                index="step", columns="run", values="value")
            if per_run.empty:
                continue
            mean = per_run.mean(axis=1)
            line, = ax.plot(mean.index, mean.values, lw=0.8,
                            label=_label(study, dict(zip(by, key, strict=True))))
            if per_run.shape[1] > 1:
                ax.fill_between(mean.index, per_run.min(axis=1), per_run.max(axis=1),
                                color=line.get_color(), alpha=0.2, lw=0)
        if len(loss) and loss.value.max() > 100 * max(loss.value.min(), 1e-12):
            ax.set_yscale("log")  # a run that blows up would flatten every other curve
        ax.set(xlabel="optimizer step", ylabel="train loss",
               title=f"{study}: loss per step (mean over seeds, band: min-max)")
        ax.legend()
        # a file name, whatever the study is called (with room for the temporary file's name)
        path = out / f"{path_safe(study, limit=200)}_loss.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
    return written


COST = (("seconds_per_step", "seconds per step (median)", 1.0),
        ("memory.saved_for_backward_bytes", "saved for backward (MiB)", 2**-20),
        ("memory.grad_bytes", ".grad (MiB)", 2**-20),
        ("memory.optimizer_state_bytes", "optimizer state (MiB)", 2**-20),
        ("memory.val_saved_bytes", "validation graph (MiB)", 2**-20))


def plot_cost(runs: pd.DataFrame, by: list[str], out: Path) -> list[Path]:
    """One figure per study: the per-job time and memory figures side by side, a bar per group
    (mean over seeds, the seeds as dots). These belong to each job, whatever ran before it in
    the process; peak RSS does not, so it is never plotted."""
    import io

    import matplotlib

    from .records import atomic_write_bytes

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(c, t, k) for c, t, k in COST
              if c in runs and runs[c].notna().any() and (runs[c].fillna(0) != 0).any()]
    if not panels or not by:
        return []
    written = []
    studies = runs["study"].fillna("runs").astype(str) if "study" in runs else \
        pd.Series("runs", index=runs.index)
    keys = [k for k in by if k != "seed"] or by
    for study in sorted(studies.unique()):
        subset = runs[studies == study]
        labels = subset[keys].astype(str).apply(
            lambda r: ",".join(f"{k.split('.')[-1]}={v}" for k, v in r.items()), axis=1)
        order = sorted(labels.unique())
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 0.5 * len(order)
                                                          + 1.8), squeeze=False)
        for ax, (col, title, scale) in zip(axes[0], panels, strict=True):
            values = [subset[labels == g][col].astype(float) * scale for g in order]
            ax.barh(range(len(order)), [v.mean() for v in values], color="tab:blue",
                    alpha=0.6)
            for i, v in enumerate(values):
                ax.plot(v, [i] * len(v), "k.", ms=4)
            ax.set_yticks(range(len(order)), order if ax is axes[0][0] else [""] * len(order))
            ax.set_title(title, fontsize=10)
            ax.invert_yaxis()
        fig.suptitle(f"{study}: per-job time and memory (bars: mean over seeds; dots: runs)")
        fig.tight_layout()
        path = out / f"{path_safe(study, limit=200)}_cost.png"
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)
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
    intact = runs[runs.status != "broken"]
    broken = runs[runs.status == "broken"]
    failed = intact[intact.status != "completed"]
    text = [f"# Summary of {path}", "",
            f"{len(runs)} runs{f' ({len(broken)} broken)' if len(broken) else ''}, "
            f"grouped by: {', '.join(by) or '-'}", ""]
    if len(intact):
        text += [group_table(intact, by).to_markdown(index=False), ""]
    else:
        text += ["No run's files parse: nothing to summarise.", ""]
    if len(failed):
        text += ["## Runs that did not complete", "",
                 failed[["run", "status", "error"]].to_markdown(index=False), ""]
    if len(broken):
        text += ["## Broken runs", "",
                 "Their files do not parse, so they are not in the table above. Re-running the "
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
        pngs += plot_cost(intact[intact.status == "completed"], by, out)
        if (curves.name == "probes/sharpness").any():  # sharpness against each run's 2/lr
            from .dynamics import plot_stability

            pngs.append(plot_stability(intact, curves[curves.run.isin(intact.run)], out))
        from .dashboard import write_summary_run

        # the TensorBoard run `summary`: seed bands and these PNGs
        write_summary_run(out, intact, curves, by, pngs)
    except OSError as e:
        where = e.filename or out
        raise UserError(f"cannot write the summary: {where}: "
                        f"{e.strerror or type(e).__name__}") from None
    return out, runs
