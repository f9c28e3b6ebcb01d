"""`autograd-lab landscape RUN_DIR [...]`: loss-landscape slices of a finished run (a line from
its initial to its final weights, or to another run's; a plane through its final weights), or
of a sweep's paired runs (`--pairs KEY`). Every argument is checked here, torch-free, before the
computation (sweep.landscape) is imported: a mistake is one line, at once. `compute` is also
the notebook API's `landscape` (api.py)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from autograd_lab.disk.lock import InUse, check_free
from autograd_lab.errors import UserError
from autograd_lab.sweep.landscape_runs import (
    check_device,
    check_same_model,
    check_targets,
    default_name,
    folder_problem,
    run_checkpoints,
    run_config,
    safe_name,
    slice_files,
    unfinished,
    writable_folder,
)

DEFAULTS = {"to": None, "plane": False, "directions": "random", "alphas": (-0.5, 1.5),
            "points": 51, "grid": 25, "span": None, "examples": 2048, "batch_size": 1024,
            "seed": 0, "include_bias": False, "include_bn": False, "hessian_iters": 20,
            "pairs": None, "name": None, "progress": True, "device": None, "data_root": None,
            "threads": None}
FLAGS = {"alphas": "--range", "points": "--points", "grid": "--grid", "span": "--span",
         "include_bias": "--include-bias", "include_bn": "--include-bn",
         "hessian_iters": "--hessian-iters", "examples": "--examples", "seed": "--seed",
         "batch_size": "--batch-size", "threads": "--threads", "name": "--name"}
CORES = os.cpu_count() or 1
# key: (least, most, why no more); the bounds are stated in --help
BOUNDS = {"points": (2, 100_001, "each point evaluates the model on every example"),
          "grid": (2, 1001, "a plane has GRID x GRID points, each evaluating the model on "
                            "every example"),
          "hessian_iters": (2, 1000, "Lanczos keeps that many vectors of the model's size"),
          "examples": (1, None, ""), "batch_size": (1, None, ""),
          "seed": (0, 2**63 - 1, "torch's generators take a 64-bit seed"),
          "threads": (1, 4 * CORES, f"4 x the {CORES} cores of this machine")}
_BAD_VALUE = re.compile(r"argument (\S+?)(?:/\S+)?: invalid (int|float|Path) value: '(.*)'")


class _Parser(argparse.ArgumentParser):
    """argparse, its complaints as one line: a bad value says what the flag takes; an unknown
    flag names the valid ones (exit 2, no usage block)."""

    def error(self, message):
        found = _BAD_VALUE.fullmatch(message)
        if found:
            flag, kind, value = found.groups()
            key = next((k for k, f in FLAGS.items() if f == flag), None)
            least, most, _ = BOUNDS.get(key, (None, None, ""))
            what = {"int": "a whole number", "float": "a number"}.get(kind, "a value")
            span = (f" {least}..{most}" if most is not None else f" >= {least}"
                    if least is not None else "")
            raise UserError(f"{flag} {value}: not {what}; {flag} takes {what}{span}")
        if "unrecognized arguments" in message:
            flags = sorted({s for a in self._actions for s in a.option_strings
                            if s.startswith("--")})
            message += f"; valid flags: {', '.join(flags)}"
        raise UserError(f"landscape: {message}")


def _parser() -> argparse.ArgumentParser:
    # no defaults here (SUPPRESS): `compute` knows which flags were typed, and refuses those
    # that would be ignored; its DEFAULTS fill in the rest
    p = _Parser(prog="autograd-lab landscape", argument_default=argparse.SUPPRESS,
                description="Loss-landscape slices of a run (written to RUN_DIR/landscape/ and "
                            "its TensorBoard), or of a sweep's paired runs (--pairs).")
    p.add_argument("path", type=Path, metavar="RUN_DIR", help="a run directory (a sweep folder "
                   "with --pairs)")
    p.add_argument("--to", type=Path, metavar="OTHER_RUN_DIR", help="interpolate from this "
                   "run's final weights to another run's (default: initial -> final)")
    p.add_argument("--range", dest="alphas", type=float, nargs=2, metavar=("LO", "HI"),
                   help="α range of a line (default -0.5 1.5)")
    p.add_argument("--points", type=int, help="points on a line, 2..100001 (default 51; "
                   "α = 0, 0.5 and 1 are always added; each point evaluates the model on every "
                   "example)")
    p.add_argument("--plane", action="store_true", help="a 2-D plane through the final "
                   "weights instead of a line")
    p.add_argument("--directions", choices=["random", "hessian"],
                   help="the plane's directions: filter-normalised random (default) or the "
                        "top-2 Hessian eigenvectors (implies --plane)")
    p.add_argument("--grid", type=int, help="points per side of a plane, 2..1001 (default 25; "
                   "GRID x GRID evaluations)")
    p.add_argument("--span", type=float, help="a plane's coordinates run from -SPAN to SPAN, "
                   "in weight norms (> 0; default 1 for random directions, 0.1 for Hessian ones)")
    p.add_argument("--include-bias", action="store_true", help="random directions move "
                   "biases too (default: zero there, as Li et al.)")
    p.add_argument("--include-bn", action="store_true", help="random directions move "
                   "BatchNorm weights and biases too (default: zero there)")
    p.add_argument("--hessian-iters", type=int, help="Lanczos steps for --directions hessian, "
                   "2..1000 (default 20; Lanczos keeps that many vectors of the model's size)")
    p.add_argument("--examples", type=int, help="examples of each split, drawn "
                   "once (default 2048; all when the split is smaller)")
    p.add_argument("--batch-size", type=int, help="evaluation batch (1024)")
    p.add_argument("--seed", type=int, help="the examples' draw and the random "
                   "directions, 0..2**63-1 (default 0)")
    p.add_argument("--pairs", metavar="KEY", help="RUN_DIR is a sweep: interpolate between the "
                   "runs of each seed that differ in KEY alone (e.g. train.zero_grad)")
    p.add_argument("--name", help="output name (default: interpolation, "
                   "interpolation_to_<run>, plane_random_seed<N>, plane_hessian)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if there)")
    p.add_argument("--data-root", help="where the run's data is, if it moved (an existing "
                   "folder; default: the run's data.root)")
    p.add_argument("--threads", type=int, help=f"torch threads, 1..{4 * CORES} (default: "
                   "torch's, fewer when other processes keep the cores busy)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    return p


def _given(options: dict, key: str) -> bool:
    return options.get(key) not in (None, False)


def _shown(key: str, value) -> str:
    if isinstance(value, bool):
        return FLAGS[key]
    if key == "alphas":
        return f"--range {' '.join(f'{float(v):g}' for v in value)}"
    return f"{FLAGS[key]} {value}"


def check_options(o: dict, given: dict | None = None) -> None:
    """The numbers and combinations, in one line each (all of them at once). `given`: the
    options the caller set (those that would be ignored are refused)."""
    problems = []
    lo, hi = (float(v) for v in o["alphas"])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        problems.append(f"--range {lo:g} {hi:g}: not finite; give finite LO < HI, e.g. "
                        f"--range -0.5 1.5")
    elif hi <= lo:
        problems.append(f"--range {lo:g} {hi:g}: a span of {hi - lo:g}; give LO < HI "
                        f"(finite), e.g. --range -0.5 1.5")
    for key, (least, most, why) in BOUNDS.items():
        v = o[key]
        if key == "threads" and v is None:
            continue
        span = f"{least}..{most}" if most is not None else f"{least} or more"
        if not isinstance(v, int) or isinstance(v, bool):
            problems.append(f"{FLAGS[key]} {v!r}: not a whole number; give {span}")
        elif v < least:
            problems.append(f"{FLAGS[key]} {v}: "
                            f"{'negative' if least == 0 else f'fewer than {least}'}; give {span}")
        elif most is not None and v > most:
            problems.append(f"{FLAGS[key]} {v}: more than {most} ({why}); give {span}")
    if not (isinstance(o["span"], (int, float)) and math.isfinite(o["span"]) and o["span"] > 0):
        problems.append(f"--span {o['span']}: not a finite number > 0; give e.g. --span 1 (one "
                        f"weight norm)")
    if o["directions"] not in ("random", "hessian"):
        problems.append(f"directions={o['directions']!r}: not a kind; random or hessian")
    if o["to"] is not None and o["plane"]:
        problems.append("--to with --plane: a plane goes through one run's final weights; "
                        "give one of them")
    if o["pairs"] is not None and (o["to"] is not None or o["plane"]):
        problems.append("--pairs with --to or --plane: --pairs interpolates between the pairs "
                        "of a sweep; give it alone")
    if o["name"] is not None and safe_name(o["name"]) != o["name"]:
        problems.append(f"--name {o['name']!r}: not a plain file name; use letters, digits "
                        f"and -_.= (e.g. {safe_name(o['name'])})")
    if o["data_root"] is not None and not Path(o["data_root"]).is_dir():
        problems.append(f"--data-root {o['data_root']}: {folder_problem(o['data_root'])}; "
                        f"give the folder that holds the run's data (default: the run's own "
                        f"data.root)")
    problems += _ignored(o, given or {})
    if problems:
        raise UserError("\n".join(problems))


def _ignored(o: dict, given: dict) -> list[str]:
    """The options the slice asked for would not use: one line each."""
    set_ = [k for k in FLAGS if _given(given, k)]
    if not o["plane"]:
        plane_only = ("grid", "span", "include_bias", "include_bn", "hessian_iters")
        return [f"{_shown(k, o[k])}: applies to a plane; add --plane (or --directions)"
                for k in set_ if k in plane_only] + [
                "--name with --pairs: applies to one slice; --pairs names each pair's files"
                for k in set_ if k == "name" and o["pairs"] is not None]
    wrong = [(k, "applies to a line; a plane has --grid and --span (drop --plane)")
             for k in set_ if k in ("alphas", "points")]
    if o["directions"] == "hessian":
        wrong += [(k, "applies to random directions; Hessian ones move every trained "
                      "parameter") for k in set_ if k in ("include_bias", "include_bn")]
    else:
        wrong += [(k, "applies to Hessian directions; add --directions hessian")
                  for k in set_ if k == "hessian_iters"]
    return [f"{_shown(k, o[k])}: {why}" for k, why in wrong]


def check_run(path: Path, role: str = "") -> dict:
    """A run that can be sliced: its config, a checkpoint, no training job in it now."""
    config = run_config(path)
    run_checkpoints(path)
    try:
        check_free(path)
    except InUse as e:
        raise UserError(f"{role}{str(e).split(';')[0]}; a training job is running there: "
                        f"slice it once it has ended") from None
    return config


def compute(path, typed=None, **options):
    """Check everything, then compute and write the slice(s). Returns sweep.landscape.Slice,
    or for `pairs` the pairs table (a DataFrame). See `autograd-lab landscape --help`.
    `typed`: the options the user set (the command line's flags); by default those that differ
    from DEFAULTS. One the slice would not use is refused."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UserError(f"landscape: unknown option {', '.join(unknown)}; valid options: "
                        f"{', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    given = {k: o[k] for k in (typed if typed is not None else
                               [k for k in DEFAULTS if o[k] != DEFAULTS[k]])}
    o["plane"] = o["plane"] or "directions" in given
    if o["span"] is None:
        o["span"] = 0.1 if o["directions"] == "hessian" else 1.0
    check_options(o, given)
    path = Path(path)
    common = {k: o[k] for k in ("examples", "batch_size", "seed", "progress", "device",
                                "data_root")}
    if o["pairs"] is None:
        config = check_run(path)
        if o["to"] is not None:
            if Path(o["to"]).resolve() == path.resolve():
                raise UserError(f"--to {o['to']}: the run itself (a line from its final weights "
                                f"to themselves is one point); give another run's directory")
            check_same_model(path, config, Path(o["to"]), check_run(Path(o["to"]), "--to: "))
    elif not path.is_dir():
        raise UserError(f"{path}: {folder_problem(path)}; give a sweep folder with --pairs")
    check_device(o["device"])  # torch is imported here only for a CUDA device
    if o["pairs"] is None:  # every file the slice writes can be written, before any point
        name = o["name"] or default_name(o["to"], o["plane"], o["directions"], o["seed"])
        check_targets(slice_files(writable_folder(path), name, o["plane"]))
        for run in (path, o["to"]):
            if run is not None and (why := unfinished(run)) is not None:
                print(f"autograd-lab: note: {run} did not complete ({why}): its last "
                      f"checkpoint is sliced, labelled so", file=sys.stderr)
    else:
        writable_folder(path, board=False)
    from autograd_lab.sweep import landscape as slices  # torch: only once the input is good

    with slices.torch_threads(o["threads"], o["device"]):
        result, used = _compute(slices, path, o, common)
    if "examples" in given and used and min(used.values()) < o["examples"]:
        print(f"autograd-lab: note: --examples {o['examples']}: a split is smaller; used "
              f"{', '.join(f'{n} {k}' for k, n in used.items())}", file=sys.stderr)
    return result


