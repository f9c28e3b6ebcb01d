"""The Hydra app: config -> data, model, variants, module, callbacks, trainer -> fit -> run record.

This is the one place that wires objects together. Torch and Lightning are imported inside
`run`, so `--help` and `--cfg job` stay fast.

    autograd-lab train [overrides]          python -m autograd_lab.train [overrides]
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import RUN_FORMAT_VERSION, __version__
from .config import CONF_PACKAGE, UserError, error_text, validate, write_failure

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="train")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    slurm = None
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":  # a job of hydra/launcher=slurm
        from .slurm import SlurmJob

        slurm = SlurmJob.current(hc)
    try:
        validate(cfg)
        from .sweep import finished_record

        if cfg.resume:
            done = finished_record(run_dir, OmegaConf.to_container(cfg, resolve=True))
            if done is not None:
                from .messages import skipped

                skipped(run_dir)
                return done
        parallel = _parallel_launcher(hc)
        if parallel and slurm is None:  # a joblib/submitit worker ends with the sweep that
            from .distributed import die_with_parent  # started it (SLURM ends its own jobs)

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
            for line in str(e).splitlines() or [""]:
                print(f"autograd-lab: error: {line}", file=sys.stderr)
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
    from .lock import is_rank_zero
    from .records import write_json

    if not is_rank_zero():
        return
    from .lock import ForeignEntry
    from .sweep import read_run_json

    try:
        old, _ = read_run_json(run_dir)  # None for a missing or broken record
    except ForeignEntry:  # a symlink, FIFO, ... where a file of ours goes: leave it all alone
        return
    if old is not None:
        version = old.get("format_version", 0)
        if old.get("ended") or (isinstance(version, int) and version > RUN_FORMAT_VERSION):
            return
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable value is what failed
        config = OmegaConf.to_container(cfg, resolve=False)
    write_json(run_dir / "run.json", {"format_version": RUN_FORMAT_VERSION, "status": "failed",
                                      "error": error,
                                      "config": config, "overrides": _overrides(),
                                      "choices": _choices()})


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
    # The checkpoint carries the data position and the datamodule restores it (checkpoint.py)
    if "SLURM_JOB_ID" not in os.environ:  # srun installed but this is no SLURM job: no hint
        warnings.filterwarnings("ignore", message=".*The `srun` command is available on your "
                                "system but is not used.*")
    # ModelCheckpoint under manual optimisation saves the state after the step: exactly the state
    # a resumed run continues from (tests/test_lightning.py resumes from such a file)
    warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization.*")
    # a resumed run without a callback its checkpoint has state for: check_resumable lets only
    # the ones that change no curve go missing (config.RESUME_FREE_KEYS: ModelCheckpoint)
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
    from .config import check_arguments, check_targets

    check_targets(cfg)  # every path (the API too): no _target_ but a class of its kind is made
    check_arguments(cfg)  # and its arguments fit its signature, before anything is written
    import torch

    if threads or cfg.threads:  # set, not hoped: parallel jobs must not fight for the cores
        torch.set_num_threads(threads or cfg.threads)
    from .checkpoint import RunInterrupted, StopSignals
    from .lock import RunLock, is_rank_zero

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    rank_zero = is_rank_zero()  # DDP: the other ranks write no files of their own
    config = OmegaConf.to_container(cfg, resolve=True)
    lock = RunLock(run_dir) if rank_zero else contextlib.nullcontext()  # DDP: rank 0 writes
    with lock, StopSignals() as signals, _quiet_thread_write_errors():
        try:  # decided before anything is written: a bad checkpoint or run dir loses nothing
            ckpt_path, resumed, ckpt = _resume_point(cfg, run_dir, config, clear=rank_zero)
        except RunInterrupted as e:  # a stop signal while a checkpoint is read: no record yet
            from .messages import log, shown

            log.warning(f"autograd-lab: {shown(run_dir)}: {e}; run the same command again")
            raise SystemExit(e.exit_code) from None
        if rank_zero:
            _reserve_space(run_dir)  # so a full disk still gets run.json and metrics.parquet
        from . import messages

        if rank_zero:
            messages.starting(run_dir, resumed)
        load = messages.busy_machine(torch.get_num_threads()) if rank_zero else None
        record: dict = {"format_version": RUN_FORMAT_VERSION, "status": "failed", "error": None,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config,
                        **({"load": load} if load else {}),
                        **({"resumed": resumed} if resumed else {}),
                        "overrides": _overrides(), "choices": _choices(),
                        "versions": _versions()}
        parts = None
        try:
            parts = _build(cfg, run_dir, record, resumed, signals, callbacks, progress_bar,
                           loaded=(ckpt_path, ckpt) if ckpt else None)
            _fit(parts, ckpt_path, record)
        except RunInterrupted as e:  # a stop signal before training (making the data, the
            record.update(status="interrupted", error=str(e),  # model): nothing to save yet
                          _exit_code=e.exit_code)
        except BaseException as e:  # building or fitting failed: the record says what it was, and
            record["error"] = error_text(e)  # so does the end line
            e.reported = rank_zero and not record.get("_write_failed")  # by messages.ended
            raise
        finally:
            signals.finishing = True  # a late signal must not cut the last writes short
            _write_record(parts, record, run_dir, t0, rank_zero)
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


class WriteFailed(UserError):
    """The file system refused a write during the run (full, read-only, over quota, I/O)."""

    exit_code = 1


class _Parts:
    """What `_build` made from the config and `_fit` and `_write_record` use."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _build(cfg, run_dir: Path, record: dict, resumed: dict | None, signals, extra_callbacks,
           progress_bar: bool, loaded) -> _Parts:
    """Data, model and its variants, module, loggers and callbacks from the config -> Trainer."""
    import lightning as L
    import torch

    from .checkpoint import AtomicCheckpointIO, Checkpointer
    from .data import CIFARDataModule, load_split_tensors
    from .distributed import strategy
    from .models import build_model
    from .module import Classifier
    from .records import RunRecorder, StepProgressBar, reset_peak_rss
    from .variants import detach_at, freeze, frozen_batchnorms

    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    L.seed_everything(cfg.seed, verbose=False)
    # fail on data problems before any file is written
    datamodule = CIFARDataModule(cfg.data, cfg.seed, tensors=load_split_tensors(cfg.data))
    model = build_model(cfg.model)
    report = freeze(model, cfg.train.freeze)
    record["params"] = {"trainable": report.trainable_params, "frozen": report.frozen_params,
                        "frozen_names": report.frozen}
    hooks = []
    if cfg.train.detach_at:
        handle, det = detach_at(model, cfg.train.detach_at, torch.zeros(1, 3, 32, 32))
        hooks.append(handle)
        record["detach"] = {"module": det.module, "upstream_params": det.upstream_params,
                            "upstream_names": det.upstream}
    frozen_bn = frozen_batchnorms(model) if cfg.train.freeze_bn_stats else []
    from .checkpoint import numerics

    module = Classifier(model, cfg.optim, cfg.train.zero_grad, cfg.eval.grad_mode, frozen_bn,
                        scheduler=_scheduler(cfg),
                        meta={"config": record["config"], "numerics": numerics()})
    user_callbacks = _callbacks(cfg, run_dir)
    loggers = _loggers(cfg, run_dir, purge_step=resumed["from_step"] if resumed else None)

    recorder = RunRecorder(run_dir, cfg.log.flush_every_s, hparams=_hparams(cfg),
                           resumed_from=resumed["from_step"] if resumed else None,
                           log_lr_every_step=cfg.scheduler.name != "none")
    if resumed:  # what other callbacks wrote to a CSV log before the kill (LearningRateMonitor)
        recorder.read_killed_csv(loggers)
    recorder.whole_run = {"trainable_params": report.trainable_params,
                          "frozen_params": report.frozen_params}
    recorder.layout = _layout(cfg)
    recorder.hparams_differ = _varied_keys()
    probes = _probes(cfg, recorder)
    profiler = _profiler(cfg, run_dir, recorder)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.every_n_steps, signals, recorder)
    from .memory import MemoryFigures

    memory = MemoryFigures()
    recorder.memory = memory.figures  # whole-run HParams metrics, filled by the first steps
    from .graph import TensorBoardGraph  # the backward graph, once (not again on a resume)

    graph = TensorBoardGraph(recorder, resumed=resumed is not None)  # after the probes' hooks
    callbacks = [recorder, memory, *probes, *profiler, graph, *user_callbacks, *extra_callbacks]
    if progress_bar == "lines":
        from .messages import ProgressLines

        callbacks.append(ProgressLines(recorder, cfg.log.progress_every_s))
    elif progress_bar:
        callbacks.append(StepProgressBar(recorder))
    callbacks.append(checkpointer)  # a Checkpoint callback: Lightning calls it after the others
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        strategy=strategy(cfg, find_unused=bool(cfg.train.detach_at)),
        deterministic=cfg.trainer.deterministic,
        max_epochs=cfg.trainer.max_epochs, max_steps=cfg.trainer.max_steps,
        check_val_every_n_epoch=cfg.trainer.check_val_every_n_epoch,
        limit_val_batches=cfg.trainer.limit_val_batches,
        callbacks=callbacks, logger=loggers or False,
        enable_checkpointing=True,  # the Checkpointer is there: Lightning adds no default one
        enable_progress_bar=progress_bar is True, enable_model_summary=False,
        num_sanity_val_steps=0, inference_mode=False, default_root_dir=str(run_dir),
        log_every_n_steps=1,  # what callbacks log (LearningRateMonitor) shows every step
        plugins=[AtomicCheckpointIO(loaded=loaded)])
    return _Parts(trainer=trainer, module=module, datamodule=datamodule, recorder=recorder,
                  memory=memory, probes=probes, profiler=profiler, hooks=hooks, cfg=cfg,
                  run_dir=run_dir)


