"""Loss-landscape slices of finished runs: the model rebuilt from a run's config, its weights
read from its checkpoints, a fixed set of examples drawn once, then a line (initial -> final
weights, or one run's final weights -> another's) or a plane through the final weights
evaluated point by point (observe.landscape), and the results written beside the run
(landscape_files). Over a sweep, the paired runs of each seed (sweep.pairs) are interpolated
and their barriers tabulated. Nothing of a run is changed: its files are only read, under a
shared lock (landscape_runs.reading)."""

from __future__ import annotations

import contextlib
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf

from autograd_lab.data.loader import load_split_tensors, normalize
from autograd_lab.errors import UserError
from autograd_lab.job.build import build_network
from autograd_lab.job.messages import busy_note, machine_load
from autograd_lab.job.resumable import load
from autograd_lab.observe.curvature import top_eigenpairs
from autograd_lab.observe.landscape import (
    along_line,
    alpha_grid,
    barrier,
    classification_measure,
    distinct_states,
    load_state,
    model_state,
    on_plane,
    project,
    random_direction,
    scaled_to,
    tensor_kinds,
)
from autograd_lab.sweep import landscape_files as out
from autograd_lab.sweep.landscape_runs import (
    check_same_model,
    end_label,
    output_folder,
    reading,
    run_checkpoints,
    run_config,
    safe_name,
)
from autograd_lab.sweep.pairs import pair_runs
from autograd_lab.sweep.runs import load_runs


@dataclass
class Slice:
    """One slice, written: its points (`frame`), the checkpoints projected onto a plane
    (`trajectory`), the files written."""

    name: str
    kind: str  # "line" or "plane"
    frame: pd.DataFrame
    files: list[Path] = field(default_factory=list)
    trajectory: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------ a run's parts
def _cfg(config: dict, data_root: str | None):
    cfg = OmegaConf.create(config)
    if data_root is not None:
        cfg.data.root = str(data_root)
    return cfg


def build_model(cfg, device) -> torch.nn.Module:
    """The run's model, its variants applied, by the training run's own builder; eval mode."""
    model, _report, _det, hooks = build_network(cfg)
    for h in hooks:
        h.remove()
    return model.to(device).eval()


def initial_state(cfg, device) -> dict:
    """The run's initial weights, rebuilt: the training run seeds torch with `seed` and builds
    the model before anything else draws a random number (job.build.build_parts), so the same
    two steps give the same weights (tests/test_landscape.py checks them against the run's
    step-0 loss)."""
    torch.manual_seed(int(cfg.seed))
    return model_state(build_model(cfg, device))


def checkpoint_state(path: Path, model: torch.nn.Module) -> tuple[dict, int | None]:
    """(the model's state in a checkpoint, its global step): Lightning's checkpoint, read with
    weights_only=True (job.resumable.load), the network under the module's `model.` prefix."""
    ckpt = load(path)
    weights = {k.removeprefix("model."): v for k, v in ckpt.get("state_dict", {}).items()
               if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"checkpoint {path}: does not fit the model the run's config builds "
                        f"({str(e).splitlines()[0]})") from None
    step = ckpt.get("global_step")
    return model_state(model), (int(step) if isinstance(step, int) else None)


def fixed_sets(cfg, examples: int, seed: int, device) -> dict:
    """{"train": (x, y), "val": (x, y)}: `examples` images of each split (all when fewer),
    drawn once without replacement by a generator of their own seeded with `seed` (train first,
    then val, each sorted), normalised as training normalises them, resident on `device`. The
    train split is the one the run trained on (data.subset: its first N images)."""
    tensors = load_split_tensors(cfg.data)
    g = torch.Generator().manual_seed(int(seed))
    subset = cfg.data.get("subset") or None
    sets = {}
    for split, x, y in (("train", tensors["train_x"][:subset], tensors["train_y"][:subset]),
                        ("val", tensors["test_x"], tensors["test_y"])):
        idx = torch.randperm(len(x), generator=g)[:examples].sort().values
        sets[split] = (normalize(x[idx]).to(device), y[idx].to(device))
    return sets


