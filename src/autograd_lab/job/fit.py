"""Lightning's fit, the outcome classified in one place (completed, diverged, interrupted,
failed), where a run starts from (a fresh start, its own checkpoint, ckpt_path), and the
space reserved so a full disk still gets the record."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from autograd_lab.disk.formats import CHECKPOINT
from autograd_lab.disk.lock import open_own
from autograd_lab.errors import EXIT_INTERRUPTED, UserError, write_failure
from autograd_lab.job.build import Parts, ddp_environment
from autograd_lab.job.checkpoint import RunInterrupted
from autograd_lab.job.resumable import check_resumable, numerics_changed
from autograd_lab.job.rundir import check_run_dir


class WriteFailed(UserError):
    """The file system refused a write during the run (full, read-only, over quota, I/O)."""

    exit_code = 1


def fit_run(parts: Parts, ckpt_path, record: dict) -> None:
    """Run Lightning's fit and classify how it ended: completed, diverged, interrupted (a stop
    signal, saved at a step boundary; or a second Ctrl-C) or failed."""

    trainer = parts.trainer
    try:
        with ddp_environment(lambda: trainer):
            trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=ckpt_path)
    except RunInterrupted as e:
        record.update(status="interrupted", error=str(e), _exit_code=e.exit_code)
        return
    except BaseException as e:
        # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1)
        if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and trainer.interrupted):
            record.update(status="interrupted", error="interrupted by SIGINT",
                          _exit_code=EXIT_INTERRUPTED)
            return
        refused = write_failure(e, parts.run_dir)
        if refused is not None:  # a full disk: the last checkpoint and run.json stay as they were

            kept = ("the last checkpoint is kept: " if (parts.run_dir / CHECKPOINT).is_file()
                    else "")
            fix = ("make it writable" if "Read-only" in refused or "Permission" in refused
                   else "check the disk" if "Input/output" in refused else "free space")
            record["error"] = (f"{refused}; {kept}{fix} and run the same command again to "
                               f"continue")
            record["_write_failed"] = True
            return
        raise  # run() records what it was
    diverged = parts.recorder.diverged_at
    record["status"] = "diverged" if diverged is not None else "completed"
    record["stop_reason"] = stop_reason(trainer, parts.cfg, diverged)
    if diverged is not None:
        record["error"] = f"non-finite loss at step {diverged}"
    record["world_size"] = trainer.world_size
    record["device"] = str(trainer.strategy.root_device)


def stop_reason(trainer, cfg, diverged: int | None) -> str:
    from lightning.pytorch.callbacks import EarlyStopping

    if diverged is not None:
        return f"diverged: non-finite loss at step {diverged}"
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0:
            return (f"early_stopping: {cb.monitor} did not improve for {cb.wait_count} "
                    f"validations (patience {cb.patience}; best {float(cb.best_score):.6g}), "
                    f"stopped after epoch {cb.stopped_epoch} at step {trainer.global_step}")
    if 0 < cfg.trainer.max_steps <= trainer.global_step:
        return f"max_steps: reached trainer.max_steps={cfg.trainer.max_steps}"
    return f"max_epochs: {trainer.current_epoch} epochs done"


RESERVE = ".autograd_lab.reserve"  # disk.lock.OWN_FILES lists it too

RESERVE_BYTES = 1 << 20  # a run.json and the metrics.parquet of a long run with probes=full


def reserve_space(run_dir: Path) -> None:
    """Hold RESERVE_BYTES of the run directory's file system in RUN_DIR/.autograd_lab.reserve
    while the run trains: when the disk fills up, _write_record frees it first, so run.json and
    metrics.parquet are still written (a full disk ends `failed` with its record). Best effort:
    a disk already too full for it simply has no reserve."""

    try:
        fd = open_own(run_dir / RESERVE, os.O_RDWR | os.O_CREAT)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError:
        pass
    finally:
        os.close(fd)


def release_space(run_dir: Path) -> None:
    """Give the reserve back to the file system, for the run's last writes."""
    with contextlib.suppress(OSError):
        (run_dir / RESERVE).unlink(missing_ok=True)


