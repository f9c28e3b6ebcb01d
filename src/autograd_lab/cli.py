"""`autograd-lab <command> ...`: the console entry point.

`train` hands its arguments to the Hydra app unchanged, after checking the overrides with
Hydra's own parser and compose API, so a typo is one line and no run directory is created.
Nothing here imports torch: `autograd-lab train --help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .config import UserError, check_overrides, refuse_running_code

COMMANDS = {
    "train": "train a model (Hydra app: overrides, -m sweeps, --cfg job, --help)",
    "demo": "run the seed's zero-grad study (CIFAR-10 when present, else synthetic data)",
    "step-check": "one forward/backward/step; every parameter against its update rule",
    "graph": "[overrides] --out PATH [--tensorboard DIR]: the backward graph, its saved "
             "tensors, DOT, image, TensorBoard graph",
    "summarize": "DIR [--by KEY ...]: summary/ for any folder of runs (tables, curves, plots)",
    "profile": "a short profiled training run (or --op conv1d, the seed's case): op tables",
    "tensorboard": "[DIR ...] [--port N]: TensorBoard on 127.0.0.1 with every step kept",
}

# Hydra flags that only print help or install things: no config is composed, nothing to check.
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
               "--version")
# Flags that print the composed config: the overrides are checked, no run directory is made.
_PRINT_FLAGS = ("--cfg", "-c", "--resolve", "--package", "-p")


_VALUE_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                "--experimental-rerun", "--cfg", "-c", "--package", "-p")


def main(argv: list[str] | None = None) -> int:
    # before torch is imported: the profiler's C++ start-up lines and c10's warnings stay out of
    # the user's terminal (train._quiet_libraries says which)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0].startswith(("-sc", "--shell-completion")):
        # Hydra's completion script calls the program without a command, and passes the line
        # typed so far in COMP_LINE: complete `autograd-lab train ...` as the train app's line.
        words = os.environ.get("COMP_LINE", "").split(" ")
        if len(words) > 1 and words[1] == "train":
            os.environ["COMP_LINE"] = " ".join(words[:1] + words[2:])
        argv = ["train", *argv]
    command, rest = argv[0], argv[1:]
    try:
        handler = {"train": train, "demo": demo, "profile": profile, "summarize": summarize,
                   "step-check": step_check, "graph": graph,
                   "tensorboard": tensorboard}.get(command)
        if handler is not None:
            return handler(rest)
        raise UserError(f"unknown command {command!r}; commands are: {', '.join(COMMANDS)}")
    except UserError as e:
        for line in str(e).splitlines() or [""]:  # several problems: one line each
            print(f"autograd-lab: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training began (a run records its own)
        print("autograd-lab: interrupted", file=sys.stderr)
        return 130


def _usage() -> str:
    lines = ["usage: autograd-lab <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    lines += ["", "`autograd-lab train --help` lists the config; README.md has the reference."]
    return "\n".join(lines)


def train(args: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in args)
    refuse_running_code(args)  # --experimental-rerun; a _target_ of Hydra's own
    checked = not any(a.split("=")[0] in _INFO_FLAGS for a in args)
    if checked:
        overrides, skip, last = [], False, len(args) - 1
        for i, a in enumerate(args):  # flags with a separate value (-cn NAME) are Hydra's
            if skip or a.startswith("-"):
                skip = a in _VALUE_FLAGS
                continue
            overrides.append(a)
            last = i
        printing = any(a.split("=")[0] in _PRINT_FLAGS for a in args)
        plan = check_overrides(overrides, multirun, files=not printing)
        if not printing:
            _check_output_dir(args, multirun)
            if not multirun:
                _check_ckpt_path(overrides)
        if multirun and printing:
            args = _first_job_args(args, overrides, plan)
        elif multirun:  # directories (and TensorBoard runs) named by what differs
            # right after the user's overrides: Hydra's argparse takes the overrides as one run
            # of words, so words after a flag (`-m a=1 --cfg hydra X`) would be unrecognized
            args = [*args[:last + 1], *plan.hydra_overrides(args), *args[last + 1:]]
    from . import train as train_app

    sys.argv = [sys.argv[0] if sys.argv and sys.argv[0] else "autograd-lab", *args]
    from . import config

    config.CHECKED_BY_CLI = checked  # the app's own preflight need not compose it all again
    try:
        train_app.main()
    except SystemExit as e:  # Hydra and the app exit with a code: pass it on
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # Hydra's own argument checks raise before any job runs
        from .config import _first_line

        raise UserError(_first_line(str(e))) from None
    finally:
        config.CHECKED_BY_CLI = False
    return 0


def _first_job_args(args: list[str], overrides: list[str], plan) -> list[str]:
    """`train -m ... --cfg job|hydra|all`: Hydra prints the config of one run and refuses -m
    with --cfg, so print the sweep's first job (every swept key at its first value) with the
    sweep folder and job names the sweep would use, and say so on stderr."""
    flags = [a for a in args if a not in overrides and a not in ("-m", "--multirun")]
    hydra = [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/", "hydra="))]
    print(f"autograd-lab: -m with --cfg: the config of the sweep's first job "
          f"({' '.join(plan.first_job) or 'no overrides'})", file=sys.stderr)
    return [*flags, *plan.first_job, *hydra, *plan.hydra_overrides(overrides)]


def _check_ckpt_path(overrides: list[str]) -> None:
    """A checkpoint given as ckpt_path= must be one this config can continue from: refused in
    one line before Hydra makes the run directory. Imports torch only when ckpt_path= is given."""
    if any(o.lstrip("+").startswith("ckpt_path=") for o in overrides):
        from .checkpoint import check_ckpt_path_override

        check_ckpt_path_override(overrides)


def _check_output_dir(args: list[str], multirun: bool) -> None:
    """The run (or sweep) directory must be creatable: one line now, not Hydra's traceback."""
    import os

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = next((a.split("=", 1)[1] for a in args if a.startswith(key + "=")), None)
    if given is not None and "${" in given:
        return  # an interpolation: Hydra resolves it
    path = Path(given) if given else Path.cwd()
    try:
        path.resolve(strict=False)
    except (RuntimeError, OSError) as e:  # a symlink loop: Python 3.11 raises RuntimeError
        raise UserError(f"{key}={given}: cannot be resolved ({e}); choose a real folder"
                        ) from None
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    shown = f"{key}={given}" if given else f"the current folder {path}"
    if not probe.is_dir():
        raise UserError(f"{shown}: cannot create the output folder: {probe} is a file; "
                        f"choose a folder you can write to")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{shown}: cannot write to {probe}; choose a folder you can write to")
    if given is not None and not multirun:  # a run directory another process is writing
        from .lock import check_entries, check_free

        check_free(path)
        check_entries(path)  # a symlink, FIFO, ... where a file of ours goes (sweep.OwnFiles-
        # Callback checks every run and sweep folder again before Hydra writes)


