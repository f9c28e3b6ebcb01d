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

from autograd_lab.config.keys import GROUPS, comparable, flatten, is_result_key
from autograd_lab.disk.formats import RUN_FORMAT_VERSION, newer_format
from autograd_lab.disk.lock import OWN_DIRS
from autograd_lab.errors import UserError, clip
from autograd_lab.job.rundir import json_kind, metrics_problem, read_run_json
from autograd_lab.sweep.slurm_queue import read_marker, slurm_job_states

METRICS = ["train_loss", "best_train_loss", "val_loss", "val_acc", "val_step", "steps"]

NUMBERS = ["images_per_s", "seconds_per_step", "wall_seconds", "train_seconds", "val_seconds",
           "val_peak_cuda_mib", "peak_cuda_mib",
           "process_peak_rss_mib"]  # process-wide (a sweep's earlier jobs too): never compared

# runs that differ only in this key are one group: its mean and min-max band over the seeds
BAND_KEY = "seed"

LABELS = {"zero_grad_study": ("train.zero_grad", {True: "Zero gradients",
                                                  False: "No zero gradients"})}

# folders a run writes inside itself, never holding another run: find_runs does not walk them
RUN_INSIDE = {*OWN_DIRS, "summary", "__pycache__"} - {".hydra"}


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
    if newer_format(record) is not None:
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
    """A configuration's identity: its result-relevant keys (config.keys.comparable), as text."""
    import json


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
        is_key = col in GROUPS or ("." in col and col not in results)
        compared = is_result_key(col) and col != BAND_KEY
        if is_key and compared and known[col].astype(str).nunique() > 1:
            keys.append(col)
    # a group choice names what it sets: a key that varies exactly with one (variant and the
    # train.freeze it sets, data and data.name) is left out, and the choice kept
    text = {k: known[k].astype(str) for k in keys}
    choices = [k for k in keys if k in GROUPS]
    return [k for k in keys if k in GROUPS or not any(
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