def _fit(parts: _Parts, ckpt_path, record: dict) -> None:
    """Run Lightning's fit and classify how it ended: completed, diverged, interrupted (a stop
    signal, saved at a step boundary; or a second Ctrl-C) or failed."""
    from .checkpoint import RunInterrupted

    trainer = parts.trainer
    try:
        with _ddp_environment(lambda: trainer):
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
            from .checkpoint import CHECKPOINT

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
    record["stop_reason"] = _stop_reason(trainer, parts.cfg, diverged)
    if diverged is not None:
        record["error"] = f"non-finite loss at step {diverged}"
    record["world_size"] = trainer.world_size
    record["device"] = str(trainer.strategy.root_device)


def _stop_reason(trainer, cfg, diverged: int | None) -> str:
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


def _write_record(parts: _Parts | None, record: dict, run_dir: Path, t0: float,
                  rank_zero: bool) -> None:
    """Flush what is left, write metrics.parquet and run.json (rank 0), whatever the outcome."""
    import torch

    from .records import peak_rss_mib, write_json, write_parquet

    if parts is not None:
        for h in parts.hooks:
            h.remove()
        recorder = parts.recorder
        try:
            recorder.flush(parts.trainer, parts.module)  # losses still on the device are kept
        except Exception as e:  # the loggers' files will not take it (Lightning's TensorBoard
            if write_failure(e) is None:  # logger re-raises an OSError as a ValueError):
                raise  # metrics.parquet still may
        record.update(_results(recorder, t0))
        record["memory"] = dict(parts.memory.figures)
        if parts.profiler:
            parts.profiler[0].stop(parts.module)  # idempotent: a failed run writes its tables
            record["profiler"] = parts.profiler[0].summary
        if parts.probes:
            record["probes"] = {"mode": parts.cfg.probes.mode,
                                "frozen_max_change": parts.probes[0].frozen_max_change}
            if parts.probes[0].gns_method_used:  # which noise-scale estimator ran
                record["probes"]["gns_method"] = parts.probes[0].gns_method_used
        if rank_zero:
            _release_space(run_dir)
            _write_or_say(write_parquet, run_dir / "metrics.parquet", recorder.frame(), record)
    record["wall_seconds"] = time.perf_counter() - t0
    # process-wide: in a sweep it includes earlier jobs of the same process (not per job)
    record["process_peak_rss_mib"] = peak_rss_mib()
    if torch.cuda.is_available():
        module_peak = parts.module.cuda_peak_mib if parts is not None else 0.0
        record["peak_cuda_mib"] = max(torch.cuda.max_memory_allocated() / 2**20, module_peak)
    record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if rank_zero:
        _release_space(run_dir)
        _write_or_say(write_json, run_dir / "run.json",
                      {k: v for k, v in record.items() if not k.startswith("_")}, record)


