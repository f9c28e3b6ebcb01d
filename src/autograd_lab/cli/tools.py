"""`autograd-lab step-check`, `graph` and `profile`: one step, one backward graph, one short
profiled run of the config a training run would use."""

from __future__ import annotations

import json
from pathlib import Path

from autograd_lab.cli.commands import train
from autograd_lab.config.compose import compose
from autograd_lab.config.preflight import check_overrides
from autograd_lab.config.schema import validate
from autograd_lab.data.loader import load_split_tensors, normalize
from autograd_lab.errors import UserError
from autograd_lab.job.build import build_network
from autograd_lab.model.module import build_optimizer
from autograd_lab.observe.graph import saved_bytes_by_hooks as hook_count
from autograd_lab.observe.graph import walk
from autograd_lab.observe.graph_view import (
    first_batch,
    graph_def,
    module_scopes,
    render,
    write_graph,
)
from autograd_lab.observe.profiling import fwd_bwd_table, profile_op
from autograd_lab.observe.step_check import step_check as check
from autograd_lab.text import command_path


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides (key=value) and this command's own --flags."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return overrides, [a for a in args if a not in overrides]


def _compose(overrides: list[str], defaults: list[str]):
    """The training config for the overrides (checked first: bad input is one line)."""

    keys = {o.split("=", 1)[0] for o in overrides}
    full = [d for d in defaults if d.split("=", 1)[0] not in keys] + overrides
    check_overrides(full, multirun=False)
    cfg = compose(full)
    validate(cfg)
    return cfg


def _model(cfg):
    """The configured model with its variants applied (freeze, detach_at), by the training
    run's own builder (run.build.build_network)."""
    import torch


    torch.manual_seed(cfg.seed)
    return build_network(cfg)[0]


def _model_and_batch(cfg, seed_batch: bool = False):
    """The configured model with its variants applied, and one batch (the seed's random
    images with soft random targets when `seed_batch`)."""
    import torch


    model = _model(cfg)
    if seed_batch:  # 64x64 as the seed's ResNet18 cell; SmallNet's Linear(588) needs 32x32
        side = 64 if cfg.model.name == "resnet18" else 32
        classes = model.eval()(torch.zeros(1, 3, side, side)).shape[1]
        model.train()
        x = torch.rand(cfg.data.batch_size, 3, side, side)
        y = torch.rand(cfg.data.batch_size, classes)
    else:
        tensors = load_split_tensors(cfg.data)
        x = normalize(tensors["train_x"][:cfg.data.batch_size])
        y = tensors["train_y"][:cfg.data.batch_size]
    return model, x, y


def step_check(args: list[str]) -> int:
    import argparse

    overrides, flags = _split(args)
    parser = argparse.ArgumentParser(prog="autograd-lab step-check")
    parser.add_argument("--seed-batch", action="store_true",
                        help="the seed's cell: random 64x64 images and soft random targets")
    parser.add_argument("--weight", default=None, help="parameter to print (default: last weight)")
    parser.add_argument("--check-lr", type=float, default=None,
                        help="give the checker this learning rate instead (to see it fail)")
    opts = parser.parse_args(flags)
    seed_sgd = [] if any(o.startswith("optim=") for o in overrides) else \
        ["optim.lr=0.01", "optim.momentum=0"]  # the seed's cell: SGD(lr=1e-2)
    cfg = _compose(overrides, ["model=resnet18", "data=synthetic", *seed_sgd])

    model, x, y = _model_and_batch(cfg, opts.seed_batch)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if opts.weight and opts.weight not in trainable:
        why = "is frozen (no gradient)" if opts.weight in dict(model.named_parameters()) \
            else "no such parameter"
        raise UserError(f"--weight {opts.weight}: {why}; trainable ones include: "
                        f"{', '.join(trainable[-3:])}")
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim)
    result = check(model, optimizer, cfg.optim, x, y, opts.weight, opts.check_lr)
    print(f"{cfg.model.name}, optim={cfg.optim.name} lr={cfg.optim.lr}: {result.weight}[0...0]")
    print(f"  initial {result.initial:.8f}  grad {result.grad:.8f}")
    print(f"  updated {result.updated:.8f}  predicted by the update rule {result.predicted:.8f}")
    print(f"every parameter: max |updated - predicted| = {result.max_abs_error:.3g} "
          f"({result.worst}); tolerance {result.tolerance:g}: {'OK' if result.ok else 'MISMATCH'}")
    return 0 if result.ok else 1


