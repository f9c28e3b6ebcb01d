"""The Hydra app: config -> data, model, variants, module, callbacks, trainer -> fit -> run record.

This is the one place that wires objects together. Torch and Lightning are imported inside
`run`, so `--help` and `--cfg job` stay fast.

    autograd-lab train [overrides]          python -m autograd_lab.train [overrides]
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from autograd_lab.config.keys import CONF_PACKAGE
from autograd_lab.config.schema import validate
from autograd_lab.config.targets import refuse_running_code
from autograd_lab.errors import EXIT_USER_ERROR, UserError, error_text, report
from autograd_lab.job.messages import skipped
from autograd_lab.job.rundir import (
    finished_record,
    group_choices,
    record_failure,
    task_overrides,
)
from autograd_lab.sweep.slurm_queue import SlurmJob


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="train")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    slurm = None
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # a job of hydra/launcher=slurm
        slurm = SlurmJob.current(hc)
    try:
        validate(cfg)

        if cfg.resume:
            done = finished_record(run_dir, OmegaConf.to_container(cfg, resolve=True))
            if done is not None:
                skipped(run_dir)
                return done
        parallel = _parallel_launcher(hc)
        if parallel and slurm is None:  # a joblib/submitit worker ends with the sweep that
            from autograd_lab.job.distributed import (
                die_with_parent,  # started it (SLURM ends its own jobs)
            )

            die_with_parent()
        if slurm is not None:
            slurm.started(run_dir)
        try:  # threads: one per CPU SLURM gave the job; one per job of a local parallel sweep
            record = run(cfg, run_dir, progress_bar=_progress_mode(cfg, hc),
                         threads=cfg.threads or (slurm.cpus if slurm is not None else
                                                 (1 if parallel else None)))
        except SystemExit as e:
            if slurm is not None and e.code not in (0, None):  # a stop signal, record written:
                slurm.finished(run_dir, e.code)  # job ids into run.json; requeue if it asks
            if parallel and e.code not in (0, None):  # stopped by a signal, record written:
                logging.shutdown()                    # a pool worker would live on idle
                os._exit(e.code if isinstance(e.code, int) else 1)
            raise
        if slurm is not None:
            record["slurm"] = slurm.finished(run_dir)
        return record
    except UserError as e:
        if not getattr(e, "reported", False):  # else the run's end line said it already
            report(e)
        if not multirun:
            sys.exit(getattr(e, "exit_code", EXIT_USER_ERROR))
        if not getattr(e, "leave_alone", False):  # another process's folder, or a planted file
            _record_failure(run_dir, cfg, str(e))
    except Exception as e:  # in a sweep the job is recorded as failed and the sweep goes on
        if not multirun:
            raise
        if not getattr(e, "reported", False):
            print(f"autograd-lab: job failed: {run_dir}: {error_text(e)}", file=sys.stderr)
        _record_failure(run_dir, cfg, error_text(e))
    if slurm is not None:  # a failed job: its ids into run.json, never requeued
        slurm.finished(run_dir)
    return None


def _record_failure(run_dir: Path, cfg, error: str) -> None:
    """A sweep job that failed before run() could record it (a bad value, an incompatible
    checkpoint) still gets a run.json (job.rundir.record_failure), so the summary says failed,
    not killed."""
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable value is what failed
        config = OmegaConf.to_container(cfg, resolve=False)
    record_failure(run_dir, config, error, task_overrides(), group_choices())


def _parallel_launcher(hc) -> bool:
    """Jobs of this multirun run side by side (joblib, submitit): one torch thread each."""
    target = str(hc.launcher.get("_target_", "BasicLauncher"))
    return hc.mode.name == "MULTIRUN" and "BasicLauncher" not in target


def _progress_mode(cfg, hc) -> str | bool:
    """True: Lightning's bar; "lines": a plain line every log.progress_every_s (no terminal is
    watching); False: nothing between the start and end lines (parallel sweep jobs)."""
    if cfg.trainer.progress_bar != "auto":
        return bool(cfg.trainer.progress_bar)
    if _parallel_launcher(hc):
        return False
    return True if sys.stderr.isatty() else "lines"


def run(cfg: DictConfig, run_dir: Path | str, progress_bar: bool = False, callbacks=(),
        threads: int | None = None) -> dict:
    """Train one configuration into `run_dir` and return its run record (also run.json).

    `callbacks` are extra Lightning callbacks (notebooks and tests use them to look inside).
    `progress_bar`: True (Lightning's bar), "lines" (a plain line every log.progress_every_s)
    or False. `threads` sets torch's intra-op threads (default: cfg.threads, else torch's own).
    The work is job/runner.py's: imported here, when a run starts, so that `--help`, `--cfg job`
    and the one-line errors of a bad value never import torch."""
    from autograd_lab.job.runner import run as run_job

    return run_job(cfg, run_dir, progress_bar=progress_bar, callbacks=callbacks, threads=threads)


if __name__ == "__main__":
    try:  # before Hydra parses it (--experimental-rerun) or makes its callbacks
        refuse_running_code(sys.argv[1:])
    except UserError as e:
        print(f"autograd-lab: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()