RESERVE = ".autograd_lab.reserve"  # lock.OWN_FILES lists it too
RESERVE_BYTES = 1 << 20  # a run.json and the metrics.parquet of a long run with probes=full


def _reserve_space(run_dir: Path) -> None:
    """Hold RESERVE_BYTES of the run directory's file system in RUN_DIR/.autograd_lab.reserve
    while the run trains: when the disk fills up, _write_record frees it first, so run.json and
    metrics.parquet are still written (a full disk ends `failed` with its record). Best effort:
    a disk already too full for it simply has no reserve."""
    from .lock import open_own

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


def _release_space(run_dir: Path) -> None:
    """Give the reserve back to the file system, for the run's last writes."""
    with contextlib.suppress(OSError):
        (run_dir / RESERVE).unlink(missing_ok=True)


def _write_or_say(write, path: Path, obj, record: dict) -> None:
    """Write a record file; if the file system refuses, keep the old one (the writes are atomic:
    a full disk never leaves half a file) and say so: within the run's error line when a write
    failure ended the run, else in a line of its own."""
    try:
        write(path, obj)
    except OSError as e:
        refused = write_failure(e)
        if refused is None:
            raise
        if record.get("_write_failed"):
            record.setdefault("_unwritten", []).append(path.name)
        else:
            print(f"autograd-lab: {refused} (the previous {path.name} is kept)", file=sys.stderr)