def resume_point(cfg, run_dir: Path, config: dict,
                  clear: bool = True) -> tuple[Path | None, dict | None, dict | None]:
    """The checkpoint this run continues from, or None for a fresh start (which clears what an
    earlier attempt left in the run directory, so TensorBoard shows one curve)."""

    check_run_dir(run_dir)
    leftovers = [*run_dir.glob(".*.tmp"), *(run_dir / "checkpoints").glob(".*.tmp")]
    _check_removable(leftovers)
    for leftover in leftovers:
        leftover.unlink(missing_ok=True)  # a write killed half-way (we hold the lock: not live)
    path = run_dir / CHECKPOINT
    if cfg.get("ckpt_path"):  # an explicit checkpoint (e.g. one of ModelCheckpoint's files)
        path = Path(cfg.ckpt_path).expanduser()
        if not path.is_file():
            raise UserError(f"ckpt_path={cfg.ckpt_path}: no such file; give a checkpoint file "
                            f"(e.g. from {run_dir / 'checkpoints'}) or ckpt_path=null")
    if (cfg.resume or cfg.get("ckpt_path")) and path.is_file():
        ckpt = check_resumable(path, config, explicit=bool(cfg.get("ckpt_path")))
        resumed = {"from_step": ckpt["global_step"], "epoch": ckpt["epoch"],
                   "checkpoint": str(path)}
        changed = numerics_changed(ckpt)
        if changed:  # continue, but say so and record it: the curve will not be bitwise
            resumed["bitwise"] = False
            resumed["changed"] = changed
            what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            print(f"autograd-lab: note: resuming {run_dir} with {what}: the rest of the curve "
                  f"will not be bitwise equal to an uninterrupted run (recorded in run.json)",
                  file=sys.stderr)
        return path, resumed, ckpt
    if clear:  # only files this harness writes: never a folder of the user's
        stale = [*run_dir.glob("events.out.tfevents.*"), run_dir / "hparams.yaml",
                 run_dir / "run.json", run_dir / "csv" / "metrics.csv",
                 run_dir / "csv" / "hparams.yaml",
                 *(run_dir / "profiler").glob("*.pt.trace.json*"),  # the profiler's old traces
                 *(run_dir / "checkpoints").glob("last.ckpt"),
                 # the layout before events moved into the run directory itself
                 *(run_dir / "tb").glob("events.out.tfevents.*"),
                 *(run_dir / "tb").glob("*.pt.trace.json*"), run_dir / "tb" / "hparams.yaml"]
        _check_removable(stale)  # a read-only csv/ (say) stops the run before anything goes
        for path in stale:
            if os.path.lexists(path):  # a read-only folder refuses even an absent file's unlink
                path.unlink(missing_ok=True)
        for folder in (run_dir / "tb", run_dir / "csv", run_dir / "checkpoints",
                       run_dir / "profiler"):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if now empty
    return None, None, None


def _check_removable(paths) -> None:
    """WriteFailed (one line naming the folder, exit 1) if a folder holding one of `paths`
    will not let it be removed (a read-only file system, no write permission), checked before
    any is removed: the earlier run's checkpoint, run.json and metrics.parquet stay whole."""
    for folder in dict.fromkeys(p.parent for p in paths if os.path.lexists(p)):
        if os.access(folder, os.W_OK | os.X_OK):
            continue
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "Read-only file system" if read_only else "Permission denied"
        error = WriteFailed(f"cannot write into {folder}: {why}: nothing of the earlier run "
                            f"was removed (its checkpoint, run.json and metrics.parquet are "
                            f"kept); make it writable and run the same command again")
        error.leave_alone = True  # a sweep job writes no failed run.json over the kept one
        raise error
