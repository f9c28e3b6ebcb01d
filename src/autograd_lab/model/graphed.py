"""`trainer.cuda_graph=true`: the seed's training step captured once as a CUDA graph, replayed.

The step is the Classifier's own (zero_grad unless train.zero_grad=false, forward,
cross-entropy, backward, the torch optimizer's step), written against tensors that stay put:
the batch is copied into static inputs the graph reads, `.grad` is zeroed in place
(`set_to_none=False`) so the gradient tensors the graph writes persist (and keep accumulating
with train.zero_grad=false), and the loss lands in a static output, cloned once per step into
`step_losses`. Parameters, `.grad`, the optimizer's state and BatchNorm's buffers are the
module's own tensors, read and written in place by every replay: checkpoints hold the graph's
state, probes and the recorder read it between steps, and a resume restores into those tensors
before the capture (taken lazily, at the fit's first steps, after Lightning's restore).

What a replay cannot do runs eagerly, with the same arithmetic on the same tensors
(`Classifier.eager_step`, through Lightning's optimizer wrapper, every hook included):
- the first WARMUP steps (torch's whole-network recipe: .grad, momentum buffers, Adam's state
  and library handles are made on a side stream before the capture);
- a batch of another shape (an epoch's last, partial batch): eager, the graph kept;
- after anything the graph baked in changed (a learning rate an epoch schedule set, a `.grad` or
  optimizer-state tensor replaced): the graph is dropped and taken again after WARMUP steps.
A captured kernel reads the learning rate as the float it was at capture: torch's SGD has no
tensor-lr path that capture allows, and Adam's (capturable) would change its arithmetic, so a
schedule that moves the rate every step is refused (config/schema.py); an epoch schedule costs
one capture an epoch. Adam (any optimizer with a `capturable` flag) is built with
capturable=True, which capture needs: its bias corrections are then device tensors, so its
curve equals the eager run of `optim.capturable=true`, not the default Adam's, bit for bit.

Lightning's contract: one batch is one optimizer step. The eager steps count through
LightningOptimizer.step; a replay counts through the same two calls that method makes around
the update (see `_replay`). Hooks that run inside a step (on_before_backward,
on_after_backward, on_before_optimizer_step) cannot run inside a replay: a callback that
defines one is refused (`refuse_mid_step_hooks`).

`GraphedStep.capture = False` (tests) runs the captured body itself, eagerly, where a replay
would run: the same static buffers, copy-in, in-place zero_grad and step counting, on a CPU.
"""

from __future__ import annotations

import contextlib
import warnings

import lightning as L
import torch
import torch.nn.functional as F

from autograd_lab.errors import UserError, reason

WARMUP = 3  # eager steps of one batch shape before a capture (torch's recipe warms up 3)
MID_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
# observe.graph_view.TensorBoardGraph walks the backward graph in on_before_backward of the
# run's first step only, which is always an eager warm-up step (and does nothing on a resume)
FIRST_STEP_ONLY = ("TensorBoardGraph",)
_CAPTURABLE_WARNING = "This instance was constructed with capturable=True"


