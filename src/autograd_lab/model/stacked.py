"""Many copies of one network trained as one program (hydra/launcher=stacked): each member's
parameters are a slice of one stacked tensor, and one vmapped forward and backward serves them
all (torch.func.stack_module_state + functional_call + vmap).

Why the members' curves are the separate runs' curves: the members share no parameter and no
example, so the gradient of the sum of their losses with respect to member i's slice is the
gradient of member i's own loss; SGD and Adam are elementwise, so one optimizer over the stacked
tensors takes each member's own step; `.grad` slices accumulate per member when
train.zero_grad=false. What differs is the kernels: batched convolutions and matrix products
sum in another order, so curves agree to float32 rounding (tests/test_stacked.py states the
tolerance), not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from autograd_lab.model.module import Classifier
from autograd_lab.model.variants import eval_context


class StackedNet(nn.Module):
    """N networks of one architecture as stacked parameters [N, ...] (`stacked`, in the order
    of the members' `named_parameters`, names in `names`). `template`: one member, hooks
    included (train.detach_at's forward hook), used for its code only: functional_call swaps
    every parameter for the member's slice. Networks with buffers (BatchNorm) are not stacked
    here (the launcher refuses them)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if any(True for _ in members[0].buffers()):
            raise ValueError("StackedNet: networks with buffers (BatchNorm) are not supported")
        params, _ = stack_module_state(members)
        self.names = list(params)
        self.stacked = nn.ParameterList(
            nn.Parameter(params[n].detach().clone(), requires_grad=params[n].requires_grad)
            for n in self.names)
        # kept out of the module tree: its own weights are never used, saved or optimised
        self._template = (members[0].to("meta"),)

    @property
    def size(self) -> int:
        return self.stacked[0].shape[0]

    def member_params(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.stacked, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, B, ...] (each member its own batch) or [B, ...] (one batch for all) ->
        logits [N, B, classes]."""
        template = self._template[0]

        def one(params, xi):
            return functional_call(template, params, (xi,))

        shared = x.dim() == 4
        return vmap(one, in_dims=(0, None if shared else 0))(self.member_params(), x)


def _mean_ce(logits, y):
    return F.cross_entropy(logits, y)


def _sum_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="sum")


class StackedClassifier(Classifier):
    """The seed's step for N members at once: zero_grad (unless train.zero_grad=false), one
    vmapped forward, each member's cross-entropy, backward of their sum, one optimizer step.
    Everything else (scheduler, checkpointed `.grad` and RNG, validation under
    eval.grad_mode, Lightning's hooks and step counting) is the Classifier's. `step_losses`
    holds one [N] tensor per step; validation sums are [N, 3]."""

    def _step(self, batch):
        x, y = batch  # x [N*B, C, H, W] (prepared as one batch), y [N, B]
        n, b = y.shape
        opt = self._optimizer
        if self.reset_grads:
            with self.phase("optimizer"):
                opt.zero_grad()
        with self.phase("forward"):
            logits = self.model(x.view(n, b, *x.shape[1:]))
            losses = vmap(_mean_ce)(logits, y)
        with self.phase("backward"):
            self.manual_backward(losses.sum())
        with self.phase("optimizer"):
            opt.step()
            if self._step_scheduler:
                self._scheduler.step()
        self.step_losses.append(losses.detach())

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_sums = torch.zeros(self.model.size, 3, device=self.device)

    def _val_step(self, batch):
        x, y = batch
        with eval_context(self.eval_grad_mode):
            logits = self.model(x)  # [N, B, classes]
            loss = vmap(_sum_ce, in_dims=(0, None))(logits, y)
        correct = (logits.argmax(-1) == y).sum(1)
        count = torch.full_like(loss, len(y))
        self._val_sums += torch.stack([loss.detach(), correct.to(loss.dtype), count], 1)
        return logits

    def on_validation_epoch_end(self):
        """No log_dict: each member's recorder reads its own row of val_metrics()."""

    def val_rows(self, sums: torch.Tensor) -> torch.Tensor:
        """[N, 2]: each member's mean validation loss and accuracy, from sums [N, 3]."""
        return torch.stack([sums[:, 0] / sums[:, 2], sums[:, 1] / sums[:, 2]], 1)
