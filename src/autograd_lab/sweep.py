"""Multirun glue: the end-of-sweep summary (a Hydra callback) and skipping finished jobs.

Also the checks that say whether a run directory's outputs parse (`read_run_json`,
`metrics_problem`): a run counts as completed only if they do. Cheap on purpose (no torch, no
pandas): the metrics file is checked by its Parquet footer (schema and row count), not read.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

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
    lock.ForeignEntry, one line naming it (train, skip checks and summaries alike)."""
    from .lock import check_entries, open_own

    check_entries(run_dir)
    path = Path(run_dir) / "run.json"
    try:  # a symlink, FIFO, device or folder there: lock.ForeignEntry (one line), never a hang
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
    from .lock import open_own

    path = Path(run_dir) / "metrics.parquet"
    try:  # a symlink, FIFO, device or folder there: lock.ForeignEntry (one line), never a hang
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
        from .config import clip

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
    else (a symlink, a FIFO, ...: lock.check_entries)."""
    from . import RUN_FORMAT_VERSION
    from .config import UserError
    from .lock import check_entries

    check_entries(run_dir)
    record, _ = read_run_json(run_dir)
    if record is None:  # none, or broken: the run writes a new one
        return
    version = record.get("format_version", 0)
    if isinstance(version, int) and version > RUN_FORMAT_VERSION:
        raise UserError(f"{run_dir} was written by a newer autograd-lab (format_version="
                        f"{version}; this one writes {RUN_FORMAT_VERSION}): upgrade, or use "
                        f"another run directory")


# ---------------------------------------------------------------- one folder per run of a sweep
_IDENTITIES: dict = {}  # (job folder, file, its mtime and size) -> (identity key, status)


def _folder_identity(folder: Path) -> tuple[str, str | None] | None:
    """(identity key, status) of the run in a sweep's job folder: from its run.json's config,
    else (a job killed before writing one) Hydra's .hydra/config.yaml; None if neither reads."""
    from .config import identity_key

    for name in ("run.json", ".hydra/config.yaml"):
        path = folder / name
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.is_file() or path.is_symlink():  # never read a FIFO, device or link
            continue
        stamp = (str(folder), name, st.st_mtime_ns, st.st_size)
        if stamp not in _IDENTITIES:
            try:
                if name == "run.json":
                    record, _ = read_run_json(folder)
                    config, status = record["config"], record.get("status")
                else:
                    from omegaconf import OmegaConf

                    config, status = OmegaConf.load(path), None
                _IDENTITIES[stamp] = (identity_key(config), status)
            except Exception:  # unreadable, or no config in it: not this run
                _IDENTITIES[stamp] = None
        if _IDENTITIES[stamp] is not None:
            return _IDENTITIES[stamp]
    return None


def job_folder(name: str, _root_) -> str:
    """A sweep job's folder (conf/train.yaml hydra.sweep.subdir, resolved by Hydra as the job
    starts): the folder of the sweep that already holds a run of this job's result-relevant
    config (config.identity_key), so the job IS that run (skipped if completed, continued if
    interrupted) whatever spelling made it (seed=0 typed where it is the default, threads=2);
    else the name from its overrides (config.path_safe)."""
    from omegaconf import OmegaConf

    from .config import identity_key, path_safe

    own = path_safe(name)
    try:
        sweep_dir = Path(str(_root_.hydra.sweep.dir))
        key = identity_key(OmegaConf.masked_copy(_root_, [k for k in _root_ if k != "hydra"]))
        folders = [d for d in sweep_dir.iterdir() if d.is_dir() and not d.is_symlink()
                   and d.name != "summary" and not d.name.startswith(".")]
    except Exception:  # no sweep folder yet, or a config that does not resolve: its own name
        return own
    same = {}
    for d in sorted(folders):
        found = _folder_identity(d)
        if found is not None and found[0] == key:
            same[d.name] = found[1]
    if not same or own in same:
        return own
    return next((n for n, status in same.items() if status == "completed"), next(iter(same)))


def _register_job_folder() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("autograd_lab_job_dir", job_folder, replace=True)


_register_job_folder()


def finished_record(run_dir: Path, config: dict) -> dict | None:
    """The run.json of a job that already completed with exactly this resolved config and whose
    outputs parse (run.json, and metrics.parquet with every step); None: run it (again)."""
    from .config import comparable

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


