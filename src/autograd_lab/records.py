"""The run directory: every-step curves to TensorBoard and metrics.parquet, run.json, atomic writes.

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

import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

_UMASK = os.umask(0)
os.umask(_UMASK)


# ------------------------------------------------------------------ atomic files
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(obj):
    """NaN/inf -> null: run.json stays strict JSON that any reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    text = json.dumps(_finite(obj), indent=2, default=str, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def write_parquet(path: Path, frame) -> None:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM), so a job in a
    sweep that shares its process with earlier jobs reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def write_csv(path: Path, frame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False).encode())


def peak_rss_mib() -> float:
    """Peak resident memory since reset_peak_rss (VmHWM), or of the whole process (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------ the recorder
class RunRecorder(L.Callback):
    """Collects every value that goes to TensorBoard, writes it in bulk, and times the run."""

    def __init__(self, run_dir: Path, flush_every_s: float = 0.5):
        self.run_dir = Path(run_dir)
        self.flush_every_s = flush_every_s
        self.rows: dict[str, list] = {"step": [], "epoch": [], "name": [], "value": []}
        self.writer = None
        self.sources: list = []  # e.g. probes: objects with drain() -> [(step, epoch, values)]
        self.diverged_at: int | None = None
        self.train_seconds = 0.0
        self.train_images = 0
        self.val_seconds: list[float] = []
        self.val_peak_mib: list[float] = []
        self.last_loss = math.nan
        self.purge_step: int | None = None  # resuming: TensorBoard drops older events from here
        self._next_flush = 0.0
        self._next_step = 0
        self._epoch_start = None
        self._val_start = None
        self._images_pending = 0
        self._ddp_flush_every = 0
        self._world = 1

    # -- writing
    def log_values(self, step: int, epoch: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.rows["step"].append(step)
            self.rows["epoch"].append(epoch)
            self.rows["name"].append(name)
            self.rows["value"].append(float(value))
            if self.writer is not None:
                self.writer.add_scalar(name, value, step)

    def flush(self, trainer, pl_module) -> None:
        pending = pl_module.step_losses
        if pending:
            import torch

            values = torch.stack(pending)
            if trainer.world_size > 1:  # DDP: the curve is the global batch's loss
                values = trainer.strategy.reduce(values, reduce_op="mean")
            values = values.tolist()  # the one host sync
            pending.clear()
            for k, value in enumerate(values):
                step = self._next_step
                if not math.isfinite(value):
                    self.diverged_at = step
                    trainer.should_stop = True
                    self._next_step += len(values) - k
                    break
                self.log_values(step, trainer.current_epoch, {"train/loss": value})
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
        from torch.utils.tensorboard import SummaryWriter

        if trainer.is_global_zero:  # DDP: one rank writes
            self.writer = SummaryWriter(str(self.run_dir / "tb"), flush_secs=5, max_queue=4096,
                                        purge_step=self.purge_step)
        self._next_step = trainer.global_step
        # DDP flushes reduce across ranks, so they happen at the same steps on every rank
        self._world = trainer.world_size  # read once, not in every step's hook
        self._ddp_flush_every = 64 if self._world > 1 else 0

    def on_train_start(self, trainer, pl_module):
        # Resumed: the writer purged events from the checkpoint's step on, but rows restored from
        # the checkpoint may sit at that step (the validation of an epoch-end checkpoint)
        if self.writer is not None and self.purge_step is not None:
            for step, name, value in zip(self.rows["step"], self.rows["name"],
                                         self.rows["value"], strict=True):
                if step >= self.purge_step:
                    self.writer.add_scalar(name, value, step)

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, chunk, batch_idx):
        self._images_pending += chunk.images * self._world
        if self._ddp_flush_every:
            if len(pl_module.step_losses) >= self._ddp_flush_every:
                self.flush(trainer, pl_module)
        elif time.perf_counter() >= self._next_flush:
            with pl_module.phase("logging"):
                self.flush(trainer, pl_module)

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
        self.val_seconds.append(elapsed)
        self.val_peak_mib.append(pl_module.val_peak_mib)
        self.log_values(trainer.global_step, trainer.current_epoch,
                        {"val/loss": loss, "val/acc": acc, "time/val_seconds": elapsed})

    def on_train_epoch_end(self, trainer, pl_module):
        self._close_train_interval(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._close_train_interval(trainer, pl_module)

    # -- checkpoints (Lightning stores a callback's state_dict and restores it on resume)
    def state_dict(self) -> dict:
        import torch

        names = list(dict.fromkeys(self.rows["name"]))
        code = {n: i for i, n in enumerate(names)}
        return {"step": torch.tensor(self.rows["step"], dtype=torch.int64),
                "epoch": torch.tensor(self.rows["epoch"], dtype=torch.int64),
                "names": names,
                "code": torch.tensor([code[n] for n in self.rows["name"]], dtype=torch.int64),
                "value": torch.tensor(self.rows["value"], dtype=torch.float64),
                "next_step": self._next_step, "last_loss": self.last_loss,
                "train_seconds": self.train_seconds, "train_images": self.train_images,
                "val_seconds": list(self.val_seconds), "val_peak_mib": list(self.val_peak_mib)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.rows = {"step": state["step"].tolist(), "epoch": state["epoch"].tolist(),
                     "name": [state["names"][i] for i in state["code"].tolist()],
                     "value": state["value"].tolist()}
        self._next_step, self.last_loss = state["next_step"], state["last_loss"]
        self.train_seconds, self.train_images = state["train_seconds"], state["train_images"]
        self.val_seconds, self.val_peak_mib = state["val_seconds"], state["val_peak_mib"]

    # -- results
    @property
    def images_per_s(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds else 0.0

    def final_metrics(self) -> dict:
        frame = self.frame()
        out = {"train_loss": None, "best_train_loss": None, "val_loss": None, "val_acc": None}
        losses = frame[frame.name == "train/loss"].value
        if len(losses):
            out["train_loss"] = float(losses.iloc[-1])
            out["best_train_loss"] = float(losses.min())
        for key in ("val_loss", "val_acc"):
            vals = frame[frame.name == key.replace("_", "/")].value
            if len(vals):
                out[key] = float(vals.iloc[-1])
        out["steps"] = len(losses)  # rows 0..n-1; a diverged run stops before the bad step
        return out

    def frame(self):
        import pandas as pd

        return pd.DataFrame({
            "step": pd.array(self.rows["step"], dtype="int64"),
            "epoch": pd.array(self.rows["epoch"], dtype="int64"),
            "name": pd.array(self.rows["name"], dtype="string"),
            "value": pd.array(self.rows["value"], dtype="float64")})

    def write_hparams(self, hparams: dict, metrics: dict) -> None:
        """HParams tab: the run's config beside its final metrics (also logged as scalars)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        metrics = {f"final/{k}": v for k, v in metrics.items() if v is not None}
        step = max(self._next_step - 1, 0)
        for summary in hparams_summary(hparams, metrics):
            self.writer.file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# ------------------------------------------------------------------ the progress bar
