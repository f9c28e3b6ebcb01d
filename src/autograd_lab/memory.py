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
                           saved_tensors_hooks`; the same rule as `autograd-lab graph`)
  val_saved_bytes          the same for one validation step under eval.grad_mode: the graph
                           `enabled` builds (nothing runs backward there, so every saved
                           storage counts); 0 under no_grad and inference_mode

The hooks only look: every tensor is handed back unchanged, so the curve is bitwise the same.
"""

from __future__ import annotations

import lightning as L
import torch

FIGURES = ("param_bytes", "trainable_param_bytes", "grad_bytes", "optimizer_state_bytes",
           "saved_for_backward_bytes", "val_saved_bytes")


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the tensors' storages, each once."""
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _outliving(model: torch.nn.Module, trainer) -> set[int]:
    """Storages that live as long as the run whatever the graph does: parameters, buffers and
    the resident data set (a batch is a view or gather of it)."""
    from .graph import resident_tensors

    return set(_storages([*model.parameters(), *model.buffers(),
                          *resident_tensors(trainer)]))


class MemoryFigures(L.Callback):
    """Hands the module one training step and one validation step to run inside
    saved_tensors_hooks (Classifier.watch_step / watch_val_step: around the step itself, not
    around other callbacks' hooks, which may use torch.func), and reads the figures after."""

    def __init__(self):
        self.figures: dict[str, int] = {}
        self._train_seen: dict[int, int] | None = None
        self._val_seen: dict[int, int] | None = None

    @staticmethod
    def _watcher(trainer, pl_module, seen: dict, count_at_pack: bool):
        outlive = _outliving(pl_module.model, trainer)

        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in outlive:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        # validation runs no backward: what is packed is what the graph holds; training: what
        # backward unpacks (a part of the graph a detach cut off is freed during forward)
        pack, unpack = (keep, lambda t: t) if count_at_pack else (lambda t: t, keep)
        return lambda: torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._train_seen is None and "saved_for_backward_bytes" not in self.figures:
            self._train_seen = {}
            pl_module.watch_step = self._watcher(trainer, pl_module, self._train_seen, False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._train_seen is None or "saved_for_backward_bytes" in self.figures:
            return
        model = pl_module.model
        params = list(model.parameters())
        state = [t for s in trainer.optimizers[0].state.values() for t in s.values()]
        self.figures.update({
            "saved_for_backward_bytes": sum(self._train_seen.values()),
            "param_bytes": sum(_storages(params).values()),
            "trainable_param_bytes": sum(_storages(p for p in params if p.requires_grad)
                                         .values()),
            "grad_bytes": sum(_storages(p.grad for p in params if p.grad is not None).values()),
            "optimizer_state_bytes": sum(_storages(state).values())})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self._val_seen is None and not trainer.sanity_checking:
            self._val_seen = {}
            pl_module.watch_val_step = self._watcher(trainer, pl_module, self._val_seen, True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        if self._val_seen is not None and "val_saved_bytes" not in self.figures:
            self.figures["val_saved_bytes"] = sum(self._val_seen.values())