def _compute(slices, path: Path, o: dict, common: dict):
    """(the result, the examples used of each split)."""
    if o["pairs"] is not None:
        table, made = slices.pairs(path, o["pairs"], alphas=tuple(o["alphas"]),
                                   points=o["points"], **common)
        return table, (made[0].meta["examples"] if made else {})
    if o["plane"]:
        s = slices.plane(path, directions=o["directions"], grid=o["grid"], span=o["span"],
                         include_bias=o["include_bias"], include_bn=o["include_bn"],
                         hessian_iters=o["hessian_iters"], name=o["name"], **common)
    else:
        s = slices.line(path, o["to"], alphas=tuple(o["alphas"]), points=o["points"],
                        name=o["name"], **common)
    return s, s.meta["examples"]


def landscape(args: list[str]) -> int:
    """The command: parse, check, compute, say what was written."""
    opts = vars(_parser().parse_args(args))
    path = opts.pop("path")
    result = compute(path, typed=set(opts), **opts)
    if opts.get("pairs") is not None:
        for row in result.to_dict("records"):
            print(f"{row['key']}={row['from_value']} -> {row['to_value']} (seed {row['seed']}): "
                  f"train loss {row['loss_from']:.4g} -> mid {row['loss_mid']:.4g} -> "
                  f"{row['loss_to']:.4g}, barrier {row['barrier']:.4g}")
        print(f"written: {path / 'landscape'} (pairs.parquet and one slice per pair)")
        return 0
    f = result.frame
    if result.kind == "line":
        at = {a: f.loc[(f.alpha - a).abs().idxmin()] for a in (0.0, 1.0)}
        start, end = result.meta["labels"]
        print(f"{result.name}: {len(f)} points from {start} to {end}; train loss "
              f"{at[0.0].train_loss:.4g} at α=0, {at[1.0].train_loss:.4g} at α=1, "
              f"{f.train_loss.min():.4g} at best (α={f.alpha[f.train_loss.idxmin()]:.3g}); "
              f"barrier {result.meta['barrier']:.4g}")
    else:
        print(f"{result.name}: {len(f)} points on a plane through the {result.meta['centre']}; "
              f"train loss there {result.trajectory.train_loss.iloc[-1]:.4g}, "
              f"{f.train_loss.min():.4g} to {f.train_loss.max():.4g} on the plane")
    print("written: " + ", ".join(str(p) for p in result.files))
    return 0
