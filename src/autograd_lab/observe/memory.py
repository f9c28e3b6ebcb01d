"""Memory figures that belong to the job: exact byte counts, the same whatever ran before it in
the process (a sweep's jobs share one process; its allocator and peak RSS do not reset).

Measured on the run's first real training step and first validation step (no extra work):

  param_bytes              every parameter, trainable or frozen
  trainable_param_bytes    the parameters the optimizer updates
  grad_bytes               what .grad holds after the step (none for frozen or cut-off ones)
  optimizer_state_bytes    the optimizer's state tensors (SGD momentum, Adam's two moments)
  saved_for_backward_bytes what the autograd graph keeps alive for backward at the step's peak
                           (end of forward): the storages of the saved tensors that backward
                           unpacks, each once, leaving out parameters, buffers and the resident
                           data set, which outlive the graph anyway (`torch.autograd.graph.
                           saved_tensors_hooks`; observe.graph.SavedBytes, the counter `autograd-lab
                           graph` uses too)
  val_saved_bytes          the same for one validation step under eval.grad_mode: the graph
                           `enabled` builds (nothing runs backward there, so every saved
                           storage counts); 0 under no_grad and inference_mode

The hooks only look: every tensor is handed back unchanged, so the curve is bitwise the same.
"""

from __future__ import annotations

import resource

import lightning as L
import torch

from autograd_lab.observe.graph import SavedBytes, outliving, storage_bytes
from autograd_lab.observe.graph_view import resident_tensors

FIGURES = ("param_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_state_bytes",
           "saved_for_backward_bytes", "val_saved_bytes")


def _counter(model: torch.nn.Module, trainer, at_pack: bool):
    """observe.graph.SavedBytes: the rule `autograd-lab graph` counts by, with this run's model and
    resident data set left out."""

    return SavedBytes(outliving(model, resident_tensors(trainer)), at_pack=at_pack)


class MemoryFigures(L.Callback):
    """Hands the module one training step and one validation step to run inside
    saved_tensors_hooks (Classifier.watch_step / watch_val_step: around the step itself, not
    around other callbacks' hooks, which may use torch.func), and reads the figures after."""

    def __init__(self):
        self.figures: dict[str, int] = {}
        self._train = None  # graph.SavedBytes of the first training step, then of validation
        self._val = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._train is None and "saved_for_backward_bytes" not in self.figures:
            # training: what backward unpacks (a part a detach cut off is freed in forward)
            self._train = _counter(pl_module.model, trainer, at_pack=False)
            pl_module.watch_step = self._train.hooks

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._train is None or "saved_for_backward_bytes" in self.figures:
            return
        model = pl_module.model
        params = list(model.parameters())
        state = [t for s in trainer.optimizers[0].state.values() for t in s.values()]
        self.figures.update({
            "saved_for_backward_bytes": self._train.total,
            "param_bytes": sum(storage_bytes(params).values()),
            "trainable_param_bytes": sum(storage_bytes(p for p in params if p.requires_grad)
                                         .values()),
            "grad_bytes": sum(storage_bytes(p.grad for p in params if p.grad is not None).values()),
            "optimizer_state_bytes": sum(storage_bytes(state).values())})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self._val is None and not trainer.sanity_checking:
            # validation runs no backward: what is packed is what the graph holds
            self._val = _counter(pl_module.model, trainer, at_pack=True)
            pl_module.watch_val_step = self._val.hooks

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if self._val is not None and "val_saved_bytes" not in self.figures:
            self.figures["val_saved_bytes"] = self._val.total


def reset_peaks() -> None:
    """A new window for the job's peaks: process RSS, and CUDA memory where there is a GPU."""
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM), so a job in a
    sweep that shares its process with earlier jobs reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


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
