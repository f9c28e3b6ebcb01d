"""`autograd-lab train`, `demo` and `summarize`: the overrides checked in one line each
before Hydra runs (no run directory for a typo), then the Hydra app."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import autograd_lab.config.preflight as preflight
import autograd_lab.train as train_app
from autograd_lab.config.preflight import check_overrides
from autograd_lab.config.resources import cifar10_present
from autograd_lab.config.stacking import NAME as STACKED
from autograd_lab.config.stacking import is_stacked, stack_overrides
from autograd_lab.config.targets import refuse_running_code
from autograd_lab.disk.lock import SWEEP_DIRS, check_entries, check_free
from autograd_lab.errors import UserError, first_line
from autograd_lab.job.resumable import check_ckpt_path_override

# Hydra flags that only print help or install things: no config is composed, nothing to check.
_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc",
               "--version")

# Flags that print the composed config: the overrides are checked, no run directory is made.
_PRINT_FLAGS = ("--cfg", "-c", "--resolve", "--package", "-p")

_VALUE_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd",
                "--experimental-rerun", "--cfg", "-c", "--package", "-p")


def train(args: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in args)
    refuse_running_code(args)  # --experimental-rerun; a _target_ of Hydra's own
    if is_stacked(args) and not multirun:  # Hydra would run one plain job and say nothing
        raise UserError(f"{STACKED}: a launcher runs the jobs of a sweep: add -m, e.g. "
                        f"autograd-lab train -m {STACKED} seed=0,1,2,3")
    if stack_overrides(args, multirun) != args:  # probes=off, as if typed
        args = stack_overrides(args, multirun)
        print(f"autograd-lab: note: {STACKED}: probes=off (probes measure one network per "
              f"step)", file=sys.stderr)
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

    sys.argv = [sys.argv[0] if sys.argv and sys.argv[0] else "autograd-lab", *args]

    preflight.CHECKED_BY_CLI = checked  # the app's own preflight need not compose it all again
    try:
        train_app.main()
    except SystemExit as e:  # Hydra and the app exit with a code: pass it on
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BrokenPipeError:  # `--help | head`: the reader left; cli.main ends quietly
        raise
    except Exception as e:  # Hydra's own argument checks raise before any job runs

        raise UserError(first_line(str(e))) from None
    finally:
        preflight.CHECKED_BY_CLI = False
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

        check_ckpt_path_override(overrides)


def _check_output_dir(args: list[str], multirun: bool) -> None:
    """The run (or sweep) directory must be creatable: one line now, not Hydra's traceback."""

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

        check_free(path)
        check_entries(path)  # a symlink, FIFO, ... where a file of ours goes (sweep.OwnFiles-


def demo(args: list[str]) -> int:
    """The main job: the seed's zero-grad study, on CIFAR-10 if it is there, else synthetic."""
    root = Path(next((a.split("=", 1)[1] for a in args if a.startswith("data.root=")), "data"))
    if cifar10_present(root):
        print(f"demo: CIFAR-10 found in {root.resolve()}: running the seed's zero-grad study on it")
        data = ["data=cifar10"]
    else:
        print(f"demo: no CIFAR-10 in {root.resolve()}: running the zero-grad study on synthetic "
              f"data (put cifar-10-python.tar.gz there for the real thing)")
        data = ["data=synthetic"]
    return train(["-m", "experiment=zero_grad_study", *data, *args])


def summarize(args: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="autograd-lab summarize",
                                     description="Write DIR/summary/ for a folder of runs.")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--by", nargs="+", default=None,
                        help="config keys to group by (default: the keys that differ)")
    opts = parser.parse_args(args)
    from autograd_lab.sweep.summary import summarize as write_summary

    check_entries(opts.dir, SWEEP_DIRS, ())  # summary/ a symlink: its files would go elsewhere
    out = write_summary(opts.dir, opts.by)
    print((out / "summary.md").read_text())
    print(f"written: {out}")
    return 0
