"""What a run and a sweep say: a few lines at the start and the end of each run, plain progress
lines when no terminal is watching, and the end-of-sweep table.

Everything goes through the `autograd_lab` logger. Under the CLI, Hydra's job logging
(conf/hydra/job_logging/autograd_lab.yaml) sends it to stderr and to the run's own log file
(`train.log` in the run directory); called from Python it stays silent unless the caller
configures logging (a notebook gets no stderr lines).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L

log = logging.getLogger("autograd_lab")


def _n(x, digits: int = 3) -> str:
    from .summary import fmt_number

    return fmt_number(x, digits)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get().mode.name == "MULTIRUN"
    except ValueError:  # not under Hydra (called from Python)
        return False


def shown(path: Path) -> str:
    """A path as a user would type it: relative to the current folder when it is inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def tensorboard_hint(run_dir: Path) -> str:
    from .cli import command_path

    return f"{command_path()} tensorboard {shown(run_dir)}"


def starting(run_dir: Path, resumed: dict | None) -> None:
    if resumed:
        log.info(f"autograd-lab: {shown(run_dir)}: resuming from step {resumed['from_step']} "
                 f"(epoch {resumed['epoch']}, {shown(resumed['checkpoint'])})")
    else:
        log.info(f"autograd-lab: {shown(run_dir)}: starting")


def skipped_line(run_dir: Path) -> str:
    return (f"autograd-lab: {shown(run_dir)}: skipped, already completed with this config "
            f"(resume=false runs it again)")


def skipped(run_dir: Path) -> None:
    log.info(skipped_line(run_dir))


def ended(record: dict, run_dir: Path) -> None:
    """The end of a run in a few lines: status, steps, losses, speed, time, where it is."""
    status = record.get("status")
    final = record.get("final") or {}
    steps = final.get("steps")
    where = shown(run_dir)
    if status == "interrupted":  # the record's error says the signal, the step and the save
        error = str(record.get("error") or "interrupted")
        if "checkpoint" in error:
            log.warning(f"autograd-lab: {where}: {error}")
        else:
            log.warning(f"autograd-lab: {where}: {error} at step {steps}; the same command "
                        f"continues from the last checkpoint")
        return
    if status == "failed":  # a sweep names the job; a single run says it as any error
        log.error(f"autograd-lab: {where}: failed: {record.get('error')}" if _in_sweep()
                  else f"autograd-lab: error: {record.get('error')}")
        return
    losses = (f"train loss {_n(final.get('train_loss'))} (best "
              f"{_n(final.get('best_train_loss'))}), val loss {_n(final.get('val_loss'))}, "
              f"val acc {_n(final.get('val_acc'))}")
    took = f"{steps:,} steps in {_duration(record.get('wall_seconds') or 0.0)}"
    if _in_sweep():  # one line a job: the sweep's end says where TensorBoard is
        log.info(f"autograd-lab: {where}: {status}, {took}, {losses}"
                 + (f" ({record.get('error')})" if status == "diverged" else ""))
        return
    lines = [f"autograd-lab: {where}: {status}, {took}"
             + (f" ({_n(record.get('images_per_s'))} images/s, "
                f"{_n(1000 * record['seconds_per_step'])} ms/step)"
                if record.get("seconds_per_step") else "")]
    if status == "diverged":
        lines.append(f"  {record.get('error')}: the curve is kept up to step {steps - 1}")
    lines += [f"  {losses}", f"  tensorboard: {tensorboard_hint(run_dir)}"]
    log.info("\n".join(lines))


class ProgressLines(L.Callback):
    """When no terminal is watching (a file, a pipe, a cluster job): one plain line every
    `every_s` seconds instead of a bar, with the latest flushed loss (no extra host sync)."""

    def __init__(self, recorder, every_s: float = 30.0):
        self.recorder, self.every_s = recorder, every_s
        self._next = None

    def on_train_start(self, trainer, pl_module):
        self._next = time.perf_counter() + self.every_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._next is None or now < self._next:
            return
        self._next = now + self.every_s
        log.info(f"  {progress_text(trainer, self.recorder)}")


def progress_text(trainer, recorder) -> str:
    """step k/N, epoch, the last flushed loss and its step, images/s, the last validation."""
    total = trainer.max_steps if trainer.max_steps > 0 else \
        trainer.estimated_stepping_batches
    text = f"step {trainer.global_step:,}/{int(total):,}, epoch {trainer.current_epoch}"
    if math.isfinite(recorder.last_loss):
        text += f", loss {_n(recorder.last_loss)} (step {recorder._next_step - 1:,})"
    seconds = recorder.train_seconds + (time.perf_counter() - recorder._epoch_start
                                        if recorder._epoch_start is not None else 0.0)
    if seconds > 0:
        text += f", {_n((recorder.train_images + recorder._images_pending) / seconds)} images/s"
    val = recorder.last_val
    if val is not None:
        text += f", val loss {_n(val[0])}, val acc {_n(val[1])}"
    return text


def sweep_table(runs, by: list[str]) -> str:
    """One row per run of a finished sweep: its swept keys, status, losses, accuracy, time."""
    rows = []
    for _, r in runs.sort_values("run").iterrows():
        rows.append({"run": r.run, "status": r.status,
                     "train loss": _n(r.get("train_loss")), "val loss": _n(r.get("val_loss")),
                     "val acc": _n(r.get("val_acc")),
                     "time": _duration(r["wall_seconds"]) if _finite(r.get("wall_seconds"))
                     else "-"})
    import pandas as pd

    return pd.DataFrame(rows).to_string(index=False)


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
