"""Checkpoints that let a killed run continue to the same curve, bit for bit.

A checkpoint is Lightning's own (weights, optimizer state, loop counters, callback states) plus
what Lightning leaves out and the rest of the curve depends on: the accumulated `.grad` (the
no-zero-grad variant), every RNG state, the position in the epoch's data order, the recorder's
rows and the probes' state (those two are the callbacks' own state_dicts). It is written

- every `checkpoint.every_n_steps` optimizer steps (for hard kills: SIGKILL, power loss),
- at the step where SIGINT or SIGTERM arrived (then the run exits 130 or 143), and
- at the end of the run (the final weights, `checkpoints/last.ckpt`).

Files are written to a temporary file and renamed, and read with `weights_only=True`.
A signal that arrives in an epoch's last step or during validation lets that pass finish (it
changes no training state) and the checkpoint is taken at the epoch's end; a second Ctrl-C
stops at once, keeping the last periodic checkpoint.
"""

from __future__ import annotations

import io
import random
import signal
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from . import RUN_FORMAT_VERSION
from .config import UserError, flatten
from .records import atomic_write_bytes

CHECKPOINT = Path("checkpoints") / "last.ckpt"
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


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


def load(path: Path, map_location=None) -> dict:
    """Read a checkpoint safely; a damaged file is a one-line error naming it."""
    try:
        ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path}: no such file") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupted or truncated ({reason}); delete it "
                        f"or run with resume=false to start over") from None
    if not isinstance(ckpt, dict) or "autograd_lab" not in ckpt.get("callbacks", {}).get(
            "Checkpointer", {}):
        raise UserError(f"checkpoint {path} was not written by autograd-lab; delete it or run "
                        f"with resume=false to start over")
    return ckpt


def check_resumable(path: Path, config: dict) -> dict:
    """The checkpoint if this run can continue from it, else a UserError that says which
    setting differs."""
    from .sweep import comparable

    ckpt = load(path)
    meta = ckpt["callbacks"]["Checkpointer"]["autograd_lab"]
    version = meta.get("format_version", 0)
    if version > RUN_FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format_version={version}, newer than this "
                        f"autograd-lab reads (up to {RUN_FORMAT_VERSION}); upgrade autograd-lab "
                        f"or run with resume=false")
    theirs, ours = comparable(meta["config"]), comparable(config)
    diffs = _diff(theirs, ours)  # dotted keys; a key missing on one side counts as null
    if diffs:
        key = "model.name" if "model.name" in diffs else next(
            (k for k in diffs if k.startswith("model.")), diffs[0])
        what = "another model" if key.startswith("model.") else "another config"
        raise UserError(f"checkpoint {path} is from {what} ({key}={flatten(theirs).get(key)!r}, "
                        f"this run has {key}={flatten(ours).get(key)!r}); use another run "
                        f"directory or resume=false to start over")
    return ckpt


def _diff(a: dict, b: dict) -> list[str]:
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


# ------------------------------------------------------------------ RNG states
def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ the callback
class Checkpointer(L.Callback):
    """Periodic, on-signal and final checkpoints; restores what Lightning does not.

    Put it after the recorder and probes: at a step's end their rows are complete.
    """

    def __init__(self, run_dir: Path, every_n_steps: int, config: dict, recorder, datamodule):
        self.path = Path(run_dir) / CHECKPOINT
        self.every = every_n_steps
        self.config, self.recorder, self.datamodule = config, recorder, datamodule
        self.requested: int | None = None  # the signal that asked us to stop
        self._previous: dict = {}
        self._at_epoch_end = False
        self._due, self._stop = False, None  # set by a step, acted on at its chunk's end
        self._position: dict | None = None
        self._grads: list | None = None
        self._module = None
        self._ddp = False

    # -- signals: note the request; act on it at the next step boundary
    def _handler(self, signum, frame):
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, keep the last checkpoint
        self.requested = signum

    def on_train_start(self, trainer, pl_module):
        for sig in SIGNAL_NAMES:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        if self._grads is not None:  # restored .grad goes back on the parameters
            for p, g in zip(pl_module.model.parameters(), self._grads, strict=True):
                p.grad = None if g is None else g.to(p.device)
            self._grads = None

    def _restore_signals(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def teardown(self, trainer, pl_module, stage):
        self._restore_signals()

    def on_exception(self, trainer, pl_module, exception):
        self._restore_signals()

    def _agree(self, trainer) -> int | None:
        """The signal to stop on at this boundary. DDP: a signal that reached any rank stops
        every rank at the same step (the save is collective), so the decision is the ranks'
        all-reduced request, one tiny all-reduce a step in DDP runs only. `requested` itself is
        never cleared here: a signal landing during the reduce counts at the next boundary."""
        if not self._ddp:
            return self.requested
        import torch.distributed as dist

        flag = torch.tensor([self.requested or 0], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_train_step_end(self, trainer, pl_module, batch):
        """After each optimizer step: is a save (periodic, or for a signal) due here? Then the
        module ends its chunk after this step, and on_train_batch_end saves."""
        stop = self._agree(trainer)
        if stop is not None or (self.every and trainer.global_step % self.every == 0):
            self._due, self._stop = True, stop
            pl_module.end_chunk = True

    def on_train_batch_end(self, trainer, pl_module, outputs, chunk, batch_idx):
        due, stop = self._due, self._stop
        self._due = False
        if not due or self.recorder.diverged_at is not None:
            return
        if chunk.last:
            self._at_epoch_end = True  # validation comes next: save after it, at epoch end
            return
        self.save(trainer, pl_module)
        if stop is not None:
            raise RunInterrupted(stop, trainer.global_step, saved=True)

    def on_train_epoch_end(self, trainer, pl_module):
        stop = self._agree(trainer)
        if self.recorder.diverged_at is not None:
            return
        if self._at_epoch_end or stop is not None:
            self._at_epoch_end = False
            self.save(trainer, pl_module)
        if stop is not None:
            raise RunInterrupted(stop, trainer.global_step, saved=True)

    def on_train_end(self, trainer, pl_module):
        if self.recorder.diverged_at is None:
            self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        self.recorder.flush(trainer, pl_module)  # losses still on the device become rows
        self._position = {"epoch": trainer.current_epoch, "next_batch": self.datamodule.position}
        self._module = pl_module  # state_dict (called by save_checkpoint) reads its .grad
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state

    # -- what goes into the checkpoint beside Lightning's own state
    def state_dict(self) -> dict:
        if self._position is None:
            return {}
        module = self._module
        return {"autograd_lab": {
            "format_version": RUN_FORMAT_VERSION, "config": self.config,
            "rng": rng_state(),
            "grads": [None if p.grad is None else p.grad.detach().clone()
                      for p in module.model.parameters()],
            "data": self._position,
        }}

    def load_state_dict(self, state: dict) -> None:
        mine = state["autograd_lab"]
        set_rng_state(mine["rng"])
        self._grads = mine["grads"]
        self.datamodule.resume_at = (mine["data"]["epoch"], mine["data"]["next_batch"])

    def setup(self, trainer, pl_module, stage):
        self._ddp = trainer.world_size > 1  # read once, not in every step's hook
