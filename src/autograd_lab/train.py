"""The Hydra app: config -> data, model, variants, module, callbacks, trainer -> fit -> run record.

This is the one place that wires objects together. Torch and Lightning are imported inside
`run`, so `--help` and `--cfg job` stay fast.

    autograd-lab train [overrides]          python -m autograd_lab.train [overrides]
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from autograd_lab.config.keys import CONF_PACKAGE
from autograd_lab.config.schema import validate
from autograd_lab.disk.formats import RUN_FORMAT_VERSION, newer_format
from autograd_lab.errors import EXIT_USER_ERROR, UserError, error_text, report, write_failure


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="train")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    slurm = None
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # a job of hydra/launcher=slurm
        from autograd_lab.sweep.slurm_queue import SlurmJob

        slurm = SlurmJob.current(hc)
    try:
        validate(cfg)
        from autograd_lab.job.rundir import finished_record

        if cfg.resume:
            done = finished_record(run_dir, OmegaConf.to_container(cfg, resolve=True))
            if done is not None:
                from autograd_lab.job.messages import skipped

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
    checkpoint) still gets a run.json, so the summary says failed, not killed. A record that
    run() wrote, or one a newer version wrote, is left as it is."""
    from autograd_lab.disk.files import write_json
    from autograd_lab.disk.lock import is_rank_zero
    from autograd_lab.job.build import group_choices, task_overrides

    if not is_rank_zero():
        return
    from autograd_lab.disk.lock import ForeignEntry
    from autograd_lab.job.rundir import read_run_json

    try:
        old, _ = read_run_json(run_dir)  # None for a missing or broken record
    except ForeignEntry:  # a symlink, FIFO, ... where a file of ours goes: leave it all alone
        return
    if old is not None:
        if old.get("ended") or newer_format(old) is not None:
            return
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable value is what failed
        config = OmegaConf.to_container(cfg, resolve=False)
    write_json(run_dir / "run.json", {"format_version": RUN_FORMAT_VERSION, "status": "failed",
                                      "error": error,
                                      "config": config, "overrides": task_overrides(),
                                      "choices": group_choices()})


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