class GraphedStep:
    """The Classifier's training step as one CUDA graph: `step(x, y)` -> the loss (on the
    device). Made at fit start; captures at the first step after WARMUP eager ones."""

    capture = True  # False: run the captured body eagerly instead of replaying (CPU tests)

    def __init__(self, module):
        self.module = module
        self.optimizer = module._optimizer.optimizer  # the torch optimizer Lightning wraps
        self.graph = None  # a torch.cuda.CUDAGraph (True without capture) once captured
        self.x = self.y = self.loss = None  # the static input and output
        self.layout = self.bindings = None  # what the graph was captured with
        self.warm, self.warm_layout = 0, None
        self.replays = self.captures = self.eager_steps = 0  # tests and the GPU check read
        self.stream = None
        if self.capture:
            if module.device.type != "cuda":
                raise UserError(f"trainer.cuda_graph=true: CUDA graphs need a CUDA GPU (this "
                                f"run is on {module.device.type}); use trainer.cuda_graph="
                                f"false")
            self.stream = torch.cuda.Stream(module.device)
        refuse_mid_step_hooks(module)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on the batch (x, y): replayed, captured, or eager."""
        if self.graph is not None and not _same(self.bindings, self._bindings()):
            self.graph, self.warm = None, 0  # a new lr or tensor the graph does not know
        layout = _layout(x, y)
        if self.graph is None:
            self.warm = self.warm + 1 if layout == self.warm_layout else 1
            self.warm_layout = layout
            if self.warm <= WARMUP:
                with self._side_stream():
                    loss = self._eager(x, y)
                return loss.clone()  # made on this stream (the side stream's is freed)
            self._capture(x, y)
        elif layout != self.layout:  # a partial last batch: eager, on the same tensors
            return self._eager(x, y)
        return self._replay(x, y)

    # -- the step's three ways
    def _eager(self, x, y) -> torch.Tensor:
        self.eager_steps += 1
        with warnings.catch_warnings():  # Adam(capturable=True) outside a capture, on purpose
            warnings.filterwarnings("ignore", message=_CAPTURABLE_WARNING)
            return self.module.eager_step(x, y, set_to_none=False)

    def _body(self) -> torch.Tensor:
        """What the graph holds: the eager step's arithmetic on the static tensors, with the
        torch optimizer itself (no Lightning wrapper: its Python hooks cannot be captured)."""
        if self.module.reset_grads:  # train.zero_grad: in place, so .grad stays the same tensor
            self.optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self.module.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _capture(self, x, y) -> None:
        self.x, self.y = x.clone(), y.clone()  # static inputs, outside the graph's pool
        self.layout = _layout(x, y)
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self.loss = self._body()
            except RuntimeError as e:
                raise UserError(f"trainer.cuda_graph=true: the step cannot be captured as a "
                                f"CUDA graph ({reason(e)}); use trainer.cuda_graph="
                                f"false") from None
            self.graph = graph
        else:
            self.graph = True
        self.bindings = self._bindings()
        self.captures += 1

    def _replay(self, x, y) -> torch.Tensor:
        self.x.copy_(x)
        self.y.copy_(y)
        opt = self.module._optimizer
        # Lightning counts a manual optimizer step (trainer.global_step, the "optimizer_step"
        # profiler range) in these two callables, which its manual loop sets on each
        # LightningOptimizer and LightningOptimizer.step calls around the strategy's update.
        # The update here is inside the graph, so the replay calls them itself: private names
        # (no public hook counts a step without running the optimizer again);
        # tests/test_cuda_graph.py::test_lightning_counts_steps_where_the_replay_counts fails
        # if Lightning changes them.
        opt._on_before_step()
        if self.capture:
            self.graph.replay()
        else:
            self.loss = self._body()
        opt._on_after_step()
        self.replays += 1
        return self.loss.clone()  # the static output is overwritten by the next replay

    # -- what the graph is bound to
    def _bindings(self) -> list:
        """The tensors and numbers a capture bakes in: each parameter's `.grad`, the optimizer's
        hyperparameters (lr, momentum, betas, ...) and state tensors. A replay is valid while
        these are the same objects and values."""
        opt = self.optimizer
        out: list = []
        for group in opt.param_groups:
            out += [p.grad for p in group["params"]]
            out += [v for k, v in sorted(group.items()) if k != "params"]
            for p in group["params"]:
                out += list(opt.state[p].values()) if p in opt.state else []
        return out

    def _side_stream(self):
        """Warm-up steps on the side stream the capture uses (torch's recipe), or nothing."""
        if self.stream is None:
            return contextlib.nullcontext()
        return _on_stream(self.stream)


@contextlib.contextmanager
def _on_stream(stream):
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


def _layout(x: torch.Tensor, y: torch.Tensor) -> tuple:
    return (x.shape, x.stride(), x.dtype, x.device, y.shape, y.stride(), y.dtype)


def _same(a: list, b: list) -> bool:
    """Tensors by identity, numbers and flags by value."""
    return len(a) == len(b) and all(
        u is v or (not isinstance(u, torch.Tensor) and not isinstance(v, torch.Tensor)
                   and u == v) for u, v in zip(a, b, strict=True))


def refuse_mid_step_hooks(module) -> None:
    """One line for a callback (or module) that defines a hook Lightning calls inside the step
    (MID_STEP_HOOKS): a replay runs the whole step as one launch, so it would never run."""
    found = [(module, L.LightningModule, "the module")]
    found += [(cb, L.Callback, "callback") for cb in module.trainer.callbacks]
    for obj, base, what in found:
        name = type(obj).__name__
        hooks = [h for h in MID_STEP_HOOKS if getattr(type(obj), h) is not getattr(base, h)]
        if hooks and name not in FIRST_STEP_ONLY:
            raise UserError(f"trainer.cuda_graph=true with the {what} {name}: its {hooks[0]} "
                            f"runs inside the training step, which a CUDA graph replays as one "
                            f"launch; remove it or use trainer.cuda_graph=false")