def graph(args: list[str]) -> int:
    import argparse

    overrides, flags = _split(args)
    parser = argparse.ArgumentParser(prog="autograd-lab graph")
    parser.add_argument("--out", type=Path, required=True, help="path without extension")
    parser.add_argument("--format", choices=["svg", "png", "dot"], default="svg")
    parser.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                        help="also write the graph as a TensorBoard run in DIR (Graphs tab; "
                             "nodes grouped by module), as every training run writes it")
    opts = parser.parse_args(flags)
    cfg = _compose(overrides, ["data=synthetic"])
    import torch.nn.functional as F


    model = _model(cfg)
    model.train()
    buffers = dict(model.named_buffers())
    # the batch a run's first step takes (a shuffled batch is a gather: its labels count) and
    # the resident data set it comes from (never counted): run.json's figure, the same rule
    x, y, resident = first_batch(cfg)
    scopes: dict = {}

    def forward():
        loss, found = module_scopes(model, lambda: F.cross_entropy(model(x), y))
        scopes.update(found)
        return loss

    loss, backward = hook_count(forward, exclude=[*buffers.values(), *resident])
    g = walk(loss, dict(model.named_parameters()), buffers, resident, scopes)
    hooked = backward()
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    table = g.table()
    table.to_csv(opts.out.with_suffix(".csv"), index=False)
    table.to_parquet(opts.out.with_suffix(".parquet"), index=False)
    files, note = render(g, opts.out, opts.format,
                         f"{cfg.model.name}: {len(g.nodes)} nodes, saves {g.saved_bytes} B")
    print(f"{len(g.nodes)} nodes, {sum(1 for n in g.nodes if n['param'])} parameter leaves")
    verdict = "agree" if hooked == g.saved_bytes else "DISAGREE"
    print(f"saved for backward: {g.saved_bytes} bytes ({g.saved_bytes / 2**20:.2f} MiB) kept "
          f"alive by the graph alone (it also references {g.total_bytes - g.saved_bytes} bytes "
          f"of parameters, buffers and resident data, alive anyway); saved_tensors_hooks count "
          f"{hooked} bytes: {verdict}")
    tables = [opts.out.with_suffix(".csv"), opts.out.with_suffix(".parquet")]
    if opts.tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(opts.tensorboard))
        write_graph(writer, graph_def(g))
        writer.close()
        files.append(opts.tensorboard)
    print("written: " + ", ".join(str(f) for f in [*tables, *files]))
    if opts.tensorboard is not None:
        import shlex

        print(f"see it in the Graphs tab: {command_path()} tensorboard "
              f"{shlex.quote(str(opts.tensorboard))}")
    if note:
        print(note)
    return 0 if hooked == g.saved_bytes else 1


def profile(args: list[str]) -> int:
    """`autograd-lab profile [overrides]`: profile a few training steps and print the tables.
    `autograd-lab profile --op conv1d [--iterations N] [--backward]`: the seed's Conv1d case."""
    if any(a.startswith("--op") for a in args):
        import argparse

        parser = argparse.ArgumentParser(prog="autograd-lab profile")
        parser.add_argument("--op", choices=["conv1d"], required=True)
        parser.add_argument("--iterations", type=int, default=1000)
        parser.add_argument("--backward", action="store_true",
                            help="also run backward, to see each op's derivative function")
        opts = parser.parse_args(args)

        prof = profile_op(opts.op, opts.iterations, opts.backward)
        print(prof.key_averages().table(sort_by="self_cpu_time_total"))  # as the seed prints it
        if opts.backward:
            print(fwd_bwd_table(prof.events()).to_markdown(index=False, floatfmt=".1f"))
        return 0
    import time

    keys = {a.split("=", 1)[0] for a in args}
    defaults = {"data": "data=synthetic", "trainer.max_steps": "trainer.max_steps=8",
                "probes": "probes=off",
                "hydra.run.dir": f"hydra.run.dir=runs/profile_{time.strftime('%Y-%m-%d_%H-%M-%S')}"}
    extra = [v for k, v in defaults.items() if k not in keys]
    run_dir = Path(next(a.split("=", 1)[1] for a in [*args, *extra]
                        if a.startswith("hydra.run.dir=")))
    code = train(["profiler=torch", *extra, *args])
    for name, title in (("profile_ops.csv", "ops by self CPU time"),
                        ("profile_fwd_bwd.csv", "forward op <-> backward node")):
        if (run_dir / name).is_file():
            import pandas as pd

            frame = pd.read_csv(run_dir / name)
            print(f"\n{title} ({run_dir / name}):")
            print(frame.head(25).to_markdown(index=False, floatfmt=".1f"))
    record = run_dir / "run.json"
    if record.is_file() and "error" in (json.loads(record.read_text()).get("profiler") or {}):
        print(f"\nprofiler: {json.loads(record.read_text())['profiler']['error']}")
    print(f"\ntraces: {run_dir / 'profiler'} (open *.pt.trace.json in chrome://tracing or "
          f"ui.perfetto.dev, both offline)")
    return code