def _quiet_libraries() -> None:
    # the profiler's C++ start-up lines (kineto's USDT markers, "gpuGetDeviceCount failed" on a
    # CPU machine) and c10's warnings: read from the environment when torch loads or the
    # profiler starts (the CLI sets them before importing torch); a user's own setting wins
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # The checkpoint carries the data position and the datamodule restores it (job/checkpoint.py)
    if "SLURM_JOB_ID" not in os.environ:  # srun installed but this is no SLURM job: no hint
        warnings.filterwarnings("ignore", message=".*The `srun` command is available on your "
                                "system but is not used.*")
    # ModelCheckpoint under manual optimisation saves the state after the step: exactly the state
    # a resumed run continues from (tests/test_lightning.py resumes from such a file)
    warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization.*")
    # a resumed run without a callback its checkpoint has state for: check_resumable lets only
    # the ones that change no curve go missing (config.keys.RESUME_FREE_KEYS: ModelCheckpoint)
    warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to "
                            "be provided.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not "
                            "empty.*")  # a resumed run's csv/ folder: rewritten on resume
    for name in ("lightning.pytorch", "lightning.fabric", "lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(cfg: DictConfig, run_dir: Path | str, progress_bar: bool = False, callbacks=(),
        threads: int | None = None) -> dict:
    """Train one configuration into `run_dir` and return its run record (also run.json).

    `callbacks` are extra Lightning callbacks (notebooks and tests use them to look inside).
    `progress_bar`: True (Lightning's bar), "lines" (a plain line every log.progress_every_s)
    or False. What the run says at its start and end goes to the `autograd_lab` logger.
    `threads` sets torch's intra-op threads (default: cfg.threads, else torch's own).
    Three steps: build the parts from the config, fit (the outcome classified in one place),
    write the record. An interrupted run exits 128 + the signal after writing its record.
    """
    _quiet_libraries()
    from autograd_lab.config.targets import check_arguments, check_targets
    from autograd_lab.job.build import build_parts, group_choices, task_overrides
    from autograd_lab.job.fit import WriteFailed, fit_run, reserve_space, resume_point
    from autograd_lab.job.record import versions, write_record

    check_targets(cfg)  # every path (the API too): no _target_ but a class of its kind is made
    check_arguments(cfg)  # and its arguments fit its signature, before anything is written
    import torch

    if threads or cfg.threads:  # set, not hoped: parallel jobs must not fight for the cores
        torch.set_num_threads(threads or cfg.threads)
    from autograd_lab.disk.lock import RunLock, is_rank_zero
    from autograd_lab.job.checkpoint import RunInterrupted, StopSignals

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    rank_zero = is_rank_zero()  # DDP: the other ranks write no files of their own
    config = OmegaConf.to_container(cfg, resolve=True)
    lock = RunLock(run_dir) if rank_zero else contextlib.nullcontext()  # DDP: rank 0 writes
    with lock, StopSignals() as signals, _quiet_thread_write_errors():
        try:  # decided before anything is written: a bad checkpoint or run dir loses nothing
            ckpt_path, resumed, ckpt = resume_point(cfg, run_dir, config, clear=rank_zero)
        except RunInterrupted as e:  # a stop signal while a checkpoint is read: no record yet
            from autograd_lab.job.messages import log, shown

            log.warning(f"autograd-lab: {shown(run_dir)}: {e}; run the same command again")
            raise SystemExit(e.exit_code) from None
        if rank_zero:
            reserve_space(run_dir)  # so a full disk still gets run.json and metrics.parquet
        import autograd_lab.job.messages as messages

        if rank_zero:
            messages.starting(run_dir, resumed)
        load = messages.busy_machine(torch.get_num_threads()) if rank_zero else None
        record: dict = {"format_version": RUN_FORMAT_VERSION, "status": "failed", "error": None,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config,
                        **({"load": load} if load else {}),
                        **({"resumed": resumed} if resumed else {}),
                        "overrides": task_overrides(), "choices": group_choices(),
                        "versions": versions()}
        parts = None
        try:
            parts = build_parts(cfg, run_dir, record, resumed, signals, callbacks, progress_bar,
                           loaded=(ckpt_path, ckpt) if ckpt else None)
            fit_run(parts, ckpt_path, record)
        except RunInterrupted as e:  # a stop signal before training (making the data, the
            record.update(status="interrupted", error=str(e),  # model): nothing to save yet
                          _exit_code=e.exit_code)
        except BaseException as e:  # building or fitting failed: the record says what it was, and
            record["error"] = error_text(e)  # so does the end line
            e.reported = rank_zero and not record.get("_write_failed")  # by run.messages.ended
            raise
        finally:
            signals.finishing = True  # a late signal must not cut the last writes short
            write_record(parts, record, run_dir, t0, rank_zero)
            if rank_zero and not record.get("_write_failed"):
                messages.ended(record, run_dir)
    if record.get("_write_failed"):
        unwritten = record.get("_unwritten")
        raise WriteFailed(record["error"] + (f" ({' and '.join(unwritten)} not updated: the "
                                             f"previous ones are kept)" if unwritten else ""))
    if record["status"] == "interrupted":
        # rank 0 reports; another rank exits 0 so Lightning's process observer leaves rank 0
        # alone while it writes the record
        raise SystemExit(record.pop("_exit_code") if rank_zero else 0)
    return record


@contextlib.contextmanager
def _quiet_thread_write_errors():
    """TensorBoard's writer thread prints a traceback when the disk fills; the training thread
    meets the same error at its next write and reports it in one line. Keep the thread quiet
    about refused writes (threading.excepthook), and only those."""
    import threading

    previous = threading.excepthook

    def hook(args):
        if write_failure(args.exc_value) is None:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


if __name__ == "__main__":
    from autograd_lab.config.targets import refuse_running_code

    try:  # before Hydra parses it (--experimental-rerun) or makes its callbacks
        refuse_running_code(sys.argv[1:])
    except UserError as e:
        print(f"autograd-lab: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()
