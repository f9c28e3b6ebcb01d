"""The LightningModule: the seed's training step, with its switches in plain sight.

Manual optimisation on purpose: `training_step` reads like the seed's `train()` body (zero_grad,
forward, CrossEntropyLoss, backward, step), so `train.zero_grad=false` is the seed's
`zero_gradients=False` and nothing else. One Lightning batch is one optimizer step, so every
Lightning hook (`on_train_batch_start/end`, `on_before_optimizer_step`, ...) runs once per step and
`trainer.global_step` counts steps. Losses stay on the device (`step_losses`); the RunRecorder
flushes them in bulk to every logger.

What the exact curve depends on beyond Lightning's own state (the accumulated `.grad` of the
no-zero-grad variant, every RNG state) travels in the checkpoint through `on_save_checkpoint` /
`on_load_checkpoint`, so every checkpoint Lightning writes (ours, ModelCheckpoint's, a user's
`trainer.save_checkpoint`) resumes to the same curve.

`trainer.cuda_graph=true`: the same step captured once as a CUDA graph and replayed
(model/graphed.py); `eager_step` is the step it replays.
"""

from __future__ import annotations

import contextlib
import inspect
import random

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate

from autograd_lab.config.targets import arguments
from autograd_lab.disk.formats import CHECKPOINT_FORMAT
from autograd_lab.model.graphed import GraphedStep
from autograd_lab.model.variants import eval_context

_NO_RANGE = contextlib.nullcontext()