def demo(args: list[str]) -> int:
    """The main job: the seed's zero-grad study, on CIFAR-10 if it is there, else synthetic."""
    root = Path(next((a.split("=", 1)[1] for a in args if a.startswith("data.root=")), "data"))
    have_cifar = ((root / "cifar-10-batches-py").is_dir()
                  or (root / "cifar-10-python.tar.gz").is_file())
    if have_cifar:
        print(f"demo: CIFAR-10 found in {root.resolve()}: running the seed's zero-grad study on it")
        data = ["data=cifar10"]
    else:
        print(f"demo: no CIFAR-10 in {root.resolve()}: running the zero-grad study on synthetic "
              f"data (put cifar-10-python.tar.gz there for the real thing)")
        data = ["data=synthetic"]
    return train(["-m", "experiment=zero_grad_study", *data, *args])


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra overrides (key=value) and this command's own --flags."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return overrides, [a for a in args if a not in overrides]


def _compose(overrides: list[str], defaults: list[str]):
    """The training config for the overrides (checked first: bad input is one line)."""
    from .config import compose, validate

    keys = {o.split("=", 1)[0] for o in overrides}
    full = [d for d in defaults if d.split("=", 1)[0] not in keys] + overrides
    check_overrides(full, multirun=False)
    cfg = compose(full)
    validate(cfg)
    return cfg


def _model(cfg):
    """The configured model with its variants applied (freeze, detach_at)."""
    import torch

    from .models import build_model
    from .variants import detach_at, freeze

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    freeze(model, cfg.train.freeze)
    if cfg.train.detach_at:
        detach_at(model, cfg.train.detach_at, torch.zeros(1, 3, 32, 32))
    return model


def _model_and_batch(cfg, seed_batch: bool = False):
    """The configured model with its variants applied, and one batch (the seed's random
    images with soft random targets when `seed_batch`)."""
    import torch

    from .data import load_split_tensors, normalize

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
    from .checks import step_check as check
    from .module import build_optimizer

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

    from .graph import first_batch, graph_def, module_scopes, render, walk, write_graph
    from .graph import saved_bytes_by_hooks as hook_count

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


def summarize(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="autograd-lab summarize",
                                     description="Write DIR/summary/ for a folder of runs.")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--by", nargs="+", default=None,
                        help="config keys to group by (default: the keys that differ)")
    opts = parser.parse_args(args)
    from .lock import SWEEP_DIRS, check_entries
    from .summary import summarize as write_summary

    check_entries(opts.dir, SWEEP_DIRS, ())  # summary/ a symlink: its files would go elsewhere
    out = write_summary(opts.dir, opts.by)
    print((out / "summary.md").read_text())
    print(f"written: {out}")
    return 0


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
        from .profiling import fwd_bwd_table, profile_op

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


