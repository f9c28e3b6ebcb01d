"""The run directory's format and its reader: run.json and metrics.parquet checked as they are
read, a finished record found for a skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig

from autograd_lab.config.keys import comparable
from autograd_lab.disk.files import write_json
from autograd_lab.disk.formats import RUN_FORMAT_VERSION, newer_format
from autograd_lab.disk.lock import ForeignEntry, check_entries, is_rank_zero, open_own
from autograd_lab.errors import UserError, clip

METRICS_COLUMNS = ("step", "epoch", "name", "value")


def json_kind(value) -> str:
    """What a JSON value is, in words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def read_run_json(run_dir: Path) -> tuple[dict | None, str | None]:
    """RUN_DIR/run.json as a dict: (record, None); (None, what is wrong, in plain words) when it
    does not parse or is not a JSON object; (None, None) when there is no run.json. A run
    directory where a file of the harness's is a symlink, FIFO, device or folder is not read:
    disk.lock.ForeignEntry, one line naming it (train, skip checks and summaries alike)."""

    check_entries(run_dir)
    path = Path(run_dir) / "run.json"
    try:  # a symlink, FIFO, device or folder there: disk.lock.ForeignEntry (one line), never a hang
        with os.fdopen(open_own(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"run.json cannot be read ({e.strerror or type(e).__name__})"
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, cut short, binary, not UTF-8, too deep
        what = "it is empty" if not data.strip() else "truncated or not JSON"
        return None, f"run.json does not parse ({what})"
    if not isinstance(record, dict):
        return None, (f"run.json is not a run record (it holds a JSON {json_kind(record)}, not an "
                      f"object)")
    return record, None


def metrics_problem(run_dir: Path, required: bool = True, steps=None) -> str | None:
    """What is wrong with RUN_DIR/metrics.parquet, in plain words, or None if it parses (its
    footer: schema and row count) and has the columns step, epoch, name, value. A missing file
    is a problem only if `required`; `steps` (run.json's final.steps, the train/loss rows) is the
    least number of rows it must hold."""

    path = Path(run_dir) / "metrics.parquet"
    try:  # a symlink, FIFO, device or folder there: disk.lock.ForeignEntry (one line), never a hang
        file = os.fdopen(open_own(path), "rb")
    except FileNotFoundError:
        return "metrics.parquet is missing" if required else None
    import pyarrow.parquet as pq

    try:
        with file:
            meta = pq.read_metadata(file)
        names = meta.schema.names
        rows = meta.num_rows
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, a folder of that name, ...

        reason = clip(str(e), 120) or type(e).__name__
        return f"metrics.parquet does not parse (truncated?): {reason}"
    missing = [c for c in METRICS_COLUMNS if c not in names]
    if missing:
        return f"metrics.parquet lacks the column{'s' * (len(missing) > 1)} {', '.join(missing)}"
    if isinstance(steps, int) and not isinstance(steps, bool) and rows < steps:
        return (f"metrics.parquet holds {rows} rows, fewer than the {steps} steps run.json "
                f"records (replaced or cut short?)")
    return None


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a run directory that a newer autograd-lab wrote: its files would be
    overwritten by an older shape; or one where a file or folder of the harness's is something
    else (a symlink, a FIFO, ...: disk.lock.check_entries)."""

    check_entries(run_dir)
    record, _ = read_run_json(run_dir)
    if record is None:  # none, or broken: the run writes a new one
        return
    if (version := newer_format(record)) is not None:
        raise UserError(f"{run_dir} was written by a newer autograd-lab (format_version="
                        f"{version}; this one writes {RUN_FORMAT_VERSION}): upgrade, or use "
                        f"another run directory")


def finished_record(run_dir: Path, config: dict) -> dict | None:
    """The run.json of a job that already completed with exactly this resolved config and whose
    outputs parse (run.json, and metrics.parquet with every step); None: run it (again)."""

    record, _ = read_run_json(run_dir)
    if record is None or record.get("status") != "completed":
        return None
    saved = record.get("config")
    if not isinstance(saved, dict) or comparable(saved) != comparable(config):
        return None
    final = record.get("final")
    steps = final.get("steps") if isinstance(final, dict) else None
    if metrics_problem(run_dir, required=True, steps=steps) is not None:
        return None
    return record


def final_metrics(frame) -> dict:
    """run.json's `final`: the last and best train loss, the last validation and its step, the
    number of steps, from a run's metrics (long format: step, epoch, name, value)."""
    out = {"train_loss": None, "best_train_loss": None, "val_loss": None, "val_acc": None,
           "val_step": None}
    losses = frame[frame.name == "train/loss"].value
    if len(losses):
        out["train_loss"] = float(losses.iloc[-1])
        out["best_train_loss"] = float(losses.min())
    for key in ("val_loss", "val_acc"):
        vals = frame[frame.name == key.replace("_", "/")]
        if len(vals):
            out[key] = float(vals.value.iloc[-1])
            # the steps done when it was measured: `steps` when the run validated at its
            # end, earlier when it did not (check_val_every_n_epoch, a diverged run)
            out["val_step"] = int(vals.step.iloc[-1])
    out["steps"] = len(losses)  # rows 0..n-1; a diverged run stops before the bad step
    return out


def group_choices() -> dict:
    """The config-group options this run was composed from (model, data, variant, ...)."""
    try:
        choices = HydraConfig.get().runtime.choices
    except ValueError:
        return {}
    return {k: v for k, v in choices.items() if not k.startswith("hydra")}


def task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (called from Python)
        return []


def record_failure(run_dir: Path, config: dict, error: str, overrides: list, choices: dict
                   ) -> None:
    """run.json `failed` for a job that failed before its run could record it (a bad value, an
    incompatible checkpoint): the summary then says failed, not killed. A record a run wrote,
    or one a newer version wrote, is left as it is; so is a folder with a foreign entry (a
    symlink, FIFO, ... where a file of ours goes). Rank 0 only."""
    if not is_rank_zero():
        return
    try:
        old, _ = read_run_json(run_dir)  # None for a missing or broken record
    except ForeignEntry:
        return
    if old is not None and (old.get("ended") or newer_format(old) is not None):
        return
    write_json(run_dir / "run.json", {"format_version": RUN_FORMAT_VERSION, "status": "failed",
                                      "error": error, "config": config, "overrides": overrides,
                                      "choices": choices})

