"""Checkpoints that let a killed run continue to the same curve, bit for bit, and the one place
that turns stop signals into "stop at the next step boundary and save".

A checkpoint is Lightning's own: weights, optimizer and LR-scheduler state, loop counters, the
data loader's position (its `state_dict`, Lightning's stateful-loader protocol), the callbacks'
states (the recorder's rows, the probes' history), plus what the module adds in
`on_save_checkpoint` (the accumulated `.grad`, every RNG state, the config). The harness writes
`checkpoints/last.ckpt`

- every `checkpoint.every_n_steps` optimizer steps (for hard kills: SIGKILL, power loss),
- at the step where SIGINT, SIGTERM or SIGUSR1 arrived (then the run exits 128 + the signal), and
- at the end of the run (the final weights).

Lightning's ModelCheckpoint (`callbacks=[model_checkpoint]`) writes the same complete state, so a
run can also continue from one of its files (`ckpt_path=...`). Files are written to a temporary
file and renamed, and read with `weights_only=True`. A signal that arrives in an epoch's last step
(or at `max_steps`, where the run validates too) or during validation lets that pass finish (it
changes no training state) and the checkpoint is taken at the epoch's end, after every callback
has acted on that validation (EarlyStopping's decision to stop travels with the module's state);
a second Ctrl-C stops at once, keeping the last periodic checkpoint.
"""

from __future__ import annotations

import io
import signal
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from autograd_lab.disk.files import atomic_write_bytes
from autograd_lab.disk.formats import CHECKPOINT
from autograd_lab.job.resumable import load
from autograd_lab.model.module import at_max_steps

# The stop signals: Ctrl-C, kill/preemption, a closed terminal or ssh session, and the two that
# schedulers send before a time limit (SLURM's --signal; submitit's preemption signal is USR2)
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP",
                signal.SIGUSR1: "SIGUSR1", signal.SIGUSR2: "SIGUSR2"}


