"""What a run shows while it trains: Lightning's progress bar with the loss and images/s, or a
plain line every few seconds when no terminal watches."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from autograd_lab.job.messages import log
from autograd_lab.job.recorder import RunRecorder
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
    now = recorder.progress()
    if now["loss"] is not None:
        text += f", loss {number(now['loss'])} (step {now['loss_step']:,})"
    if now["images_per_s"] is not None:
        text += f", {number(now['images_per_s'])} images/s"
    if (val := now["val"]) is not None:
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

        now = self.recorder.progress()
        metrics = {"step": f"{trainer.global_step:,}"}
        if now["loss"] is not None:
            metrics["loss"] = f"{fmt_number(now['loss'])}@{now['loss_step']}"
        if now["images_per_s"] is not None:
            metrics["img/s"] = f"{now['images_per_s']:,.0f}"
        if now["val"] is not None:
            metrics["val_loss"] = fmt_number(now["val"][0])
            metrics["val_acc"] = fmt_number(now["val"][1])
        return metrics
