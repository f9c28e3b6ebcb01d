"""The run's record: run.json (status, final metrics, cost, memory, versions) and
metrics.parquet, written atomically at the end of every run, however it ended."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from autograd_lab.disk.files import write_json, write_parquet
from autograd_lab.disk.formats import RUN_FORMAT_VERSION
from autograd_lab.errors import write_failure
from autograd_lab.job.build import Parts
from autograd_lab.job.fit import release_space
from autograd_lab.job.rundir import final_metrics
from autograd_lab.observe.memory import peak_rss_mib


def write_record(parts: Parts | None, record: dict, run_dir: Path, t0: float,
                  rank_zero: bool) -> None:
    """Flush what is left, write metrics.parquet and run.json (rank 0), whatever the outcome."""
    import torch


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
            release_space(run_dir)
            _write_or_say(write_parquet, run_dir / "metrics.parquet", recorder.frame(), record)
    record["wall_seconds"] = time.perf_counter() - t0
    # process-wide: in a sweep it includes earlier jobs of the same process (not per job)
    record["process_peak_rss_mib"] = peak_rss_mib()
    if torch.cuda.is_available():
        module_peak = parts.module.cuda_peak_mib if parts is not None else 0.0
        record["peak_cuda_mib"] = max(torch.cuda.max_memory_allocated() / 2**20, module_peak)
    record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if rank_zero:
        release_space(run_dir)
        _write_or_say(write_json, run_dir / "run.json",
                      {k: v for k, v in record.items() if not k.startswith("_")}, record)


def new_record(config: dict, resumed: dict | None, load: dict | None, overrides: list,
               choices: dict) -> dict:
    """A run's record as it starts: failed until its fit says otherwise."""
    return {"format_version": RUN_FORMAT_VERSION, "status": "failed", "error": None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config,
            **({"load": load} if load else {}), **({"resumed": resumed} if resumed else {}),
            "overrides": overrides, "choices": choices, "versions": versions()}


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


def _results(recorder, t0: float) -> dict:
    import torch

    val_s = recorder.val_seconds
    return {"final": final_metrics(recorder.frame()), "images_per_s": recorder.images_per_s,
            "train_seconds": recorder.train_seconds,
            "val_seconds": val_s[-1] if val_s else None,
            "val_seconds_total": sum(val_s),
            "seconds_per_step": recorder.seconds_per_step,
            "seconds_per_step_mean": recorder.train_seconds / max(
                final_metrics(recorder.frame())["steps"], 1),
            **({"val_peak_cuda_mib": max(recorder.val_peak_mib)}
               if recorder.val_peak_mib and torch.cuda.is_available() else {})}


def versions() -> dict:
    import hydra as _hydra
    import lightning
    import torch
    import torchvision

    return {"autograd_lab": version("autograd-lab"), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "lightning": lightning.__version__, "hydra": _hydra.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(), "pid": os.getpid()}