@contextlib.contextmanager
def torch_threads(n: int | None, device: str | None = None):
    """torch's intra-op threads set to `n` for the block. None: torch's own count, unless the
    slice runs on the CPU and other processes keep busy the cores those threads need (each
    parallel region waits for its slowest thread: job.messages.busy_note); then as many threads
    as cores are free (at least 1), said in one line on stderr."""
    before = torch.get_num_threads()
    if n is None and before > 1 and _device(device).type == "cpu":
        load = machine_load(before)
        if busy_note(load["busy_cores"], load["cores"], before):
            n = max(1, int(load["cores"] - load["busy_cores"]))
            print(f"autograd-lab: note: this machine is busy (other processes use "
                  f"{load['busy_cores']:.1f} of {load['cores']} cores): {n} torch thread"
                  f"{'s' * (n > 1)} instead of {before} (--threads N sets it)", file=sys.stderr)
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm  # the text bar (stderr), in a notebook too: no widget needed

    return tqdm(total=total, desc=desc, unit="point", file=sys.stderr, leave=False,
                disable=None if progress else True, dynamic_ncols=True)  # None: a terminal only


# ------------------------------------------------------------------ a line
def line(run_dir: Path, to: Path | None = None, *, alphas=(-0.5, 1.5), points: int = 51,
         examples: int = 2048, batch_size: int = 1024, seed: int = 0, name: str | None = None,
         out_dir: Path | None = None, board: bool = True, progress: bool = True,
         device: str | None = None, data_root: str | None = None, title: str | None = None,
         labels: tuple[str, str] | None = None) -> Slice:
    """Linear interpolation (Goodfellow et al. 2015) between the run's initial and final
    weights, or (`to`) between its final weights and another run's, BatchNorm running
    statistics interpolated with them; train and val loss and accuracy at each α."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    with contextlib.ExitStack() as held:
        held.enter_context(reading(run_dir))
        final_ckpt, _ = run_checkpoints(run_dir)
        if to is not None:
            to = Path(to)
            other = run_config(to)
            check_same_model(run_dir, config, to, other)
            held.enter_context(reading(to))
            other_ckpt, _ = run_checkpoints(to)
        dev = _device(device)
        cfg = _cfg(config, data_root)
        model = build_model(cfg, dev)
        if to is None:
            start, start_step = initial_state(cfg, dev), 0
            end, end_step = checkpoint_state(final_ckpt, model)
            labels = labels or ("initial weights", end_label(run_dir, end_step))
            name = name or "interpolation"
        else:
            start, start_step = checkpoint_state(final_ckpt, model)
            end, end_step = checkpoint_state(other_ckpt, model)
            labels = labels or (f"{run_dir.name}: {end_label(run_dir, start_step)}",
                                f"{to.name}: {end_label(to, end_step)}")
            name = name or f"interpolation_to_{safe_name(to.name)}"
        sets = fixed_sets(cfg, examples, seed, dev)
        grid = alpha_grid(alphas[0], alphas[1], points)
        with _bar(len(grid), name, progress) as bar:
            rows = along_line(model, start, end, grid, classification_measure(sets, batch_size),
                              progress=bar.update)
        frame = pd.DataFrame(rows)
        meta = {"kind": "line", "run": str(run_dir), "to": str(to) if to else None,
                "from_step": start_step, "to_step": end_step, "labels": list(labels),
                "examples": {k: len(v[1]) for k, v in sets.items()}, "example_seed": seed,
                "barrier": barrier(frame.alpha, frame.train_loss),
                "val_barrier": barrier(frame.alpha, frame.val_loss)}
        folder = output_folder(out_dir if out_dir is not None else run_dir)
        title = title or (f"{run_dir.name}: loss along the straight line to another run's final "
                          f"weights" if to is not None else f"{run_dir.name}: loss from the "
                          f"initial (α=0) to the {labels[1].split(' (')[0]} (α=1)")
        fig = out.line_figure(frame, title, labels, meta["examples"])
        files = out.write_slice(folder, name, frame, fig, meta)
        if board:
            files.append(out.write_board(run_dir, name, files[1], frame, end_step))
    return Slice(name, "line", frame, files, None, meta)


# ------------------------------------------------------------------ a plane
def plane(run_dir: Path, *, directions: str = "random", grid: int = 25, span: float = 1.0,
          examples: int = 2048, batch_size: int = 1024, seed: int = 0,
          include_bias: bool = False, include_bn: bool = False, hessian_iters: int = 20,
          name: str | None = None, board: bool = True, progress: bool = True,
          device: str | None = None, data_root: str | None = None) -> Slice:
    """The loss on a plane through the run's final weights, spanned by two filter-normalised
    random directions (seeded) or the top-2 Hessian eigenvectors of the training loss on the
    fixed train set, each scaled to the weights' norm; coordinates from -span to span on a
    grid x grid lattice; the run's checkpoints (initial weights first) projected onto it."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    with reading(run_dir):
        final_ckpt, others = run_checkpoints(run_dir)
        dev = _device(device)
        cfg = _cfg(config, data_root)
        model = build_model(cfg, dev)
        init = initial_state(cfg, dev)
        path_states, steps = [init], [0]
        for path in others:
            state, step = checkpoint_state(path, model)
            path_states.append(state)
            steps.append(step)
        center, final_step = checkpoint_state(final_ckpt, model)  # the model is left here
        path_states, steps = distinct_states([*path_states, center], [*steps, final_step])
        sets = fixed_sets(cfg, examples, seed, dev)
        moved = {n for n, p in model.named_parameters() if p.requires_grad}
        g = torch.Generator().manual_seed(int(seed))
        if directions == "hessian":
            batches = [(sets["train"][0][i:i + batch_size], sets["train"][1][i:i + batch_size])
                       for i in range(0, len(sets["train"][1]), batch_size)]
            values, vectors = top_eigenpairs(model, batches, 2, hessian_iters, g)
            names = sorted(vectors[0], key=list(center).index)
            d1, d2 = ({n: v.get(n, torch.zeros_like(t)) for n, t in center.items()}
                      for v in vectors)
            d1, d2 = scaled_to(d1, center, names), scaled_to(d2, center, names)
            axis = [f"Hessian eigenvector {i + 1} (λ={float(v):.3g}; unit: |weights|)" for i, v in
                    enumerate(values)]
            name = name or "plane_hessian"
        else:
            kinds = tensor_kinds(model)
            d1, d2 = (random_direction(center, kinds, g, moved, include_bias, include_bn)
                      for _ in range(2))
            axis = [f"random direction {i} (filter-normalised, seed {seed})" for i in (1, 2)]
            name = name or f"plane_random_seed{seed}"
        ticks = np.linspace(-span, span, grid)
        coords = [(x, y) for y in ticks for x in ticks]
        measure = classification_measure(sets, batch_size)
        with _bar(len(coords) + len(path_states), name, progress) as bar:
            rows = on_plane(model, center, d1, d2, coords, measure, progress=bar.update)
            truth = []
            for state in path_states:  # each checkpoint's own loss, off the plane as it is
                load_state(model, state)
                truth.append(measure(model))
                bar.update()
            load_state(model, center)
        frame = pd.DataFrame(rows)
        names = [n for n in center if n in moved]
        xy, off = project(path_states, center, d1, d2, names)
        trajectory = pd.DataFrame({"step": steps, "x": [c[0] for c in xy],
                                   "y": [c[1] for c in xy], "off_plane": off,
                                   "train_loss": [t["train_loss"] for t in truth],
                                   "val_loss": [t["val_loss"] for t in truth]})
        meta = {"kind": "plane", "run": str(run_dir), "directions": directions, "seed": seed,
                "span": span, "grid": grid, "step": final_step, "axes": axis,
                "include_bias": include_bias, "include_bn": include_bn,
                "examples": {k: len(v[1]) for k, v in sets.items()}, "example_seed": seed}
        folder, meta["centre"] = output_folder(run_dir), end_label(run_dir, final_step)
        title = f"{run_dir.name}: loss on a plane through the {meta['centre']}"
        fig = out.plane_figure(frame, trajectory, title, axis, meta["examples"], meta["centre"])
        files = out.write_slice(folder, name, frame, fig, meta, trajectory)
        if board:
            files.append(out.write_board(run_dir, name, files[1], None, final_step))
    return Slice(name, "plane", frame, files, trajectory, meta)