class RunInterrupted(Exception):
    """Raised at a step boundary after a SIGINT/SIGTERM, once the checkpoint is on disk."""

    def __init__(self, signum: int, step: int | None, saved: bool):
        self.signum, self.step, self.saved = signum, step, saved
        where = f"at step {step}" if step is not None else "before training started"
        tail = ("; a checkpoint was saved: re-run the same command to continue" if saved else "")
        super().__init__(f"interrupted by {SIGNAL_NAMES.get(signum, signum)} {where}{tail}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written atomically and read back with weights_only=True.

    `loaded`: (path, checkpoint) already read (and checked) before the fit, handed to Lightning
    instead of reading the file a second time."""

    def __init__(self, loaded: tuple[Path, dict] | None = None):
        super().__init__()
        self.loaded = loaded

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(Path(path), buf.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        if self.loaded is not None and Path(path) == self.loaded[0]:
            ckpt, self.loaded = self.loaded[1], None
            return ckpt
        return load(Path(path), map_location=map_location)


# ------------------------------------------------------------------ signals and saves
class StopSignals:
    """The one place that handles the stop signals (SIGNAL_NAMES). Before training, a signal
    stops the run at once (there is nothing to save); during training it is noted, and the
    Checkpointer stops at the next step boundary, saved; a second Ctrl-C stops at once. Once
    training is over (`finishing`), signals are noted and nothing else: the run's last writes
    (metrics.parquet, run.json) are not cut short. A context manager around the whole run."""

    def __init__(self):
        self.requested: int | None = None
        self.training = False
        self.finishing = False
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.finishing:
            self.requested = self.requested or signum
            return
        if not self.training:
            raise RunInterrupted(signum, None, saved=False)
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, keep the last checkpoint
        self.requested = signum

    def install(self) -> None:
        """(Re-)install the handlers: Lightning installs its own for SLURM when a fit starts."""
        for sig in SIGNAL_NAMES:
            previous = signal.signal(sig, self._handler)
            self._previous.setdefault(sig, previous)

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Checkpointer(Checkpoint):
    """Writes checkpoints/last.ckpt periodically, at a stop signal and at the end.

    A Lightning `Checkpoint` callback, so Lightning calls it as it calls ModelCheckpoint: after
    the other callbacks at a step's end (their rows are complete) and after the module's own
    `on_train_epoch_end` (an epoch-interval LR scheduler has stepped before the epoch-end save)."""

    def __init__(self, run_dir: Path, every_n_steps: int, signals: StopSignals, recorder):
        self.path = Path(run_dir) / CHECKPOINT
        self.every, self.signals, self.recorder = every_n_steps, signals, recorder
        self._at_epoch_end = False
        self._ddp = False
        self._trainer = None

    def setup(self, trainer, pl_module, stage):
        self._ddp = trainer.world_size > 1  # read once, not in every step's hook
        self._trainer = trainer

    def on_train_start(self, trainer, pl_module):
        self.signals.install()  # over Lightning's own SLURM handlers
        self.signals.training = True
        self._step = trainer.global_step  # counted here: cheaper than trainer.global_step

    def teardown(self, trainer, pl_module, stage):
        self.signals.training = False
        self._trainer = None

    def _agree(self, trainer) -> int | None:
        """The signal to stop on at this boundary. DDP: a signal that reached any rank stops
        every rank at the same step (the save is collective), so the decision is the ranks'
        all-reduced request, one tiny all-reduce a step in DDP runs only. `requested` itself is
        never cleared here: a signal landing during the reduce counts at the next boundary."""
        if not self._ddp:
            return self.signals.requested
        import torch.distributed as dist

        flag = torch.tensor([self.signals.requested or 0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._step += 1
        stop = self._agree(trainer)
        if stop is None and not (self.every and self._step % self.every == 0):
            return
        if self.recorder.diverged_at is not None:
            return
        if batch_idx + 1 >= trainer.num_training_batches or at_max_steps(trainer):
            # the epoch's last step, or max_steps (the module asks Lightning to stop, which
            # validates here): validation comes next, then on_train_epoch_end; save there, so
            # the checkpoint holds the validation and every callback's decision on it
            self._at_epoch_end = True
            return
        self.save(trainer)
        if stop is not None:
            raise RunInterrupted(stop, trainer.global_step, saved=True)

    def on_train_epoch_end(self, trainer, pl_module):
        stop = self._agree(trainer)
        if self.recorder.diverged_at is not None:
            return
        if self._at_epoch_end or stop is not None:
            self._at_epoch_end = False
            self.save(trainer)
        if stop is not None:
            raise RunInterrupted(stop, trainer.global_step, saved=True)

    def on_train_end(self, trainer, pl_module):
        if self.recorder.diverged_at is None:
            self.save(trainer)

    # a save still due at this epoch's end travels with a checkpoint written before the epoch's
    # end hooks (one of ModelCheckpoint's, at validation's end), so a run continued from that
    # file saves it too. One written in those hooks (ModelCheckpoint's epoch-end file, before
    # ours) continues at the next epoch: the save is not due there. Lightning counts an epoch
    # `processed` before its end hooks and `completed` after them.
    def state_dict(self) -> dict:
        epochs = self._trainer.fit_loop.epoch_progress.current if self._trainer else None
        in_end_hooks = epochs is not None and epochs.processed > epochs.completed
        return {"at_epoch_end": self._at_epoch_end and not in_end_hooks}

    def load_state_dict(self, state: dict) -> None:
        self._at_epoch_end = bool(state.get("at_epoch_end", False))

    def save(self, trainer) -> None:
        # the loggers' files first (Logger.save: TensorBoard's writer flushed, the CSV written),
        # then the checkpoint: a run killed after this save (SIGKILL, power loss) and continued
        # from it finds every step before it in TensorBoard too, not only in its own rows
        self.recorder.flush(trainer)
        for logger in trainer.loggers:
            logger.save()
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state