def command_path() -> str:
    """How to call this console script again, pasteable as is into a shell (no activated venv
    needed; quoted where the path has spaces, quotes or non-ASCII characters)."""
    import shlex

    exe = Path(sys.executable).parent / "autograd-lab"
    if not exe.exists():
        return "autograd-lab"
    try:
        return shlex.quote(str(exe.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(exe))


# TensorBoard keeps 1,000 points a scalar tag unless told otherwise: every step is the point.
# Not scalars=0: TensorBoard's documented "keep all" returns no points at all from the fast
# (Rust) data server of tensorboard 2.21 (tests/test_cli.py shows all 1,500 of a run's steps).
SAMPLES = "scalars=10000000,images=100,histograms=500"


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Linux: this (child) process gets SIGTERM when its parent ends, even by SIGKILL, so a
    TensorBoard never outlives the command that started it. (distributed.die_with_parent does
    the same for DDP ranks; that module imports Lightning, which this command must not.)"""
    import signal

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Stopped(Exception):
    """SIGTERM or SIGHUP reached `autograd-lab tensorboard`: stop the server, as Ctrl-C does."""


def _logdir_args(dirs: list[Path], links: Path) -> list[str]:
    """TensorBoard's arguments for the folders: one folder is the logdir; several are symlinks
    in `links` (a fresh temporary folder), one per folder, named by its last part, and `links`
    is the logdir. Not --logdir_spec, which splits on commas and colons: a sweep's job folders
    (`seed=0,train.zero_grad=true`) would show no runs at all."""
    if len(dirs) == 1:
        return ["--logdir", str(dirs[0])]
    used: set[str] = set()
    for d in dirs:
        name = d.resolve().name or "root"
        shown, n = name, 2
        while shown in used:  # two folders of one name: the second is name-2
            shown, n = f"{name}-{n}", n + 1
        used.add(shown)
        (links / shown).symlink_to(d.resolve(), target_is_directory=True)
    return ["--logdir", str(links)]


def tensorboard(args: list[str]) -> int:
    """`autograd-lab tensorboard [DIR ...] [--port N]`: this venv's TensorBoard on 127.0.0.1 with
    every scalar kept, on a free port from N (6006) up; prints the URL. Ctrl-C, SIGTERM or
    SIGHUP stops it, and so does the end of this process by any means (SIGKILL included): the
    server never outlives the command."""
    import argparse
    import shutil
    import signal
    import subprocess
    import tempfile
    import time

    parser = argparse.ArgumentParser(prog="autograd-lab tensorboard")
    parser.add_argument("dirs", nargs="*", type=Path,
                        help="folders of runs (default: runs and multirun, where they exist)")
    parser.add_argument("--port", type=int, default=6006)
    opts = parser.parse_args(args)
    dirs = opts.dirs or [d for d in (Path("runs"), Path("multirun")) if d.is_dir()]
    if not dirs:
        raise UserError("no runs here (no runs/ or multirun/ folder); give a folder: "
                        "autograd-lab tensorboard multirun/<study>/<sweep>")
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise UserError(f"{missing[0]}: no such folder; give a folder of runs")
    if not 1 <= opts.port <= 65535:
        raise UserError(f"--port {opts.port}: must be in 1..65535")
    port = next((p for p in range(opts.port, min(opts.port + 100, 65536))
                 if not _listening(p)), None)
    if port is None:
        raise UserError(f"--port {opts.port}: it and the next 99 ports are taken")

    def stop(signum, frame):
        raise _Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    links = Path(tempfile.mkdtemp(prefix="autograd-lab-tensorboard-")) if len(dirs) > 1 \
        else None
    server = errors = None
    try:
        command = [sys.executable, "-m", "tensorboard.main", "--host", "127.0.0.1",
                   *_logdir_args(dirs, links), "--port", str(port), "--samples_per_plugin", SAMPLES]
        # its stderr goes to a file, not a pipe: a pipe nobody reads once it serves would fill
        # up and block it, and once this process is gone (SIGKILL) its "caught SIGTERM" line
        # would meet a closed pipe and could keep it from exiting
        errors = tempfile.TemporaryFile(mode="w+")
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors,
                                  text=True, preexec_fn=_die_with_parent)
        deadline = time.time() + 60
        while not _listening(port):
            if server.poll() is not None:
                errors.seek(0)
                error = errors.read().strip().splitlines()
                raise UserError(f"tensorboard did not start: "
                                f"{error[-1] if error else f'exit {server.returncode}'}")
            if time.time() > deadline:
                raise UserError(f"tensorboard did not listen on port {port} within 60 s")
            time.sleep(0.1)
        print(f"TensorBoard: http://127.0.0.1:{port}/ ({', '.join(map(str, dirs))}; every step "
              f"kept). Ctrl-C stops it.", flush=True)
        server.wait()
        return server.returncode or 0
    except (KeyboardInterrupt, _Stopped):
        print("TensorBoard stopped.", file=sys.stderr)
        return 0
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if errors is not None:
            errors.close()  # an unlinked temporary file: gone with it
        if links is not None:
            shutil.rmtree(links, ignore_errors=True)  # the symlinks only, never their targets
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