class StepProgressBar(ProgressBar):
    """tqdm bar: epoch, step, last flushed loss and images/s; redraws a few times a second."""

    def __init__(self, recorder: RunRecorder, min_interval_s: float = 0.3):
        super().__init__()
        self.recorder, self.min_interval_s = recorder, min_interval_s
        self.bar = None
        self._enabled = True

    def disable(self):
        self._enabled = False

    def enable(self):
        self._enabled = True

    def on_train_epoch_start(self, trainer, pl_module):
        from tqdm.auto import tqdm

        if not self._enabled:
            return
        if self.bar is not None:
            self.bar.close()
        total = getattr(trainer.train_dataloader, "steps_per_epoch", None)
        self.bar = tqdm(total=total, unit="step",
                        desc=f"epoch {trainer.current_epoch}", mininterval=self.min_interval_s,
                        dynamic_ncols=True, file=sys.stderr, leave=True)
        self._t0, self._seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, chunk, batch_idx):
        if self.bar is None:
            return
        self._seen += chunk.images
        self.bar.update(chunk.steps_done)
        now = time.perf_counter()
        if now - getattr(self, "_last_post", 0.0) >= self.min_interval_s:
            self._last_post = now
            rate = self._seen / max(now - self._t0, 1e-9)
            self.bar.set_postfix(loss=f"{self.recorder.last_loss:.4f}", img_s=f"{rate:,.0f}",
                                 step=trainer.global_step, refresh=False)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def teardown(self, trainer, pl_module, stage):
        self.on_train_epoch_end(trainer, pl_module)
