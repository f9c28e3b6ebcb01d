"""What a run shows while it trains: Lightning's progress bar with the loss and images/s, or a
plain line every few seconds when no terminal watches."""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

# the atomic file writes live in files.py (torch-free, for `summarize`); the run's writers
# import them from here as before
from autograd_lab.run.messages import log
from autograd_lab.run.recorder import RunRecorder
from autograd_lab.text import fmt_number, number


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
        text += f", loss {number(recorder.last_loss)} (step {recorder._next_step - 1:,})"
    seconds = recorder.train_seconds + (time.perf_counter() - recorder._epoch_start
                                        if recorder._epoch_start is not None else 0.0)
    if seconds > 0:
        text += f", {number((recorder.train_images + recorder._images_pending) / seconds)} images/s"
    val = recorder.last_val
    if val is not None:
        text += f", val loss {number(val[0])}, val acc {number(val[1])}"
    return text


# ------------------------------------------------------------------ the progress bar
class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, with the last flushed loss and images/s beside validation's
    val/loss and val/acc. Redraws every `refresh_rate` steps, not every step."""

    def __init__(self, recorder: RunRecorder, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self.recorder = recorder

    def get_metrics(self, trainer, pl_module):
        """The bar's fields, none needing a host sync: the optimizer step, the last flushed
        loss (and its step), images/s, and the last validation's loss and accuracy."""

        rec = self.recorder
        metrics = {"step": f"{trainer.global_step:,}"}
        if math.isfinite(rec.last_loss):
            metrics["loss"] = f"{fmt_number(rec.last_loss)}@{rec._next_step - 1}"
        seconds = rec.train_seconds + (time.perf_counter() - rec._epoch_start
                                       if rec._epoch_start is not None else 0.0)
        images = rec.train_images + rec._images_pending
        if seconds > 0:
            metrics["img/s"] = f"{images / seconds:,.0f}"
        if rec.last_val is not None:
            metrics["val_loss"] = fmt_number(rec.last_val[0])
            metrics["val_acc"] = fmt_number(rec.last_val[1])
        return metrics
