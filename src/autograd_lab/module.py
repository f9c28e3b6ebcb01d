"""The LightningModule: the seed's training step, with its switches in plain sight.

Manual optimisation on purpose: the step reads like the seed's `train()` body (zero_grad,
forward, CrossEntropyLoss, backward, step), so `train.zero_grad=false` is the seed's
`zero_gradients=False` and nothing else. Losses stay on the device (`step_losses`); the
RunRecorder flushes them in bulk.

A Lightning batch is a chunk of `trainer.steps_per_execution` such steps (data.Chunk): Lightning's
per-batch loop is paid once per chunk. Callbacks that define `on_train_step_start` /
`on_train_step_end` are called around every step.
"""

from __future__ import annotations

import contextlib

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from .records import current_rss_mib
from .variants import eval_context

_NO_RANGE = contextlib.nullcontext()


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r}")  # unreachable: the config group has two files


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, optim_cfg, zero_grad: bool = True,
                 eval_grad_mode: str = "inference", frozen_bn: list[nn.Module] | None = None,
                 max_steps: int = -1):
        super().__init__()
        self.model = model
        self.optim_cfg = optim_cfg
        self.reset_grads = zero_grad
        self.eval_grad_mode = eval_grad_mode
        self.frozen_bn = frozen_bn or []
        self.automatic_optimization = False
        self.max_steps = max_steps  # trainer.max_steps: stop (and validate) after this step
        self.step_losses: list[torch.Tensor] = []
        self.val_peak_mib = 0.0
        self.cuda_peak_mib = 0.0  # training peak across validation resets (CUDA only)
        self.profiling = False  # set by the profiler callback: phases get record_function ranges
        self.end_chunk = False  # set by a per-step hook: stop this chunk after the current step

    def phase(self, name: str):
        """A profiler range for one part of the step while profiling; a no-op otherwise."""
        if self.profiling:
            return torch.profiler.record_function(f"autograd_lab::{name}")
        return _NO_RANGE

    # Lightning sets `_current_fx_name` twice per hook call, about thirty times a step; going
    # through nn.Module.__setattr__ (isinstance checks against Parameter/Module/buffers) costs
    # a few percent of a SmallNet step. The attribute is a plain string: store it directly.
    def __setattr__(self, name, value):
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x):
        return self.model(x)

    def on_fit_start(self):
        # On one device in full precision, Lightning's manual_backward only wraps loss.backward()
        # in hook dispatch (~0.1 ms a step, 5% of a SmallNet step on CPU). Call autograd directly
        # there; other strategies (DDP) and precisions (AMP scaling) keep manual_backward.
        from lightning.pytorch.plugins.precision import Precision
        from lightning.pytorch.strategies import SingleDeviceStrategy
        from lightning.pytorch.utilities.model_helpers import is_overridden

        strategy = self.trainer.strategy
        backward_hooks = any(is_overridden(hook, cb, L.Callback) for cb in self.trainer.callbacks
                             for hook in ("on_before_backward", "on_after_backward"))
        self._direct_backward = (isinstance(strategy, SingleDeviceStrategy)
                                 and type(strategy.precision_plugin) is Precision
                                 and not backward_hooks)  # a callback that asks gets its hooks
        self._optimizer = self.optimizers()  # Lightning's wrapper: its step() counts steps
        # per-step hooks (a Lightning batch is a chunk of steps): callbacks that define them
        callbacks = self.trainer.callbacks
        self._step_start = [cb for cb in callbacks if hasattr(cb, "on_train_step_start")]
        self._step_end = [cb for cb in callbacks if hasattr(cb, "on_train_step_end")]

    def training_step(self, chunk, batch_idx):
        """Run a chunk's optimizer steps (data.Chunk), each the seed's step. After a step,
        callbacks may set `end_chunk` (a checkpoint or a signal is due at this boundary)."""
        trainer, opt = self.trainer, self._optimizer
        self.end_chunk = False
        if 0 < self.max_steps <= trainer.global_step:  # resumed from a save at max_steps
            trainer.should_stop = True
            return
        for i in range(chunk.steps):
            x, y = batch = chunk.batch(i)
            for cb in self._step_start:
                cb.on_train_step_start(trainer, self, batch)
            if self.reset_grads:  # train.zero_grad
                with self.phase("optimizer"):
                    opt.optimizer.zero_grad()
            with self.phase("forward"):
                loss = F.cross_entropy(self.model(x), y)
            with self.phase("backward"):
                if self._direct_backward:
                    loss.backward()
                else:
                    self.manual_backward(loss)
            with self.phase("optimizer"):
                opt.step()  # through Lightning's optimizer wrapper: it counts the global step
            self.step_losses.append(loss.detach())
            chunk.advance(len(y))
            for cb in self._step_end:
                cb.on_train_step_end(trainer, self, batch)
            if self.max_steps > 0 and trainer.global_step >= self.max_steps:
                trainer.should_stop = True  # validates, then ends, as Lightning's early stop
                break
            if (self.end_chunk and chunk.can_stop) or trainer.should_stop:
                break  # the next chunk starts where this one stopped

    def on_train_start(self):
        self.train()  # Lightning keeps whatever mode the model came in; set ours explicitly

    def train(self, mode: bool = True):
        super().train(mode)
        for bn in self.frozen_bn:  # train.freeze_bn_stats: frozen BN keeps its running stats
            bn.eval()
        return self

    def on_validation_model_zero_grad(self):
        """Lightning clears .grad before every validation by default. The seed's no-zero-grad
        run keeps accumulating across epochs, so validation must leave .grad alone."""

    # -- validation under the chosen grad mode (Trainer(inference_mode=False) gives no_grad
    #    around this; eval_context then sets the mode the variant asks for)
    def on_validation_epoch_start(self):
        self._val_sums = torch.zeros(3, device=self.device)  # loss sum, correct, count
        self.val_peak_mib = 0.0
        if self.device.type == "cuda":  # keep the training peak, then measure validation alone
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.cuda_peak_mib = max(self.cuda_peak_mib, peak)
            torch.cuda.reset_peak_memory_stats(self.device)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        with eval_context(self.eval_grad_mode):
            logits = self.model(x)
            loss = F.cross_entropy(logits, y, reduction="sum")
            if self.device.type == "cpu":  # the graph (if any) is alive here: measure it
                self.val_peak_mib = max(self.val_peak_mib, current_rss_mib())
        correct = (logits.argmax(1) == y).sum()
        self._val_sums += torch.stack([loss.detach(), correct.to(loss.dtype),
                                       torch.tensor(len(y), dtype=loss.dtype, device=loss.device)])
        return logits  # callbacks see what the grad mode produced (a graph only when enabled)

    def val_metrics(self) -> torch.Tensor:
        """[mean loss, accuracy] of the validation epoch that just ran (still on the device)."""
        sums = self._val_sums
        if self.trainer.world_size > 1:  # DDP: every rank validated its share
            sums = self.trainer.strategy.reduce(sums.clone(), reduce_op="sum")
        loss_sum, correct, count = sums
        if self.device.type == "cuda":
            self.val_peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        return torch.stack([loss_sum / count, correct / count])

    def configure_optimizers(self):
        return build_optimizer([p for p in self.model.parameters() if p.requires_grad],
                               self.optim_cfg)