class OwnFilesCallback(Callback):
    """Before Hydra writes its files (.hydra/, train.log, multirun.yaml) into a run or sweep
    folder: one holding a symlink, FIFO, device or the wrong kind of entry where a file of
    Hydra's or the harness's goes is refused in one line, exit 2, nothing written
    (lock.check_entries). The CLI and `python -m autograd_lab.train` alike; the run checks
    again when it takes the lock (a job folder made after this check)."""

    def on_run_start(self, config, **kwargs) -> None:
        from .lock import check_entries

        _refuse(lambda: check_entries(Path(config.hydra.run.dir)))

    def on_multirun_start(self, config, **kwargs) -> None:
        from .lock import check_sweep_dir

        _refuse(lambda: check_sweep_dir(Path(config.hydra.sweep.dir)))


def _refuse(check) -> None:
    """Run a check; its UserError is one line and exit 2 (Hydra would print a traceback). A
    folder name that does not resolve is left to Hydra, which reports it."""
    from omegaconf.errors import OmegaConfBaseException

    from .config import UserError

    try:
        check()
    except OmegaConfBaseException:
        return
    except UserError as e:
        print(f"autograd-lab: error: {e}", file=sys.stderr)
        sys.exit(2)


class PreflightCallback(Callback):
    """`python -m autograd_lab.train` gets the checks `autograd-lab train` makes, before Hydra
    makes any directory (Hydra calls on_run_start and on_multirun_start first): every job's
    values, files and `_target_`s (config.check_overrides), one line each, exit 2. Under the
    CLI, which checked already, and in the other ranks of a DDP job, it does nothing."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, multirun=False)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, multirun=True)

    @staticmethod
    def _check(config, multirun: bool) -> None:
        from hydra.core.singleton import Singleton

        from . import config as checks
        from .lock import is_rank_zero  # torch-free: this runs before the job imports torch

        if checks.CHECKED_BY_CLI or not is_rank_zero():
            return
        if config.hydra.job.config_name != "train":  # a config of the user's: its targets
            job = {k: v for k, v in config.items() if k != "hydra"}
            try:
                checks.check_targets(job)
            except checks.UserError as e:
                print(f"autograd-lab: error: {e}", file=sys.stderr)
                sys.exit(2)
            return
        state = Singleton.get_state()  # check_overrides composes with Hydra's own compose API
        try:
            overrides = list(config.hydra.overrides.task)
            checks.check_overrides(overrides, multirun)
            if not multirun and any(o.lstrip("+").startswith("ckpt_path=") for o in overrides):
                from .checkpoint import check_ckpt_path_override  # torch: only for ckpt_path=

                check_ckpt_path_override(overrides)
        except checks.UserError as e:
            for line in str(e).splitlines() or [""]:
                print(f"autograd-lab: error: {line}", file=sys.stderr)
            sys.exit(2)
        finally:
            Singleton.set_state(state)  # the running app's Hydra, as it was


class SummaryCallback(Callback):
    """When a multirun ends: write summary/, say where things are, list runs that failed, were
    killed or whose files do not parse (broken), and exit non-zero if any did (a diverged run is
    a result, not a failure). A summary that cannot be written is an error: one line, exit 1."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from .config import error_text
        from .summary import summarize_runs

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            out, runs = summarize_runs(sweep_dir)
        except Exception as e:  # UserError (unwritable, a newer run inside), or a bug
            reason = error_text(e)
            reason = reason.strip().splitlines()[0] if reason.strip() else type(e).__name__
            print(f"autograd-lab: error: no summary written for {sweep_dir}: {reason}",
                  file=sys.stderr)
            sys.exit(1)
        from .messages import sweep_table, tensorboard_hint

        print(f"\n{sweep_table(runs, runs.attrs.get('swept', []))}")
        print(f"\nsummary: {out / 'summary.md'} (runs.csv, runs.parquet, curves.parquet, "
              f"{', '.join(p.name for p in sorted(out.glob('*.png')))})")
        print(f"tensorboard: {tensorboard_hint(sweep_dir)}")
        bad = runs[runs.status.isin(["failed", "interrupted", "broken"])]
        for _, row in bad.iterrows():
            print(f"{row.status}: {row.run}: {row.error}", file=sys.stderr)
        if len(bad):
            sys.exit(1)
