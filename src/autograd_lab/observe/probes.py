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
`full` adds weight and gradient histograms, and turns on the second-order probes (dynamics.py,
spectrum.py) at sparser intervals (any mode but off runs them when their interval is > 0):

  sharpness         the top Hessian eigenvalue of the training loss on a probe set drawn once per
                    run, next to stability_limit (2/lr for plain SGD): every
                    sharpness_every_n_steps, at the weights the step about to run starts from
  grad_noise_scale  B_simple = tr(Sigma)/|G|^2 and its parts gns_trace_sigma and gns_grad_sq,
                    from its own draws of the training set: every gns_every_n_steps
  spectrum          the Hessian's trace per layer group (Hutchinson, with standard errors), its
                    top-k eigenvalues and its spectral density (stochastic Lanczos quadrature),
                    on the first spectrum_examples draws of the sharpness probe set, at the
                    weights the step about to run starts from: every spectrum_every_n_steps
                    (spectrum.py names the rows; the density is a TensorBoard histogram)

Nothing is synced per step: statistics are 0-d device tensors, stacked into one row per probe
and handed to the RunRecorder, which writes them with the loss at its next flush. The probes
never touch .grad, the weights, BatchNorm buffers or the global RNG, so they cannot change the
curve they measure. The second-order probes have their own generators and evaluate the model
with copies of its buffers (curvature.py).
"""

from __future__ import annotations

import lightning as L
import torch

from autograd_lab.data.loader import normalize
from autograd_lab.errors import UserError
from autograd_lab.observe.dynamics import (
    has_train_batchnorm,
    noise_scale,
    per_example_noise,
    sharpness,
    stability_limit,
    two_batch_noise,
)
from autograd_lab.observe.spectrum import DENSITY, is_spectrum, spectrum_row, write_density

GNS_METHODS = ("auto", "per_example", "two_batch")

SHARPNESS = ["probes/sharpness", "probes/stability_limit"]

GNS = ["probes/grad_noise_scale", "probes/gns_trace_sigma", "probes/gns_grad_sq"]

STATS = ("grad_norm", "acc_grad_norm", "weight_norm", "update_norm", "update_ratio",
         "dist_init", "cos_prev", "eff_lr", "grad_none")


class Probes(L.Callback):
    def __init__(self, recorder, mode: str = "cheap", every_n_steps: int = 10,
                 histogram_every_n_steps: int = 100, sharpness_every_n_steps: int = 0,
                 sharpness_examples: int = 1024, sharpness_iters: int = 20,
                 sharpness_batch_size: int | None = None, gns_every_n_steps: int = 0,
                 gns_method: str = "auto", gns_batch_size: int = 256,
                 gns_small_batch_size: int | None = None, spectrum_every_n_steps: int = 0,
                 spectrum_examples: int = 256, spectrum_top_k: int = 5,
                 spectrum_top_iters: int = 20, hutchinson_samples: int = 10, slq_runs: int = 1,
                 slq_iters: int = 30, spectrum_bins: int = 100, zero_grad: bool = True):
        if gns_method not in GNS_METHODS:
            raise UserError(f"probes.gns_method={gns_method!r}: choices are: "
                            f"{', '.join(GNS_METHODS)}")
        self.recorder, self.mode, self.every = recorder, mode, every_n_steps
        self.hist_every, self.zero_grad = histogram_every_n_steps, zero_grad
        self.sharp_every, self.sharp_examples = sharpness_every_n_steps, sharpness_examples
        self.sharp_iters, self.sharp_batch = sharpness_iters, sharpness_batch_size
        self.gns_every, self.gns_method, self.gns_batch = gns_every_n_steps, gns_method, \
            gns_batch_size
        self.gns_small = gns_small_batch_size
        self.spectrum_every, self.spectrum_examples = spectrum_every_n_steps, spectrum_examples
        self.spectrum_args = {"top_k": spectrum_top_k, "top_iters": spectrum_top_iters,
                              "samples": hutchinson_samples, "runs": slq_runs,
                              "iters": slq_iters, "bins": spectrum_bins}
        self.gns_method_used: str | None = None  # per_example or two_batch, once decided
        self.pending: list[tuple[int, int, list[str], torch.Tensor]] = []
        self.frozen_max_change = 0.0
        self._restored: dict | None = None
        recorder.sources.append(self)
        if spectrum_every_n_steps:  # the density's bins: metrics.parquet only, not scalars
            recorder.parquet_only = (*recorder.parquet_only, DENSITY)

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
        # the second-order probes' own random numbers: the training RNG never moves
        self.sharp_gen = torch.Generator().manual_seed(1)
        self.gns_gen = torch.Generator().manual_seed(2)
        self.spectrum_gen = torch.Generator().manual_seed(3)
        if self.sharp_every or self.gns_every or self.spectrum_every:
            self._second_order_setup(trainer, pl_module)
        if self._restored is not None:  # resuming: the run's own initial weights and history
            r, self._restored = self._restored, None
            self.w0 = [w.to(device) for w in r["w0"]]
            self.snapshots = {s: [g.to(device) for g in gs] for s, gs in r["snapshots"].items()}
            if "sharp_gen" in r:  # (checkpoints from before the second-order probes lack them)
                self.sharp_gen.set_state(r["sharp_gen"])
                self.gns_gen.set_state(r["gns_gen"])
            if "spectrum_gen" in r:  # (nor those from before the spectrum probe this one)
                self.spectrum_gen.set_state(r["spectrum_gen"])
            self.frozen_max_change = r["frozen_max_change"]

    def _second_order_setup(self, trainer, pl_module) -> None:
        """The training set as the loader holds it (uint8, this rank's share), the sharpness
        probe set (drawn once per run, the same in every run of a sweep), the batch sizes."""

        loader = trainer.train_dataloader
        self.data_x, self.data_y = loader.x, loader.y
        self.normalize = normalize
        n = len(self.data_y)
        train_batch = min(loader.batch_size, n)
        draw = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(self.data_y.device)
        self.probe_idx = draw[:self.sharp_examples]
        self.spectrum_idx = draw[:self.spectrum_examples]  # nested: the same first draws
        self.sharp_batch = self.sharp_batch or train_batch
        self.gns_small = self.gns_small or train_batch

    def _gns_method(self, model) -> str:
        """per_example or two_batch, decided at the first call (the model's train/eval modes,
        frozen BatchNorms included, are settled by then)."""
        if self.gns_method_used is None:
            method = self.gns_method
            if method == "auto":  # per-example gradients only where examples do not mix
                method = "two_batch" if has_train_batchnorm(model) else "per_example"
            elif method == "per_example" and has_train_batchnorm(model):
                raise UserError("probes.gns_method=per_example: this model has BatchNorm in "
                                "train mode (a batch's examples mix); use two_batch or auto")
            if method == "two_batch" and self.gns_batch < 2 * self.gns_small:
                raise UserError(f"probes.gns_batch_size={self.gns_batch}: two_batch needs at "
                                f"least two batches of {self.gns_small} "
                                f"(probes.gns_small_batch_size)")
            self.gns_method_used = method
        return self.gns_method_used

    # -- checkpoints: what the rest of the probe rows depend on
    def state_dict(self) -> dict:
        if not hasattr(self, "w0"):
            return {}
        return {"w0": self.w0, "snapshots": self.snapshots,
                "sharp_gen": self.sharp_gen.get_state(), "gns_gen": self.gns_gen.get_state(),
                "spectrum_gen": self.spectrum_gen.get_state(),
                "frozen_max_change": self.frozen_max_change}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state or None

    def _grads(self) -> list[torch.Tensor]:
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                for p in self.params]

    # -- Lightning's per-batch hooks: one batch is one optimizer step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step  # the step about to run
        # second-order probes at the weights this step starts from (where train/loss is taken)
        if self.sharp_every and step % self.sharp_every == 0:
            self._sharpness(trainer, pl_module, step)
        if self.gns_every and step % self.gns_every == 0:
            self._noise_scale(trainer, pl_module, step)
        if self.spectrum_every and step % self.spectrum_every == 0:
            names, row = spectrum_row(pl_module.model, self._probe_batches(self.spectrum_idx),
                                      generator=self.spectrum_gen, **self.spectrum_args)
            self.pending.append((step, trainer.current_epoch, names, row))
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
            self.pending.append((step, trainer.current_epoch, self.columns, self._row(step)))
        if self.mode == "full" and step % self.hist_every == 0 and self.recorder.writer:
            for name, p in zip(self.names, self.params, strict=True):  # the .grad the update used
                if p.grad is not None:
                    self.recorder.writer.add_histogram(f"grads/{name}", p.grad.detach(), step)
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

    # -- second-order probes (dynamics.py): own draws, buffer copies, no .grad
    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(self.data_x[idx]), self.data_y[idx]

    def _probe_batches(self, idx) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A probe set in batches of sharpness_batch_size (the spectrum's too)."""
        return [self._batch(idx[lo:lo + self.sharp_batch])
                for lo in range(0, len(idx), self.sharp_batch)]

    def _sharpness(self, trainer, pl_module, step: int) -> None:
        eig = sharpness(pl_module.model, self._probe_batches(self.probe_idx), self.sharp_iters,
                        self.sharp_gen)
        limit = stability_limit(trainer.optimizers[0])
        if limit is None:  # Adam: no raw-Hessian threshold to compare with
            self.pending.append((step, trainer.current_epoch, SHARPNESS[:1], eig.view(1)))
        else:
            row = torch.stack([eig.to(torch.float64), torch.tensor(limit, dtype=torch.float64,
                                                                   device=eig.device)])
            self.pending.append((step, trainer.current_epoch, SHARPNESS, row))

    def _noise_scale(self, trainer, pl_module, step: int) -> None:
        n = len(self.data_y)
        idx = torch.randint(n, (self.gns_batch,), generator=self.gns_gen)  # with replacement:
        x, y = self._batch(idx.to(self.data_y.device))  # the estimators are then unbiased
        if self._gns_method(pl_module.model) == "per_example":
            trace, grad_sq = per_example_noise(pl_module.model, x, y)
        else:
            trace, grad_sq = two_batch_noise(pl_module.model, x, y, self.gns_small)
        row = torch.stack([noise_scale(trace, grad_sq), trace, grad_sq])
        self.pending.append((step, trainer.current_epoch, GNS, row))

    # -- the recorder calls this at each flush: one sync for all pending rows
    def drain(self) -> list[tuple[int, int, dict[str, float]]]:
        out = []
        for step, epoch, names, row in self.pending:
            values = row.tolist()
            out.append((step, epoch, dict(zip(names, values, strict=True))))
            if names is self.columns:
                self.frozen_max_change = max(self.frozen_max_change, values[-1])
            elif is_spectrum(names) and self.recorder.writer is not None and (
                    self.recorder.diverged_at is None or step < self.recorder.diverged_at):
                write_density(self.recorder.writer, step, out[-1][2])
        self.pending.clear()
        return out