def build_optimizer(params, cfg, capturable: bool = False) -> torch.optim.Optimizer:
    """The `optim` node (`_partial_: true`, e.g. torch.optim.SGD with lr and momentum) made by
    Hydra's instantiate and called with `params`; its `name` is the harness's label
    (config.targets.OWN_KEYS), never an argument. Lists come as lists (Adam's betas), never as
    OmegaConf containers, which would travel into the checkpoint's optimizer state.
    `capturable`: an optimizer that has the flag (Adam) gets capturable=True, as a CUDA graph
    capture of its step needs (SGD has no such flag and needs none)."""
    make = instantiate(arguments(cfg, "optim"), _convert_="all")
    if capturable and "capturable" in inspect.signature(make.func).parameters:
        return make(params, capturable=True)
    return make(params)


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, optim_cfg, zero_grad: bool = True,
                 eval_grad_mode: str = "inference", frozen_bn: list[nn.Module] | None = None,
                 scheduler=None, meta: dict | None = None, channels_last: bool = False,
                 cuda_graph: bool = False):
        """`scheduler`: None, or (make, interval): make(optimizer, total_steps) builds a torch
        LR scheduler, stepped every optimizer step (interval "step") or epoch ("epoch").
        `meta`: stored in every checkpoint (format and config, checked before a resume).
        `channels_last`: the data module makes each image batch torch.channels_last
        (model.channels_last). `cuda_graph`: the step replayed as a CUDA graph (graphed.py;
        trainer.cuda_graph)."""
        super().__init__()
        self.model = model
        self.optim_cfg = optim_cfg
        self.reset_grads = zero_grad
        self.eval_grad_mode = eval_grad_mode
        self.frozen_bn = frozen_bn or []
        self.scheduler = scheduler
        self.meta = meta or {}
        self.channels_last = channels_last
        self.cuda_graph = cuda_graph
        self.graphed: GraphedStep | None = None  # made at fit start when cuda_graph
        self.automatic_optimization = False
        self.step_losses: list[torch.Tensor] = []  # this step's loss, on the device, until flushed
        self.val_peak_mib = 0.0
        self.cuda_peak_mib = 0.0  # training peak across validation resets (CUDA only)
        self.profiling = False  # set by the profiler callback: phases get record_function ranges
        self.watch_step = self.watch_val_step = None  # one step inside a context (memory.py)
        self._restored: dict | None = None

    def phase(self, name: str):
        """A profiler range for one part of the step while profiling; a no-op otherwise."""
        if self.profiling:
            return torch.profiler.record_function(f"autograd_lab::{name}")
        return _NO_RANGE

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self):
        self._optimizer = self.optimizers()  # Lightning's wrapper: its step() counts steps
        schedulers = self.lr_schedulers()
        self._scheduler = schedulers if self.scheduler is not None else None
        self._step_scheduler = self.scheduler is not None and self.scheduler[1] == "step"
        # before Lightning restores a checkpoint's optimizer state: the graph is captured later
        self.graphed = GraphedStep(self) if self.cuda_graph else None

    def training_step(self, batch, batch_idx):
        """One optimizer step, the seed's: zero_grad, forward, loss, backward, step.
        `watch_step` (memory.MemoryFigures): a context around one step, then dropped."""
        if self.watch_step is None:
            return self._step(batch)
        return self._watched("watch_step", self._step, batch)

    def _watched(self, attr: str, step, batch):
        """step(batch) inside the context self.<attr> makes, once."""
        watch = getattr(self, attr)
        setattr(self, attr, None)
        with watch():
            return step(batch)

    def _step(self, batch):
        x, y = batch
        if self.graphed is not None:  # trainer.cuda_graph: replayed (or eager, graphed.py)
            loss = self.graphed.step(x, y)
        else:
            loss = self.eager_step(x, y)
        if self._step_scheduler:
            with self.phase("optimizer"):
                self._scheduler.step()
        self.step_losses.append(loss)

    def eager_step(self, x, y, set_to_none: bool = True) -> torch.Tensor:
        """zero_grad (train.zero_grad), forward, loss, backward, step; the loss, detached.
        `set_to_none=False` (the graphed step's eager steps) zeroes .grad in place: the same
        numbers, and the same tensors the graph writes."""
        opt = self._optimizer
        if self.reset_grads:  # train.zero_grad
            with self.phase("optimizer"):
                opt.zero_grad(set_to_none=set_to_none)
        with self.phase("forward"):
            loss = F.cross_entropy(self.model(x), y)
        with self.phase("backward"):
            self.manual_backward(loss)
        with self.phase("optimizer"):
            opt.step()  # through Lightning's optimizer wrapper: it counts the global step
        return loss.detach()

    def on_train_epoch_end(self):
        if self._scheduler is not None and not self._step_scheduler:
            self._scheduler.step()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """At `trainer.max_steps` mid-epoch, ask Lightning to stop (`trainer.should_stop`, its
        public stop request, as EarlyStopping makes): its epoch loop then validates at this
        step before it ends (`_should_check_val_fx` validates on a stop request; at an epoch's
        last step it validates once either way), where max_steps alone would end the fit with
        no validation. Runs after every callback's on_train_batch_end (the Checkpointer's
        `at_max_steps` agrees). tests/test_val_at_max_steps.py fails without it."""
        if at_max_steps(self.trainer):
            self.trainer.should_stop = True

    # Lightning asks for training_step's signature at every step (whether to pass batch_idx);
    # inspect.signature returns a function's own __signature__ first instead of parsing it again,
    # about 15 us of a 1.2 ms SmallNet step. Set below the class.

    def on_train_start(self):
        self.train()  # Lightning keeps whatever mode the model came in; set ours explicitly
        if self._restored is not None:  # resumed: .grad and RNG as they were at the save
            state, self._restored = self._restored, None
            for p, g in zip(self.model.parameters(), state["grads"], strict=True):
                p.grad = None if g is None else g.to(p.device)
            set_rng_state(state["rng"])
            restore_skipped_loader_state(self.trainer.train_dataloader, self._loader_states)
            if state.get("should_stop"):  # a stop a callback asked for before the save
                self.trainer.should_stop = True  # (Lightning does not keep it): the fit ends

    def train(self, mode: bool = True):
        super().train(mode)
        for bn in self.frozen_bn:  # train.freeze_bn_stats: frozen BN keeps its running stats
            bn.eval()
        return self

    # -- what the curve depends on beyond Lightning's own checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["autograd_lab"] = {
            **self.meta, "format": CHECKPOINT_FORMAT, "rng": rng_state(),
            # the stop decision already taken (EarlyStopping at this epoch's end, max_steps):
            # Lightning's checkpoint keeps EarlyStopping's counters but not trainer.should_stop,
            # so a run saved right after the decision would train on after a resume
            "should_stop": bool(self.trainer.should_stop),
            "grads": [None if p.grad is None else p.grad.detach().clone()
                      for p in self.model.parameters()]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = checkpoint["autograd_lab"]  # applied when training starts
        self._loader_states = (checkpoint.get("loops", {}).get("fit_loop", {})
                               .get("state_dict", {}).get("combined_loader", []))
        if self.trainer.max_steps != -1:
            epoch_end_as_next_epoch_start(checkpoint)

    def on_validation_model_zero_grad(self):
        """Lightning clears .grad before every validation by default. The seed's no-zero-grad
        run keeps accumulating across epochs, so validation must leave .grad alone."""

    # -- validation under the chosen grad mode (Trainer(inference_mode=False) gives no_grad
    #    around this; eval_context then sets the mode the variant asks for)
    def on_validation_epoch_start(self):
        self._val_sums = torch.zeros(3, device=self.device)  # loss sum, correct, count
        self._val_result = None
        self.val_peak_mib = 0.0
        if self.device.type == "cuda":  # keep the training peak, then measure validation alone
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.cuda_peak_mib = max(self.cuda_peak_mib, peak)
            torch.cuda.reset_peak_memory_stats(self.device)

    def validation_step(self, batch, batch_idx):
        if self.watch_val_step is None:
            return self._val_step(batch)
        return self._watched("watch_val_step", self._val_step, batch)

    def _val_step(self, batch):
        x, y = batch
        with eval_context(self.eval_grad_mode):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
        correct = (logits.argmax(1) == y).sum()
        self._val_sums += torch.stack([loss.detach(), correct.to(loss.dtype),
                                       torch.tensor(len(y), dtype=loss.dtype, device=loss.device)])
        return logits  # callbacks see what the grad mode produced (a graph only when enabled)

    def on_validation_epoch_end(self):
        """val/loss and val/acc for callbacks (EarlyStopping, ModelCheckpoint) and the progress
        bar; the RunRecorder writes them to the loggers with the rest of the run's values."""
        loss, acc = self.val_metrics()
        self.log_dict({"val/loss": loss, "val/acc": acc}, logger=False, prog_bar=True)

    def val_metrics(self) -> torch.Tensor:
        """[mean loss, accuracy] of the validation epoch that just ran (still on the device);
        computed once (DDP: one reduce), whoever asks first (callbacks' hooks run before ours)."""
        if self._val_result is not None:
            return self._val_result
        sums = self._val_sums
        if self.trainer.world_size > 1:  # DDP: every rank validated its share
            sums = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        if self.device.type == "cuda":
            self.val_peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        self._val_result = self.val_rows(sums)
        return self._val_result

    def val_rows(self, sums: torch.Tensor) -> torch.Tensor:
        """[mean loss, accuracy] from the validation sums [loss sum, correct, count]."""
        loss_sum, correct, count = sums
        return torch.stack([loss_sum / count, correct / count])

    def configure_optimizers(self):
        optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                    self.optim_cfg,
                                    capturable=self.cuda_graph and GraphedStep.capture)
        if self.scheduler is None:
            return optimizer
        make, interval = self.scheduler
        # the horizon of per-step schedules: the optimizer steps this fit will take
        total = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": make(optimizer, total), "interval": interval}}


