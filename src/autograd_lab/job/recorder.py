"""The run's recorder: every-step curves to every logger (TensorBoard, CSV) and metrics.parquet.

Per-step values stay on the device as 0-d tensors until a flush (every `log.flush_every_s`
seconds, at each epoch's end and at the end of the run): one host sync per flush, not per step.
A flush writes the values to TensorBoard at their global steps and keeps them for
metrics.parquet, and is where a non-finite loss is noticed: the run stops there, the curve is
kept up to the last finite step, and the status becomes `diverged`.

Step numbering: `train/loss` at step k is the loss computed by the k-th optimizer step (0-based),
as index k of the seed's `loss_history`. Epoch-level values (`val/*`) sit at the number of
optimizer steps done when they were measured.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning as L

from autograd_lab.job.board import whole_run_metrics, write_hparams, write_layout


# ------------------------------------------------------------------ the recorder
class RunRecorder(L.Callback):
    """Collects every value the run measures, writes it in bulk to every Lightning logger of the
    trainer (TensorBoard, CSV, ...) and to metrics.parquet, and times the run.

    `hparams`: the run's identifying config keys, logged with the final metrics when the run ends
    (`log_hyperparams(params, metrics)`: TensorBoard's HParams tab)."""

    def __init__(self, run_dir: Path, flush_every_s: float = 0.5, hparams: dict | None = None,
                 resumed_from: int | None = None, log_lr_every_step: bool = False):
        self.run_dir = Path(run_dir)
        self.flush_every_s = flush_every_s
        self.hparams = hparams or {}
        self.whole_run: dict = {}  # more whole-run HParams metrics (parameter counts, ...)
        self.hparams_differ: set = set()  # the HParams keys the sweep varies: shown first
        self.memory: dict = {}  # observe.memory.MemoryFigures' exact byte counts, once measured
        self.step_seconds: list[float] = []  # wall time of each step after an epoch's first
        self.last_val: tuple[float, float] | None = None  # the last validation's loss, acc
        self._last_batch_end = None
        self.layout: dict | None = None  # the Custom Scalars layout, written on a fresh start
        self.rows: dict[str, list] = {"step": [], "epoch": [], "name": [], "value": []}
        self.loggers: list = []
        self.sources: list = []  # e.g. probes: objects with drain() -> [(step, epoch, values)]
        self.parquet_only: tuple[str, ...] = ()  # name prefixes kept for metrics.parquet only
        self.diverged_at: int | None = None
        self.train_seconds = 0.0
        self.train_images = 0
        self.val_seconds: list[float] = []
        self.val_peak_mib: list[float] = []
        self.last_loss = math.nan
        self.resumed_from = resumed_from  # loggers drop the killed attempt's rows from here
        self.log_lr_every_step = log_lr_every_step  # with a scheduler; else once an epoch
        self.lrs: list[float] = []  # the learning rate of each step not yet flushed
        self._killed_csv: dict[int, list[dict]] = {}  # read_killed_csv: {id(logger): rows}
        self._next_flush = 0.0
        self._next_step = 0
        self._epoch_start = None
        self._val_start = None
        self._images_pending = 0
        self._ddp_flush_every = 0
        self._world = 1
        self._trainer = self._module = None

    @property
    def writer(self):
        """The TensorBoard SummaryWriter of the first TensorBoardLogger (histograms, text), or
        None (logger=csv alone, or a DDP rank other than 0)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    # -- writing
    def log_values(self, step: int, epoch: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows["step"].append(step)
            self.rows["epoch"].append(epoch)
            self.rows["name"].append(name)
            self.rows["value"].append(float(value))
        values = self._for_loggers(values)
        for logger in self.loggers if values else ():
            logger.log_metrics(values, step)

    def _for_loggers(self, values: dict) -> dict:
        """All but the parquet-only values (the Hessian density's bins: a histogram in TB)."""
        if not self.parquet_only:
            return values
        return {k: v for k, v in values.items() if not k.startswith(self.parquet_only)}

    def flush(self, trainer=None, pl_module=None) -> None:
        """Per-step values from the device to the rows and loggers: one host sync."""
        trainer, pl_module = trainer or self._trainer, pl_module or self._module
        if trainer is None:
            return
        pending = pl_module.step_losses
        if pending:
            import torch

            values = torch.stack(pending)
            if trainer.world_size > 1:  # DDP: the curve is the global batch's loss
                values = trainer.strategy.reduce(values, reduce_op="mean")
            values = values.tolist()  # the one host sync
            lrs = self.lrs if len(self.lrs) == len(values) else [None] * len(values)
            pending.clear()
            self.lrs = []
            for k, (value, lr) in enumerate(zip(values, lrs, strict=True)):
                step = self._next_step
                if not math.isfinite(value):
                    self.diverged_at = step
                    trainer.should_stop = True
                    self._next_step += len(values) - k
                    break
                row = {"train/loss": value} if lr is None else {"train/loss": value, "lr": lr}
                self.log_values(step, trainer.current_epoch, row)
                self._next_step += 1  # per row: a Ctrl-C landing here keeps rows and count in step
                self.last_loss = value
        self.flush_sources()
        self._next_flush = time.perf_counter() + self.flush_every_s

    def flush_sources(self) -> None:
        for source in self.sources:  # after the loss: nothing past a divergence is kept
            for step, epoch, values in source.drain():
                if self.diverged_at is None or step < self.diverged_at:
                    self.log_values(step, epoch, values)

    # -- Lightning hooks
    def setup(self, trainer, pl_module, stage):
        self._trainer, self._module = trainer, pl_module
        self.loggers = list(trainer.loggers) if trainer.is_global_zero else []  # DDP: rank 0
        self._next_step = trainer.global_step
        # DDP flushes reduce across ranks, so they happen at the same steps on every rank
        self._world = trainer.world_size  # read once, not in every step's hook
        self._ddp_flush_every = 64 if self._world > 1 else 0

    def on_train_start(self, trainer, pl_module):
        if self.resumed_from is None:  # a resume keeps the layout its first attempt wrote
            if self.layout and self.writer is not None:

                write_layout(self.writer, self.layout)
            return
        if not self.loggers:
            return
        # Resumed: the rows restored from the checkpoint are the truth. TensorBoard purged the
        # killed attempt's events from the resumed step on (purge_step) and gets the restored
        # rows at or past it (the validation of an epoch-end checkpoint); a CSV file is
        # rewritten from all of them, with what other callbacks logged before the resumed step
        # (LearningRateMonitor's rates) kept from the killed attempt's file; other loggers get
        # the rows from the resumed step on.
        from lightning.pytorch.loggers import CSVLogger

        by_step: dict[int, dict] = {}
        for step, name, value in zip(self.rows["step"], self.rows["name"], self.rows["value"],
                                     strict=True):
            by_step.setdefault(step, {})[name] = value
        for logger in self.loggers:
            everything = isinstance(logger, CSVLogger)
            if everything:
                others = self._others_logged_before(self._killed_csv.get(id(logger), []))
                Path(logger.experiment.metrics_file_path).unlink(missing_ok=True)
                for step, values in others:
                    logger.log_metrics(values, step)
            for step, values in by_step.items():
                values = self._for_loggers(values)
                if values and (everything or step >= self.resumed_from):
                    logger.log_metrics(values, step)

    def read_killed_csv(self, loggers) -> None:
        """Keep the rows of each CSVLogger's file as the killed attempt left it, for a resume.
        Called before the fit: Lightning's CSV writer deletes the file when the logger's
        experiment is made, before any callback's setup."""
        import csv

        from lightning.pytorch.loggers import CSVLogger

        for logger in loggers:
            if isinstance(logger, CSVLogger):
                try:
                    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
                        self._killed_csv[id(logger)] = list(csv.DictReader(f))
                except (OSError, csv.Error, UnicodeDecodeError):
                    pass  # none, or unreadable: the recorder's own rows are still complete

    def _others_logged_before(self, rows: list[dict]) -> list[tuple[int, dict]]:
        """(step, values) of the killed attempt's CSV rows that other callbacks logged
        (LearningRateMonitor, a user's own) before the resumed step: the recorder's own values
        are rewritten from the checkpoint, the whole-run values at the end."""
        ours = set(self.rows["name"])
        out = []
        for row in rows:
            try:
                step = int(row.pop("step", ""))
            except ValueError:
                continue
            values = {k: float(v) for k, v in row.items()
                      if k and v not in ("", None) and k not in ours
                      and not k.startswith("whole_run/")}
            if step < self.resumed_from and values:
                out.append((step, values))
        return out

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = time.perf_counter()
        self._last_batch_end = None  # a step's time never includes validation or epoch ends
        if not self.log_lr_every_step:  # a constant learning rate: one point an epoch
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.log_values(trainer.global_step, trainer.current_epoch, {"lr": lr})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self.step_seconds.append(now - self._last_batch_end)
        self._last_batch_end = now
        self._images_pending += len(batch[1]) * self._world
        if self.log_lr_every_step:  # the rate this step used (the scheduler stepped after it)
            self.lrs.append(self._lr_used)
        if self._ddp_flush_every:
            if len(pl_module.step_losses) >= self._ddp_flush_every:
                self.flush(trainer, pl_module)
        elif time.perf_counter() >= self._next_flush:
            with pl_module.phase("logging"):
                self.flush(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.log_lr_every_step:
            self._lr_used = trainer.optimizers[0].param_groups[0]["lr"]

    def _close_train_interval(self, trainer, pl_module):
        self.flush(trainer, pl_module)
        if self._epoch_start is not None:
            self.train_seconds += time.perf_counter() - self._epoch_start
            self.train_images += self._images_pending
            self._epoch_start, self._images_pending = None, 0

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._close_train_interval(trainer, pl_module)
        self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.diverged_at is not None:  # Lightning still validates when stopping: not kept
            return
        elapsed = time.perf_counter() - self._val_start
        loss, acc = pl_module.val_metrics().tolist()
        self.last_val = (loss, acc)  # for the progress bar and lines
        self.val_seconds.append(elapsed)
        self.val_peak_mib.append(pl_module.val_peak_mib)
        self.log_values(trainer.global_step, trainer.current_epoch,
                        {"val/loss": loss, "val/acc": acc, "time/val_seconds": elapsed})

    def on_train_epoch_end(self, trainer, pl_module):
        self._close_train_interval(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._close_train_interval(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.flush(trainer, pl_module)  # before Lightning finalizes the loggers

    def teardown(self, trainer, pl_module, stage):
        """The run ended normally (completed, diverged, stopped early): HParams with the
        whole-run metrics, before Lightning finalizes the loggers."""
        self.flush(trainer, pl_module)
        from lightning.pytorch.loggers import TensorBoardLogger


        metrics = whole_run_metrics(self, self.whole_run)
        status = "diverged" if self.diverged_at is not None else "completed"
        step = max(self._next_step - 1, 0)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.hparams.update(self.hparams)  # Lightning's hparams.yaml beside the events
                write_hparams(logger.experiment, self.hparams, metrics, step, status,
                              differs=self.hparams_differ)
            else:  # CSVLogger and others: the params, and the values as one row
                logger.log_hyperparams({**self.hparams, "status": status})
                logger.log_metrics(metrics, step)
        self._trainer = self._module = None

    # -- checkpoints (Lightning stores a callback's state_dict and restores it on resume)
    def state_dict(self) -> dict:
        import torch

        self.flush()  # losses still on the device become rows: any checkpoint is complete
        names = list(dict.fromkeys(self.rows["name"]))
        code = {n: i for i, n in enumerate(names)}
        return {"step": torch.tensor(self.rows["step"], dtype=torch.int64),
                "epoch": torch.tensor(self.rows["epoch"], dtype=torch.int64),
                "names": names,
                "code": torch.tensor([code[n] for n in self.rows["name"]], dtype=torch.int64),
                "value": torch.tensor(self.rows["value"], dtype=torch.float64),
                "next_step": self._next_step, "last_loss": self.last_loss,
                "train_seconds": self.train_seconds, "train_images": self.train_images,
                "val_seconds": list(self.val_seconds), "val_peak_mib": list(self.val_peak_mib),
                "step_seconds": torch.tensor(self.step_seconds, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.rows = {"step": state["step"].tolist(), "epoch": state["epoch"].tolist(),
                     "name": [state["names"][i] for i in state["code"].tolist()],
                     "value": state["value"].tolist()}
        self._next_step, self.last_loss = state["next_step"], state["last_loss"]
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        self.val_seconds, self.val_peak_mib = state["val_seconds"], state["val_peak_mib"]
        if "step_seconds" in state:  # checkpoints from before it was kept have none
            self.step_seconds = state["step_seconds"].tolist()

    # -- results
    WARMUP_STEPS = 5  # the first steps an attempt times (allocator, caches): left out

    @property
    def seconds_per_step(self) -> float | None:
        """Median wall time of an optimizer step, the first WARMUP_STEPS timed steps left out
        (all of them when there are no more): the first job of a sweep, which pays the
        process's warm-up, is not slower on paper."""
        import statistics

        times = self.step_seconds
        times = times[self.WARMUP_STEPS:] if len(times) > self.WARMUP_STEPS else times
        return statistics.median(times) if times else None

    def progress(self) -> dict:
        """Where training stands, with no host sync (the progress bar and lines show it): the
        last flushed loss and its step, images/s so far, the last validation's (loss, acc)."""
        seconds = self.train_seconds + (time.perf_counter() - self._epoch_start
                                        if self._epoch_start is not None else 0.0)
        images = self.train_images + self._images_pending
        return {"loss": self.last_loss if math.isfinite(self.last_loss) else None,
                "loss_step": self._next_step - 1,
                "images_per_s": images / seconds if seconds > 0 else None, "val": self.last_val}

    @property
    def images_per_s(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds else 0.0

    def frame(self):
        import pandas as pd

        return pd.DataFrame({
            "step": pd.array(self.rows["step"], dtype="int64"),
            "epoch": pd.array(self.rows["epoch"], dtype="int64"),
            "name": pd.array(self.rows["name"], dtype="string"),
            "value": pd.array(self.rows["value"], dtype="float64")})
