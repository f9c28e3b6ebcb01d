"""One training run, from its config to its record: build the parts (job/build.py), fit
(job/fit.py), write the record (job/record.py), under the run lock and the stop signals. The
Hydra app (train.py) and the Python API call it through `autograd_lab.train.run`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import autograd_lab.job.messages as messages
from autograd_lab.config.targets import check_arguments, check_targets
from autograd_lab.disk.lock import RunLock, is_rank_zero
from autograd_lab.errors import error_text, write_failure
from autograd_lab.job.build import build_parts
from autograd_lab.job.checkpoint import RunInterrupted, StopSignals
from autograd_lab.job.fit import WriteFailed, fit_run, reserve_space, resume_point
from autograd_lab.job.messages import log, shown
from autograd_lab.job.record import new_record, write_record
from autograd_lab.job.rundir import group_choices, task_overrides


def quiet_libraries() -> None:
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
    quiet_libraries()

    check_targets(cfg)  # every path (the API too): no _target_ but a class of its kind is made
    check_arguments(cfg)  # and its arguments fit its signature, before anything is written
    import torch

    if threads or cfg.threads:  # set, not hoped: parallel jobs must not fight for the cores
        torch.set_num_threads(threads or cfg.threads)

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    rank_zero = is_rank_zero()  # DDP: the other ranks write no files of their own
    config = OmegaConf.to_container(cfg, resolve=True)
    lock = RunLock(run_dir) if rank_zero else contextlib.nullcontext()  # DDP: rank 0 writes
    with lock, StopSignals() as signals, _quiet_thread_write_errors():
        try:  # decided before anything is written: a bad checkpoint or run dir loses nothing
            ckpt_path, resumed, ckpt = resume_point(cfg, run_dir, config, clear=rank_zero)
        except RunInterrupted as e:  # a stop signal while a checkpoint is read: no record yet
            log.warning(f"autograd-lab: {shown(run_dir)}: {e}; run the same command again")
            raise SystemExit(e.exit_code) from None
        if rank_zero:
            reserve_space(run_dir)  # so a full disk still gets run.json and metrics.parquet
        if rank_zero:
            messages.starting(run_dir, resumed)
        load = messages.busy_machine(torch.get_num_threads()) if rank_zero else None
        record = new_record(config, resumed, load, task_overrides(), group_choices())
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
    if signals.requested and rank_zero:  # a signal while the record was written: noted then,
        raise SystemExit(128 + signals.requested)  # obeyed now (a sweep stops here)
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