Classifier.training_step.__signature__ = inspect.signature(Classifier.training_step)


def at_max_steps(trainer) -> bool:
    """Whether the step just done is `trainer.max_steps` (the run's last)."""
    return 0 < trainer.max_steps <= trainer.global_step


# ------------------------------------------------------------------ Lightning workarounds
def restore_skipped_loader_state(loader, states: list[dict]) -> bool:
    """Lightning (2.6) never hands a stateful loader its saved state when anything asked for
    `trainer.estimated_stepping_batches` before the restore (a per-step LR schedule's horizon,
    in configure_optimizers): its fit loop builds the loader early and later skips loading
    (Lightning-AI/pytorch-lightning#20550, open). Give the train loader the state Lightning saved,
    at train start, before its first batch, if Lightning did not. tests/test_resume.py resumes
    with scheduler=onecycle and fails without this; True if it acted."""
    if not states or not hasattr(loader, "load_state_dict") or loader.resume_at is not None:
        return False
    loader.load_state_dict(states[0])
    return True


def epoch_end_as_next_epoch_start(checkpoint: dict) -> bool:
    """Lightning (2.6) resumes a checkpoint saved in `on_train_epoch_end` one epoch too far when
    `max_steps` is set: iteration-based training forces its loops to "restart", and the restored
    epoch runs again as an empty epoch (Lightning-AI/pytorch-lightning#19617, open). Without
    max_steps the same checkpoint resumes right. Rewrite such a checkpoint's progress counters
    (this reads Lightning's checkpoint layout, not private attributes) to what they are when the
    next epoch is about to start: the epoch completed, no batch or validation batch of the next
    one seen. tests/test_resume.py has both cases (a signal during validation and in an epoch's
    last step, with max_steps) and fails if this stops working; True if rewritten."""
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    epochs = loops.get("epoch_progress")
    if not epochs or epochs["current"]["processed"] != epochs["current"]["completed"] + 1:
        return False
    for part in ("total", "current"):
        epochs[part]["completed"] = epochs[part]["processed"]
    for key in ("epoch_loop.batch_progress", "epoch_loop.val_loop.batch_progress"):
        if key in loops:
            loops[key]["current"] = dict.fromkeys(loops[key]["current"], 0)
            loops[key]["is_last_batch"] = False
    return True


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
