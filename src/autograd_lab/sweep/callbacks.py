"""Multirun glue: the end-of-sweep summary (a Hydra callback) and skipping finished jobs.

Also the checks that say whether a run directory's outputs parse (`read_run_json`,
`metrics_problem`): a run counts as completed only if they do. Cheap on purpose (no torch, no
pandas): the metrics file is checked by its Parquet footer (schema and row count), not read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback

import autograd_lab.config.preflight as preflight
from autograd_lab.config.keys import identity_key, path_safe
from autograd_lab.config.targets import check_targets
from autograd_lab.disk.lock import check_entries, check_sweep_dir, is_rank_zero
from autograd_lab.errors import UserError, report
from autograd_lab.job.resumable import check_ckpt_path_override
from autograd_lab.job.rundir import read_run_json

# ---------------------------------------------------------------- one folder per run of a sweep
_IDENTITIES: dict = {}  # (job folder, file, its mtime and size) -> (identity key, status)


def _folder_identity(folder: Path) -> tuple[str, str | None] | None:
    """(identity key, status) of the run in a sweep's job folder: from its run.json's config,
    else (a job killed before writing one) Hydra's .hydra/config.yaml; None if neither reads."""

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
    config (config.keys.identity_key), so the job IS that run (skipped if completed, continued if
    interrupted) whatever spelling made it (seed=0 typed where it is the default, threads=2);
    else the name from its overrides (config.keys.path_safe)."""
    from omegaconf import OmegaConf


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


class OwnFilesCallback(Callback):
    """Before Hydra writes its files (.hydra/, train.log, multirun.yaml) into a run or sweep
    folder: one holding a symlink, FIFO, device or the wrong kind of entry where a file of
    Hydra's or the harness's goes is refused in one line, exit 2, nothing written
    (disk.lock.check_entries). The CLI and `python -m autograd_lab.train` alike; the run checks
    again when it takes the lock (a job folder made after this check)."""

    def on_run_start(self, config, **kwargs) -> None:

        _refuse(lambda: check_entries(Path(config.hydra.run.dir)))

    def on_multirun_start(self, config, **kwargs) -> None:

        _refuse(lambda: check_sweep_dir(Path(config.hydra.sweep.dir)))


def _refuse(check) -> None:
    """Run a check; its UserError is one line and exit 2 (Hydra would print a traceback). A
    folder name that does not resolve is left to Hydra, which reports it."""
    from omegaconf.errors import OmegaConfBaseException


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
    values, files and `_target_`s (config.preflight.check_overrides), one line each, exit 2.
    Under the CLI, which checked already, and in the other ranks of a DDP job, it does nothing."""

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config, multirun=False)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, multirun=True)

    @staticmethod
    def _check(config, multirun: bool) -> None:
        from hydra.core.singleton import Singleton

        if preflight.CHECKED_BY_CLI or not is_rank_zero():
            return
        if config.hydra.job.config_name != "train":  # a config of the user's: its targets
            job = {k: v for k, v in config.items() if k != "hydra"}
            try:
                check_targets(job)
            except UserError as e:
                print(f"autograd-lab: error: {e}", file=sys.stderr)
                sys.exit(2)
            return
        state = Singleton.get_state()  # check_overrides composes with Hydra's own compose API
        try:
            overrides = list(config.hydra.overrides.task)
            preflight.check_overrides(overrides, multirun)
            if not multirun and any(o.lstrip("+").startswith("ckpt_path=") for o in overrides):
                check_ckpt_path_override(overrides)
        except UserError as e:
            report(e)
            sys.exit(2)
        finally:
            Singleton.set_state(state)  # the running app's Hydra, as it was