# ------------------------------------------------------------------ a sweep's pairs
def pairs(sweep_dir: Path, key: str, **kw) -> tuple[pd.DataFrame, list[Slice]]:
    """For each pair of runs that differ in `key` alone (the same seed: sweep.pairs.pair_runs),
    the line from the reference run's final weights to the variant's, written into
    SWEEP/landscape/, and SWEEP/landscape/pairs.parquet: one row per pair with the loss at both
    ends and the midpoint and the barrier (train and val)."""
    sweep_dir = Path(sweep_dir)
    found = pair_runs(load_runs(sweep_dir), key)
    if not len(found):
        raise UserError(f"--pairs {key}: no two runs of {sweep_dir} differ in {key} alone "
                        f"(with the same seed and every other key equal); nothing to pair")
    folder = output_folder(sweep_dir)
    rows, slices = [], []
    extra = [c for c in found.columns if c not in ("key", "reference_value", "variant_value",
             "reference_run", "variant_run", "seed") and found[c].astype(str).nunique() > 1]
    for pair in found.to_dict("records"):
        a, b = sweep_dir / pair["reference_run"], sweep_dir / pair["variant_run"]
        # the job folders' own names (the swept keys), and a hash of the two runs' whole
        # names: pairs from two sweeps of one folder never share a file
        tag = hashlib.sha1(f"{pair['reference_run']}\0{pair['variant_run']}".encode()).hexdigest()
        name = (f"{safe_name(Path(pair['reference_run']).name)}__to__"
                f"{safe_name(Path(pair['variant_run']).name)}_{tag[:8]}")
        key, ref, var = pair["key"], pair["reference_value"], pair["variant_value"]
        s = line(a, b, name=name, out_dir=sweep_dir, board=False,
                 labels=(f"{key}={ref} (final weights)", f"{key}={var} (final weights)"),
                 title=f"{sweep_dir.name}: {key} {ref} -> {var}, seed {pair['seed']}: the "
                       f"straight line between the two runs' final weights", **kw)
        f = s.frame
        at = {v: f[np.isclose(f.alpha, v)].iloc[0] for v in (0.0, 0.5, 1.0)}
        rows.append({"key": pair["key"], "from_value": pair["reference_value"],
                     "to_value": pair["variant_value"], "seed": pair["seed"],
                     "from_run": pair["reference_run"], "to_run": pair["variant_run"],
                     **{c: pair[c] for c in extra},
                     "loss_from": at[0.0].train_loss, "loss_mid": at[0.5].train_loss,
                     "loss_to": at[1.0].train_loss, "barrier": s.meta["barrier"],
                     "val_loss_from": at[0.0].val_loss, "val_loss_mid": at[0.5].val_loss,
                     "val_loss_to": at[1.0].val_loss, "val_barrier": s.meta["val_barrier"],
                     "file": f"{name}.parquet"})
        slices.append(s)
    table = pd.DataFrame(rows)
    curves = [(f"seed {r['seed']}: {r['from_value']} -> {r['to_value']}"
               + "".join(f", {c}={r[c]}" for c in extra) + f"; train barrier {r['barrier']:.3g}",
               s.frame)
              for r, s in zip(rows, slices, strict=True)]
    out.write_pairs(folder, table, out.pairs_figure(
        curves, f"{sweep_dir.name}: {key}, the straight line between the final weights of each "
                f"pair of runs (same seed, every other key equal)"))
    return table, slices
