"""Loss-landscape slices, the math only: a model's state as named tensors (its parameters and
its floating buffers, the BatchNorm running statistics), filter-normalised random directions
(Li et al. 2018), a model evaluated at the points of a line (Goodfellow et al. 2015) or a plane
through a state with any metric function, and other states (a run's checkpoints) projected onto
a plane by least squares. Nothing here reads files or knows the harness's config."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

State = dict  # name -> tensor: parameters and floating buffers (BatchNorm running statistics)


def model_state(model: nn.Module) -> State:
    """Every parameter and floating buffer of `model` (detached copies), by name. Integer buffers
    (BatchNorm's num_batches_tracked) are left out: they are counters, not coordinates."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if b.is_floating_point()})
    return out


def tensor_kinds(model: nn.Module) -> dict[str, str]:
    """What each entry of `model_state` is: `filter` (a weight of 2+ dimensions: its rows along
    dimension 0 are the filters, or a Linear layer's output units), `bias` (a 1-dimensional
    parameter of another layer), `norm` (a BatchNorm/GroupNorm/LayerNorm weight or bias),
    `buffer` (a running statistic). Frozen parameters keep their kind: see `random_direction`."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
             nn.modules.instancenorm._InstanceNorm)
    kinds = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, p in module.named_parameters(recurse=False):
            kinds[dot + name] = ("norm" if isinstance(module, norms)
                                 else "filter" if p.dim() >= 2 else "bias")
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point():
                kinds[dot + name] = "buffer"
    return kinds


def random_direction(weights: State, kinds: dict[str, str], generator: torch.Generator,
                     moved: set[str] | None = None, include_bias: bool = False,
                     include_norm: bool = False) -> State:
    """A filter-normalised random direction (Li et al. 2018): Gaussian entries, then each filter
    (a slice along dimension 0 of a weight) rescaled to the norm of the matching filter of
    `weights`. Biases and normalisation-layer weights/biases are zero unless `include_bias` /
    `include_norm` (then each entry is its own filter: ±|w_i|); running statistics are always
    zero, and so is every entry whose name is not in `moved` (frozen parameters: the optimizer
    never moves them). Drawn in `weights`' order from `generator` alone."""
    out = {}
    for name, w in weights.items():
        kind = kinds[name]
        d = torch.randn(w.shape, generator=generator, dtype=w.dtype).to(w.device)
        wanted = (kind == "filter" or (kind == "bias" and include_bias)
                  or (kind == "norm" and include_norm))
        if not wanted or (moved is not None and name not in moved):
            out[name] = torch.zeros_like(w)
            continue
        out[name] = normalize_filters(d, w)
    return out


def normalize_filters(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`d` with each filter (slice along dimension 0; each entry of a vector) rescaled to the norm
    of the matching filter of `w`."""
    flat_d, flat_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
    scale = flat_w.norm(dim=1, keepdim=True) / (flat_d.norm(dim=1, keepdim=True) + 1e-10)
    return (flat_d * scale).reshape(d.shape)


def scaled_to(direction: State, weights: State, names) -> State:
    """`direction` rescaled so its norm over `names` equals that of `weights` over `names` (a
    unit Hessian eigenvector then moves as far at coordinate 1 as a filter-normalised random
    direction does)."""
    dn = torch.sqrt(sum((direction[n].double() ** 2).sum() for n in names))
    wn = torch.sqrt(sum((weights[n].double() ** 2).sum() for n in names))
    factor = float(wn / dn) if float(dn) > 0 else 0.0
    return {n: t * factor for n, t in direction.items()}


# ------------------------------------------------------------------ evaluation
def _live(model: nn.Module, names) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return {n: tensors[n] for n in names}


def load_state(model: nn.Module, state: State) -> None:
    """Put `state`'s tensors into the model's parameters and buffers (in place)."""
    with torch.no_grad():
        for name, t in _live(model, state).items():
            t.copy_(state[name])


def along_line(model: nn.Module, start: State, end: State, alphas: Sequence[float],
               measure: Callable[[nn.Module], dict], progress: Callable | None = None
               ) -> list[dict]:
    """`measure(model)` at start + α (end - start) for each α (torch.lerp: α=0 and α=1 are
    `start` and `end` exactly), every entry of the states (parameters and running statistics)
    interpolated. The model is left at `end`."""
    live = _live(model, start)
    rows = []
    diff = {n: end[n] - start[n] for n in start}
    with InputLayerShortcut.when_possible(model, measure, start, [diff]) as shortcut, \
            FastPooling(model):
        for alpha in alphas:
            with torch.no_grad():
                for name, t in live.items():
                    t.copy_(torch.lerp(start[name], end[name], float(alpha)))
            shortcut.coeffs = (float(alpha),)
            rows.append({"alpha": float(alpha), **measure(model)})
            if progress is not None:
                progress()
    load_state(model, end)
    return rows


def on_plane(model: nn.Module, center: State, d1: State, d2: State, coords,
             measure: Callable[[nn.Module], dict], progress: Callable | None = None
             ) -> list[dict]:
    """`measure(model)` at center + x d1 + y d2 for each (x, y) in `coords`; any model and any
    measure (a dict of numbers). The model is left at `center`."""
    live = _live(model, center)
    moved = [n for n in live if bool(d1[n].any()) or bool(d2[n].any())]
    load_state(model, center)
    rows = []
    with InputLayerShortcut.when_possible(model, measure, center, [d1, d2]) as shortcut, \
            FastPooling(model):
        for x, y in coords:
            with torch.no_grad():
                for name in moved:
                    live[name].copy_(center[name]).add_(d1[name], alpha=float(x)).add_(
                        d2[name], alpha=float(y))
            shortcut.coeffs = (float(x), float(y))
            rows.append({"x": float(x), "y": float(y), **measure(model)})
            if progress is not None:
                progress()
    load_state(model, center)
    return rows


class InputLayerShortcut:
    """A speed-up, exact up to rounding, for a model whose first layer (a Conv or Linear) reads
    the model's input itself: that layer's output is affine in its weight and bias, so at
    origin + sum_i c_i d_i it is out(origin) + sum_i c_i out(d_i) (the direction's bias in
    place of the bias). Those outputs are computed once for each fixed batch, and each point
    of a line or plane then costs the layers after it only (SmallNet: a quarter of a
    forward). Used by `along_line` / `on_plane` when the measure names its inputs and batch
    size (`classification_measure`) and the cache fits in `budget` bytes; a batch it has not
    seen runs the layer as usual. The layer's forward is replaced for the block only."""

    def __init__(self, module: nn.Module, name: str, origin: State, directions: list[State],
                 inputs, batch_size: int):
        from torch.func import functional_call

        self.module, self.coeffs, self.cache = module, (), {}
        keys = [k for k in ("weight", "bias") if getattr(module, k, None) is not None]

        def call(state, x):
            return functional_call(module, {k: state[f"{name}.{k}"] for k in keys}, (x,))

        with torch.inference_mode():
            for x in inputs:
                for i in range(0, len(x), batch_size):
                    xb = x[i:i + batch_size]
                    self.cache[(xb.data_ptr(), len(xb))] = [
                        call(origin, xb), *(call(d, xb) for d in directions)]

    def forward(self, x):
        outs = self.cache.get((x.data_ptr(), len(x)))
        if outs is None:
            return type(self.module).forward(self.module, x)
        z = outs[0].clone()
        for c, out in zip(self.coeffs, outs[1:], strict=True):
            if c:
                z.add_(out, alpha=c)
        return z

    def __enter__(self):
        self.module.forward = self.forward  # an instance attribute: nn.Module.__call__ uses it
        return self

    def __exit__(self, *exc):
        del self.module.forward
        self.cache = {}

    @staticmethod
    def input_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, nn.Module] | None:
        """(name, module) of the Conv/Linear that receives `x` itself, called once, when it
        is the only module that does; else None."""
        calls: list = []
        handles = [m.register_forward_pre_hook(
            lambda mod, args, n=n: calls.append((n, mod, bool(args) and args[0] is x)))
            for n, m in model.named_modules() if not list(m.children())]
        try:
            with torch.inference_mode():
                model(x)
        finally:
            for h in handles:
                h.remove()
        readers = [(n, m) for n, m, raw in calls if raw]
        kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
        if len(readers) != 1 or not isinstance(readers[0][1], kinds):
            return None
        if sum(1 for n, _, _ in calls if n == readers[0][0]) != 1:
            return None
        return readers[0]

    @classmethod
    def when_possible(cls, model, measure, origin: State, directions: list[State],
                      budget: int = 1 << 30):
        """The shortcut for this model and measure, or a stand-in that does nothing."""
        import contextlib

        inputs = getattr(measure, "inputs", None)
        size = getattr(measure, "batch_size", None)
        if not inputs or not size:
            return contextlib.nullcontext(_NoShortcut())
        found = cls.input_layer(model, inputs[0][:2])
        if found is None:
            return contextlib.nullcontext(_NoShortcut())
        name, module = found
        with torch.inference_mode():
            per_example = module(inputs[0][:1]).numel() * inputs[0].element_size()
        if per_example * sum(len(x) for x in inputs) * (1 + len(directions)) > budget:
            return contextlib.nullcontext(_NoShortcut())
        return cls(module, name, origin, directions, inputs, size)


class _NoShortcut:
    coeffs = ()


def strided_max_pool(x: torch.Tensor, k: int) -> torch.Tensor:
    """MaxPool2d(k) (stride k, no padding, floor) as the elementwise maximum of its k*k strided
    views: the same numbers (a maximum is exact; NaN propagates as in max_pool2d), several
    times faster on the CPU than torch's max_pool2d kernel for small channel counts."""
    h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
    out = None
    for i in range(k):
        for j in range(k):
            view = x[..., i:h:k, j:w:k]
            out = view.clone() if out is None else torch.maximum(out, view)
    return out


class FastPooling:
    """Within the block, each MaxPool2d of the model with stride = kernel, no padding, no
    dilation, no indices and floor rounding runs `strided_max_pool` (its forward replaced on
    the instance, restored at the end). Used only to evaluate, never to train."""

    def __init__(self, model: nn.Module):
        self.pools = []
        for m in model.modules():
            if type(m) is nn.MaxPool2d and not m.return_indices and not m.ceil_mode:
                k, stride = m.kernel_size, m.stride
                if (isinstance(k, int) and stride in (k, (k, k)) and m.padding in (0, (0, 0))
                        and m.dilation in (1, (1, 1))):
                    self.pools.append((m, k))

    def __enter__(self):
        for m, k in self.pools:
            m.forward = lambda x, k=k: strided_max_pool(x, k)
        return self

    def __exit__(self, *exc):
        for m, _ in self.pools:
            del m.forward


def classification_measure(sets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                           batch_size: int) -> Callable[[nn.Module], dict]:
    """measure(model) -> {<set>_loss, <set>_acc}: mean cross-entropy and accuracy over each
    fixed set of (normalised images, labels), in batches, under torch.inference_mode. The model
    is evaluated as it is (the caller puts it in eval mode)."""

    def measure(model: nn.Module) -> dict:
        out = {}
        with torch.inference_mode():
            for name, (x, y) in sets.items():
                loss = torch.zeros((), dtype=torch.float64, device=x.device)
                correct = torch.zeros((), dtype=torch.int64, device=x.device)
                for i in range(0, len(x), batch_size):
                    logits = model(x[i:i + batch_size])
                    target = y[i:i + batch_size]
                    loss += F.cross_entropy(logits, target, reduction="sum").double()
                    correct += (logits.argmax(1) == target).sum()
                out[f"{name}_loss"] = float(loss) / len(x)
                out[f"{name}_acc"] = int(correct) / len(x)
        return out

    measure.inputs = [x for x, _ in sets.values()]  # for InputLayerShortcut
    measure.batch_size = batch_size
    return measure


# ------------------------------------------------------------------ projection
def project(states: Sequence[State], center: State, d1: State, d2: State, names
            ) -> tuple[list[tuple[float, float]], list[float]]:
    """Each state's coordinates (x, y) on the plane center + x d1 + y d2: the least-squares
    solution over the entries `names` (float64), and the share of its displacement from
    `center` that lies off the plane (|residual| / |state - center|; 0 on the plane)."""
    basis = torch.stack([torch.cat([d[n].double().flatten() for n in names]) for d in (d1, d2)],
                        dim=1)
    origin = torch.cat([center[n].double().flatten() for n in names])
    coords, off = [], []
    for s in states:
        r = torch.cat([s[n].double().flatten() for n in names]) - origin
        sol = torch.linalg.lstsq(basis, r.unsqueeze(1)).solution.squeeze(1)
        resid = r - basis @ sol
        coords.append((float(sol[0]), float(sol[1])))
        norm = float(r.norm())
        off.append(float(resid.norm()) / norm if norm > 0 else 0.0)
    return coords, off


def alpha_grid(lo: float, hi: float, points: int) -> np.ndarray:
    """`points` values of α from lo to hi, with α = 0, ½ and 1 added when missing (the two ends
    and the midpoint are always evaluated: the barrier and the table's columns need them)."""
    values = np.concatenate([np.linspace(lo, hi, points), [0.0, 0.5, 1.0]])
    return np.unique(np.round(values, 12))


def barrier(alphas, losses) -> float:
    """max over α in [0, 1] of loss(α) minus the straight line between loss(0) and loss(1)."""
    a, v = np.asarray(alphas, float), np.asarray(losses, float)
    l0, l1 = v[np.isclose(a, 0)][0], v[np.isclose(a, 1)][0]
    inside = (a >= -1e-12) & (a <= 1 + 1e-12)
    return float(np.max(v[inside] - ((1 - a[inside]) * l0 + a[inside] * l1)))


def distinct_states(states: list[State], steps: list) -> tuple[list[State], list]:
    """One entry per checkpoint state: of two neighbours at the same step with identical
    tensors (a ModelCheckpoint file and the final weights, both at the last step) the later is
    kept."""
    keep = [i for i in range(len(states)) if i + 1 == len(states) or steps[i] != steps[i + 1]
            or any(not torch.equal(v, states[i + 1][k]) for k, v in states[i].items())]
    return [states[i] for i in keep], [steps[i] for i in keep]
