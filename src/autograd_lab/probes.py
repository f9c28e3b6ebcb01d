"""Training-dynamics probes: first-order statistics per layer group, cheap enough to leave on.

Every `every_n_steps` optimizer steps, for each parameter group (a top-level module: conv, fc,
layer1, ...) and for `all`:

  grad_norm      ||g||: this step's own gradient (for zero_grad=false, the increment of .grad)
  acc_grad_norm  ||.grad||: what the optimizer saw; grows step after step when zero_grad=false
  weight_norm    ||w|| before the step
  update_norm    ||dw||, the change the optimizer step made
  update_ratio   ||dw|| / ||w||
  dist_init      ||w - w0||, distance from the initial weights (0 at step 0)
  cos_prev       cosine between this step's gradient and the previous step's
  eff_lr         ||dw|| / ||.grad||  (= lr for plain SGD)
  grad_none      how many parameter tensors have .grad None (frozen or cut off by a detach)

and overall `frozen_max_change`, the largest |dw| of any frozen parameter (must stay 0).
`full` adds weight and gradient histograms and the top Hessian eigenvalue (power iteration on
Hessian-vector products of the current batch's loss) at sparser intervals.

Nothing is synced per step: statistics are 0-d device tensors, stacked into one row per probe
and handed to the RunRecorder, which writes them with the loss at its next flush. The probes
never touch .grad, the weights, BatchNorm buffers or the global RNG, so they cannot change the
curve they measure.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

STATS = ("grad_norm", "acc_grad_norm", "weight_norm", "update_norm", "update_ratio",
         "dist_init", "cos_prev", "eff_lr", "grad_none")


def top_hessian_eigenvalue(loss: torch.Tensor, params: list[torch.Tensor], iters: int = 10,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Largest-magnitude eigenvalue of d2 loss / d params2 by power iteration on HVPs."""
    grads = torch.autograd.grad(loss, params, create_graph=True)
    v = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    eig = torch.zeros((), device=loss.device)
    for _ in range(iters):
        norm = torch.sqrt(sum((x * x).sum() for x in v))
        v = [x / norm for x in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eig = sum((a * b).sum() for a, b in zip(hv, v, strict=True))  # Rayleigh quotient
        v = [h.detach() for h in hv]
    return eig.detach()


class Probes(L.Callback):
    def __init__(self, recorder, mode: str = "cheap", every_n_steps: int = 10,
                 histogram_every_n_steps: int = 100, hessian_every_n_steps: int = 200,
                 hessian_iters: int = 10, zero_grad: bool = True):
        self.recorder, self.mode, self.every = recorder, mode, every_n_steps
        self.hist_every, self.hess_every = histogram_every_n_steps, hessian_every_n_steps
        self.hess_iters, self.zero_grad = hessian_iters, zero_grad
        self.pending: list[tuple[int, int, torch.Tensor]] = []
        self.frozen_max_change = 0.0
        self._restored: dict | None = None
        recorder.sources.append(self)

    # -- set-up: parameter list, group index, initial weights
    def on_train_start(self, trainer, pl_module):
        named = list(pl_module.model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.groups = list(dict.fromkeys(n.split(".")[0] for n in self.names))
        device = self.params[0].device
        self.group_of = torch.tensor([self.groups.index(n.split(".")[0]) for n in self.names],
                                     device=device)
        self.frozen_idx = [i for i, p in enumerate(self.params) if not p.requires_grad]
        # (params x groups+all) membership, so one matmul sums any per-parameter statistic
        self.membership = torch.zeros(len(self.params), len(self.groups) + 1, device=device)
        self.membership[torch.arange(len(self.params)), self.group_of] = 1
        self.membership[:, -1] = 1
        self.w0 = [p.detach().clone() for p in self.params]
        self.columns = [f"probes/{s}/{g}" for s in STATS for g in [*self.groups, "all"]]
        self.columns.append("probes/frozen_max_change")
        self.snapshots: dict[int, list[torch.Tensor]] = {}  # step -> .grad after that step
        self.generator = torch.Generator().manual_seed(0)
        if self._restored is not None:  # resuming: the run's own initial weights and history
            r, self._restored = self._restored, None
            self.w0 = [w.to(device) for w in r["w0"]]
            self.snapshots = {s: [g.to(device) for g in gs] for s, gs in r["snapshots"].items()}
            self.generator.set_state(r["generator"])
            self.frozen_max_change = r["frozen_max_change"]

    # -- checkpoints: what the rest of the probe rows depend on
    def state_dict(self) -> dict:
        if not hasattr(self, "w0"):
            return {}
        return {"w0": self.w0, "snapshots": self.snapshots,
                "generator": self.generator.get_state(),
                "frozen_max_change": self.frozen_max_change}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state or None

    def _grads(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for p in self.params]

    # -- Lightning's per-batch hooks: one batch is one optimizer step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step  # the step about to run
        if step % self.every == 0:
            self.w_before = [p.detach().clone() for p in self.params]
        if self.mode == "full" and step % self.hist_every == 0 and self.recorder.writer:
            for name, p in zip(self.names, self.params, strict=True):  # before the update
                self.recorder.writer.add_histogram(f"weights/{name}", p.detach(), step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step that just ran (0-based, as train/loss)
        every = self.every
        if step % every == 0:
            # .grad is what the optimizer just used: SGD and Adam read it, never write it
            self.acc = self._grads()
            self.none = torch.tensor([p.grad is None for p in self.params],
                                     device=self.group_of.device)
            self.pending.append((step, trainer.current_epoch, self._row(step)))
        if self.mode == "full":  # histograms and Hessian keep their own intervals
            self._full(trainer, pl_module, batch, step)
        # Keep .grad after the one or two steps before a probe: enough to recover the previous
        # step's own gradient (and, when .grad accumulates, this step's increment).
        if (step + 1) % every == 0 or (not self.zero_grad and (step + 2) % every == 0):
            self.snapshots[step] = self._grads()
        if self.snapshots:
            for old in [s for s in self.snapshots if s < step - 1]:
                del self.snapshots[old]

    def _step_grad(self, step: int, acc_now: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """This step's own gradient: .grad itself, or its increment when .grad accumulates."""
        if self.zero_grad:
            return acc_now
        before = self.snapshots.get(step - 1) if step > 0 else [torch.zeros_like(a)
                                                               for a in acc_now]
        return None if before is None else [a - b for a, b in zip(acc_now, before, strict=True)]

    def _row(self, step: int) -> torch.Tensor:
        """All statistics of one probe step as one row, in a few dozen tensor ops.

        Per-parameter squared norms and dot products form a (stats x params) matrix; one matmul
        with the (params x groups+all) membership matrix gives every group's sums at once.
        """
        w_after = [p.detach() for p in self.params]
        dw = torch._foreach_sub(w_after, self.w_before)
        g = self._step_grad(step, self.acc)
        g_prev = self._step_grad(step - 1, self.snapshots[step - 1]) \
            if step - 1 in self.snapshots else None

        def sq(ts):
            return torch.stack(torch._foreach_norm(ts)) ** 2

        per_param = [sq(g), sq(self.acc), sq(self.w_before), sq(dw),
                     sq(torch._foreach_sub(self.w_before, self.w0)), self.none.to(dw[0].dtype)]
        if g_prev is not None:
            dots = [(x * y).sum() for x, y in zip(g, g_prev, strict=True)]
            per_param += [sq(g_prev), torch.stack(dots)]
        sums = torch.stack(per_param) @ self.membership  # (stats, groups + all)
        g2, acc2, w2, dw2, init2, none = sums[:6]
        tiny = 1e-30
        nan = torch.full_like(g2, float("nan"))
        if g_prev is not None:
            cos = sums[7] / (g2.sqrt() * sums[6].sqrt()).clamp_min(tiny)
        else:
            cos = nan
        stats = [g2.sqrt(), acc2.sqrt(), w2.sqrt(), dw2.sqrt(),
                 dw2.sqrt() / w2.sqrt().clamp_min(tiny), init2.sqrt(), cos,
                 torch.where(acc2 > 0, dw2.sqrt() / acc2.sqrt().clamp_min(tiny), nan), none]
        frozen = [dw[i] for i in self.frozen_idx]
        frozen_change = torch.stack(torch._foreach_norm(frozen, float("inf"))).max().view(1) \
            if frozen else torch.zeros(1, device=g2.device)
        return torch.cat([*stats, frozen_change])

    def _full(self, trainer, pl_module, batch, step: int) -> None:
        if step % self.hist_every == 0 and self.recorder.writer:  # the .grad the update used
            for name, p in zip(self.names, self.params, strict=True):
                if p.grad is not None:
                    self.recorder.writer.add_histogram(f"grads/{name}", p.grad.detach(), step)
        if step % self.hess_every == 0:
            # the parameters the loss reaches (not frozen, not cut off by a detach)
            live = [p for p in self.params if p.requires_grad and p.grad is not None]
            model = pl_module.model
            buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN stats must not move
            with torch.enable_grad():
                loss = F.cross_entropy(model(batch[0]), batch[1])
                eig = top_hessian_eigenvalue(loss, live, self.hess_iters, self.generator)
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(buffers[k])
            self.pending.append((step, trainer.current_epoch, eig.view(1)))

    # -- the recorder calls this at each flush: one sync for all pending rows
    def drain(self) -> list[tuple[int, int, dict[str, float]]]:
        out = []
        for step, epoch, row in self.pending:
            values = row.tolist()
            names = self.columns if len(values) == len(self.columns) else ["probes/hessian_top_eig"]
            out.append((step, epoch, dict(zip(names, values, strict=True))))
            if len(values) == len(self.columns):
                self.frozen_max_change = max(self.frozen_max_change, values[-1])
        self.pending.clear()
        return out