def _instantiate(node, what: str, base, **kwargs):
    """A Lightning callback or logger from a `_target_` node; one line if it is not one."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = node.get("_target_") if hasattr(node, "get") else None
    if not target:
        raise UserError(f"{what}: needs a _target_ (a Lightning {base.__name__} class path)")
    try:
        obj = instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{what}._target_={target}: cannot be made ({reason})") from None
    if not isinstance(obj, base):
        raise UserError(f"{what}._target_={target}: not a Lightning {base.__name__} "
                        f"(it is a {type(obj).__module__}.{type(obj).__qualname__})")
    return obj


def _callbacks(cfg, run_dir: Path) -> list:
    """The `callbacks` group: every Lightning callback it names, made by Hydra's instantiate."""
    import lightning as L

    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        extra = {}
        if hasattr(node, "keys") and "dirpath" in node and node.dirpath is None:
            extra["dirpath"] = str(run_dir / "checkpoints")  # ModelCheckpoint: beside ours
        out.append(_instantiate(node, f"callbacks.{name}", L.Callback, **extra))
    return out


def _loggers(cfg, run_dir: Path, purge_step: int | None) -> list:
    """The `logger` group: Lightning loggers writing into the run directory."""
    from lightning.pytorch.loggers import Logger

    out = []
    for name, node in (cfg.get("logger") or {}).items():
        extra = {"save_dir": str(run_dir)}
        if purge_step is not None and str(node.get("_target_", "")).endswith(
                "TensorBoardLogger"):
            extra["purge_step"] = purge_step  # TensorBoard drops the killed attempt's events
        out.append(_instantiate(node, f"logger.{name}", Logger, **extra))
    return out


def _scheduler(cfg):
    """(make(optimizer, total_steps), interval) for `scheduler=...`, or None."""
    sched = cfg.scheduler
    if sched.name == "none":
        return None
    from hydra.utils import instantiate

    horizon = sched.get("horizon")

    def make(optimizer, total_steps: int):
        partial = instantiate(sched.make)
        return partial(optimizer, **({horizon: total_steps} if horizon else {}))

    return make, sched.interval


