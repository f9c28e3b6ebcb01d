"""The Hydra app: config -> data, model, variants, module, callbacks, trainer -> fit -> run record.

This is the one place that wires objects together. Torch and Lightning are imported inside
`run`, so `--help` and `--cfg job` stay fast.

    autograd-lab train [overrides]          python -m autograd_lab.train [overrides]
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import RUN_FORMAT_VERSION, __version__
from .config import CONF_PACKAGE, UserError, flatten, validate

# Job directories are named from the overrides; a path value must not nest them.
# With no overrides the name is "defaults": `autograd-lab train` always lands in runs/defaults.
OmegaConf.register_new_resolver("path_safe", lambda s: str(s).replace("/", "%2F") or "defaults",
                                replace=True)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="train")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode.name == "MULTIRUN"
    try:
        validate(cfg)
        from .sweep import finished_record

        if cfg.resume:
            done = finished_record(run_dir, OmegaConf.to_container(cfg, resolve=True))
            if done is not None:
                print(f"skip {run_dir}: already completed with this config (resume=false to "
                      f"run it again)", file=sys.stderr)
                return done
        parallel = _parallel_launcher(hc)
        return run(cfg, run_dir, progress_bar=_progress_bar_wanted(cfg, hc),
                   threads=cfg.threads or (1 if parallel else None))
    except UserError as e:
        print(f"autograd-lab: error: {e}", file=sys.stderr)
        if not multirun:
            sys.exit(EXIT_USER_ERROR)
        _record_failure(run_dir, cfg, str(e))
    except Exception as e:  # in a sweep the job is recorded as failed and the sweep goes on
        if not multirun:
            raise
        print(f"autograd-lab: job failed: {run_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        _record_failure(run_dir, cfg, f"{type(e).__name__}: {e}")
    return None


def _record_failure(run_dir: Path, cfg, error: str) -> None:
    """A sweep job that failed before run() could record it (a bad value, an incompatible
    checkpoint) still gets a run.json, so the summary says failed, not killed. A record that
    run() wrote, or one a newer version wrote, is left as it is."""
    from .distributed import is_rank_zero
    from .records import write_json

    path = run_dir / "run.json"
    if not is_rank_zero():
        return
    try:
        import json

        old = json.loads(path.read_text())
        if old.get("ended") or old.get("format_version", 0) > RUN_FORMAT_VERSION:
            return
    except (OSError, ValueError, AttributeError):
        pass
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable value is what failed
        config = OmegaConf.to_container(cfg, resolve=False)
    write_json(path, {"format_version": RUN_FORMAT_VERSION, "status": "failed", "error": error,
                      "config": config, "overrides": _overrides(), "choices": _choices()})


def _parallel_launcher(hc) -> bool:
    """Jobs of this multirun run side by side (joblib, submitit): one torch thread each."""
    target = str(hc.launcher.get("_target_", "BasicLauncher"))
    return hc.mode.name == "MULTIRUN" and "BasicLauncher" not in target


def _progress_bar_wanted(cfg, hc) -> bool:
    if cfg.trainer.progress_bar != "auto":
        return bool(cfg.trainer.progress_bar)
    return sys.stderr.isatty() and not _parallel_launcher(hc)


def _quiet_libraries() -> None:
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # The checkpoint carries the data position and the datamodule restores it (checkpoint.py)
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run(cfg: DictConfig, run_dir: Path, progress_bar: bool = False, callbacks=(),
        threads: int | None = None) -> dict:
    """Train one configuration into `run_dir` and return its run record (also run.json).

    `callbacks` are extra Lightning callbacks (notebooks and tests use them to look inside).
    `threads` sets torch's intra-op threads (default: cfg.threads, else torch's own).
    """
    _quiet_libraries()
    import lightning as L
    import torch

    if threads or cfg.threads:  # set, not hoped: parallel jobs must not fight for the cores
        torch.set_num_threads(threads or cfg.threads)

    from .checkpoint import AtomicCheckpointIO, Checkpointer, RunInterrupted
    from .data import CIFARDataModule
    from .distributed import is_rank_zero, strategy
    from .models import build_model
    from .module import Classifier
    from .records import (
        RunRecorder,
        StepProgressBar,
        peak_rss_mib,
        reset_peak_rss,
        write_json,
        write_parquet,
    )
    from .variants import detach_at, freeze, frozen_batchnorms

    t0 = time.perf_counter()
    config = OmegaConf.to_container(cfg, resolve=True)
    # decided before anything is written: a bad checkpoint or run dir loses nothing
    rank_zero = is_rank_zero()  # DDP: the other ranks write no files of their own
    ckpt_path, resumed, ckpt = _resume_point(cfg, run_dir, config, clear=rank_zero)
    record: dict = {"format_version": RUN_FORMAT_VERSION, "status": "failed", "error": None,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "config": config, **({"resumed": resumed} if resumed else {}),
                    "overrides": _overrides(), "choices": _choices(), "versions": _versions()}
    recorder = trainer = module = None
    probes: list = []
    profiler: list = []
    hooks = []
    sigint = signal.getsignal(signal.SIGINT)  # Lightning sets it to ignore after a Ctrl-C
    sigterm = signal.getsignal(signal.SIGTERM)

    def _stop(signum, frame):  # until training starts; then the Checkpointer takes over
        raise RunInterrupted(signum, None, saved=False)

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _stop)
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        L.seed_everything(cfg.seed, verbose=False)
        datamodule = CIFARDataModule(cfg.data, cfg.seed, cfg.trainer.steps_per_execution)
        datamodule.tensors = _load_data(cfg)  # fail on data problems before any file is written
        model = build_model(cfg.model)
        report = freeze(model, cfg.train.freeze)
        record["params"] = {"trainable": report.trainable_params, "frozen": report.frozen_params,
                            "frozen_names": report.frozen}
        if cfg.train.detach_at:
            handle, det = detach_at(model, cfg.train.detach_at, torch.zeros(1, 3, 32, 32))
            hooks.append(handle)
            record["detach"] = {"module": det.module, "upstream_params": det.upstream_params,
                                "upstream_names": det.upstream}
        frozen_bn = frozen_batchnorms(model) if cfg.train.freeze_bn_stats else []
        module = Classifier(model, cfg.optim, cfg.train.zero_grad, cfg.eval.grad_mode, frozen_bn,
                            max_steps=cfg.trainer.max_steps)

        recorder = RunRecorder(run_dir, cfg.log.flush_every_s)
        recorder.purge_step = resumed["from_step"] if resumed else None  # TensorBoard drops
        # the killed attempt's events from the resumed step on
        probes = _probes(cfg, recorder)
        profiler = _profiler(cfg, run_dir, recorder)
        checkpointer = Checkpointer(run_dir, cfg.checkpoint.every_n_steps, record["config"],
                                    recorder, datamodule)
        callbacks = [recorder, *probes, *profiler, *callbacks]
        if progress_bar:
            callbacks.append(StepProgressBar(recorder))
        callbacks.append(checkpointer)  # last: at a step's end the other rows are complete
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
            strategy=strategy(cfg, find_unused=bool(cfg.train.detach_at)),
            deterministic=cfg.trainer.deterministic,
            # max_steps is the module's (it stops there and validates): Lightning's own makes
            # its loops restart from an epoch-end checkpoint one epoch too far
            max_epochs=cfg.trainer.max_epochs, max_steps=-1,
            check_val_every_n_epoch=cfg.trainer.check_val_every_n_epoch,
            limit_val_batches=cfg.trainer.limit_val_batches,
            callbacks=callbacks, logger=False, enable_checkpointing=False,
            enable_progress_bar=progress_bar, enable_model_summary=False,
            num_sanity_val_steps=0, inference_mode=False, default_root_dir=str(run_dir),
            plugins=[AtomicCheckpointIO(loaded=(ckpt_path, ckpt) if ckpt else None)])
        with _ddp_environment(lambda: trainer):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        signal.signal(signal.SIGTERM, sigterm)  # training is over: a late SIGTERM is not ours
        record["world_size"] = trainer.world_size
        record["status"] = "diverged" if recorder.diverged_at is not None else "completed"
        if recorder.diverged_at is not None:
            record["error"] = f"non-finite loss at step {recorder.diverged_at}"
        record["device"] = str(trainer.strategy.root_device)
    except UserError as e:
        record["error"] = str(e)
        raise
    except RunInterrupted as e:
        record["status"], record["error"] = "interrupted", str(e)
        # rank 0 reports; another rank exits 0 so Lightning's process observer leaves rank 0
        # alone while it writes the record
        raise SystemExit(e.exit_code if rank_zero else 0) from None
    except BaseException as e:
        # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1)
        interrupted = isinstance(e, KeyboardInterrupt) or (
            isinstance(e, SystemExit) and trainer is not None and trainer.interrupted)
        record["status"] = "interrupted" if interrupted else "failed"
        record["error"] = "interrupted by SIGINT" if interrupted else f"{type(e).__name__}: {e}"
        if interrupted:
            raise SystemExit(EXIT_INTERRUPTED) from None
        raise
    finally:
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigterm)
        if recorder is not None and trainer is not None and module is not None:
            recorder.flush(trainer, module)  # losses still on the device are kept, too
        for h in hooks:
            h.remove()
        if recorder is not None:
            recorder.flush_sources()
            record.update(_results(recorder, t0))
            if profiler:
                profiler[0].stop(module)  # idempotent: a failed run still writes its tables
                record["profiler"] = profiler[0].summary
            if probes:
                record["probes"] = {"mode": cfg.probes.mode,
                                    "frozen_max_change": probes[0].frozen_max_change}
            if recorder.writer is not None and record["status"] != "interrupted":
                recorder.write_hparams(_hparams(cfg), record["final"])  # the resumed run will
            if rank_zero:
                write_parquet(run_dir / "metrics.parquet", recorder.frame())
            recorder.close()
        record["wall_seconds"] = time.perf_counter() - t0
        record["peak_rss_mib"] = peak_rss_mib()
        if torch.cuda.is_available():
            record["peak_cuda_mib"] = max(torch.cuda.max_memory_allocated() / 2**20,
                                          module.cuda_peak_mib if module is not None else 0.0)
        record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if rank_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_json(run_dir / "run.json", record)
    return record


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
    import contextlib

    from .checkpoint import CHECKPOINT, check_resumable
    from .sweep import check_run_dir

    check_run_dir(run_dir)
    path = run_dir / CHECKPOINT
    if cfg.resume and path.is_file():
        ckpt = check_resumable(path, config)
        meta = ckpt["callbacks"]["Checkpointer"]["autograd_lab"]
        return path, {"from_step": ckpt["global_step"], "epoch": meta["data"]["epoch"],
                      "checkpoint": str(path)}, ckpt
    if clear:  # only files this harness writes: never a folder of the user's
        stale = [*(run_dir / "tb").glob("events.out.tfevents.*"), run_dir / "run.json",
                 *(run_dir / "checkpoints").glob("last.ckpt"),
                 *(run_dir / "checkpoints").glob(".last.ckpt.*.tmp")]
        for path in stale:
            path.unlink(missing_ok=True)
        for folder in (run_dir / "tb", run_dir / "checkpoints"):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if now empty
    return None, None, None


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
    return [TorchProfiler(run_dir, recorder, **options)]


def _load_data(cfg):
    from .data import load_split_tensors

    return load_split_tensors(cfg.data)


def _results(recorder, t0: float) -> dict:
    val_s = recorder.val_seconds
    return {"final": recorder.final_metrics(), "images_per_s": recorder.images_per_s,
            "train_seconds": recorder.train_seconds,
            "val_seconds": val_s[-1] if val_s else None,
            "val_seconds_total": sum(val_s),
            "seconds_per_step": recorder.train_seconds / max(recorder.final_metrics()["steps"], 1),
            "val_peak_mib": max(recorder.val_peak_mib) if recorder.val_peak_mib else None}


def _hparams(cfg) -> dict:
    flat = flatten(OmegaConf.to_container(cfg, resolve=True),
                   lambda v: v if isinstance(v, (int, float, str, bool)) else str(v))
    skip = ("data.root", "resume", "trainer.progress_bar", "log.", "threads", "probes.",
            "profiler.")
    return {k: v for k, v in flat.items() if not k.startswith(skip)}


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
    main()