_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class _ddp_environment:
    """Lightning's DDP launcher sets rank variables in this process's environment; put them back
    after the fit, or the next job of a sweep would think it was launched as a rank."""

    def __init__(self, trainer):
        self.trainer = trainer  # a callable: the trainer exists once the block runs

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in _DDP_ENV}

    def __exit__(self, *exc):
        import subprocess

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        # the other ranks end with the fit; wait for them so the next job of a sweep does not
        # overlap them (and end any that hang)
        for proc in getattr(getattr(self.trainer().strategy, "launcher", None), "procs", []):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _resume_point(cfg, run_dir: Path, config: dict,
                  clear: bool = True) -> tuple[Path | None, dict | None, dict | None]:
    """The checkpoint this run continues from, or None for a fresh start (which clears what an
    earlier attempt left in the run directory, so TensorBoard shows one curve)."""
    from .checkpoint import CHECKPOINT, check_resumable, numerics_changed
    from .sweep import check_run_dir

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


def _probes(cfg, recorder) -> list:
    if cfg.probes.mode == "off":
        return []
    from .probes import Probes

    options = {k: v for k, v in cfg.probes.items() if k != "mode"}
    return [Probes(recorder, cfg.probes.mode, zero_grad=cfg.train.zero_grad, **options)]


def _profiler(cfg, run_dir, recorder) -> list:
    if cfg.profiler.name == "off":
        return []
    from .profiling import TorchProfiler

    options = {k: v for k, v in cfg.profiler.items() if k != "name"}
    return [TorchProfiler(run_dir, recorder, trace_dir=run_dir / "profiler", **options)]


def _load_data(cfg):
    from .data import load_split_tensors

    return load_split_tensors(cfg.data)


def _results(recorder, t0: float) -> dict:
    import torch

    val_s = recorder.val_seconds
    return {"final": recorder.final_metrics(), "images_per_s": recorder.images_per_s,
            "train_seconds": recorder.train_seconds,
            "val_seconds": val_s[-1] if val_s else None,
            "val_seconds_total": sum(val_s),
            "seconds_per_step": recorder.seconds_per_step,
            "seconds_per_step_mean": recorder.train_seconds / max(
                recorder.final_metrics()["steps"], 1),
            **({"val_peak_cuda_mib": max(recorder.val_peak_mib)}
               if recorder.val_peak_mib and torch.cuda.is_available() else {})}


def _hparams(cfg) -> dict:
    """HParams: the keys that name the run (group choices, keys typed or swept)."""
    from .dashboard import identifying_hparams

    return identifying_hparams(cfg, _choices(), _overrides())


def _varied_keys() -> set:
    """The keys that name this run among others: in a sweep, the ones its job directory is
    named by (swept); for a single run, every key typed."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return set()
    keys = {o.split("=", 1)[0].lstrip("+~") for o in hc.overrides.task if "=" in o}
    if hc.mode.name == "MULTIRUN":
        keys -= set(hc.job.config.override_dirname.exclude_keys)
    return keys


def _layout(cfg) -> dict:
    from .dashboard import layout
    from .probes import STATS

    try:
        in_sweep = HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:
        in_sweep = False
    probes = cfg.probes
    return layout(probe_stats=STATS if probes.mode != "off" else (),
                  profiler=cfg.profiler.name != "off", in_sweep=in_sweep,
                  sharpness=probes.mode != "off" and bool(probes.get("sharpness_every_n_steps")),
                  noise_scale=probes.mode != "off" and bool(probes.get("gns_every_n_steps")))


def _choices() -> dict:
    """The config-group options this run was composed from (model, data, variant, ...)."""
    try:
        choices = HydraConfig.get().runtime.choices
    except ValueError:
        return {}
    return {k: v for k, v in choices.items() if not k.startswith("hydra")}


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra job (called from Python)
        return []


def _versions() -> dict:
    import hydra as _hydra
    import lightning
    import torch
    import torchvision

    return {"autograd_lab": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "hydra": _hydra.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "pid": os.getpid()}


if __name__ == "__main__":
    from .config import refuse_running_code

    try:  # before Hydra parses it (--experimental-rerun) or makes its callbacks
        refuse_running_code(sys.argv[1:])
    except UserError as e:
        print(f"autograd-lab: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    main()
