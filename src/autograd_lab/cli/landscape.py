"""`autograd-lab landscape RUN_DIR [...]`: loss-landscape slices of a finished run (a line from
its initial to its final weights, or to another run's; a plane through its final weights), or
of a sweep's paired runs (`--pairs KEY`). Every argument is checked here, torch-free, before the
computation (sweep.landscape) is imported: a mistake is one line, at once. `compute` is also
the notebook API's `landscape` (api.py)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from autograd_lab.disk.lock import InUse, check_free
from autograd_lab.errors import UserError
from autograd_lab.sweep.landscape_runs import (
    check_same_model,
    run_checkpoints,
    run_config,
    safe_name,
)

DEFAULTS = {"to": None, "plane": False, "directions": "random", "alphas": (-0.5, 1.5),
            "points": 51, "grid": 25, "span": None, "examples": 2048, "batch_size": 1024,
            "seed": 0, "include_bias": False, "include_bn": False, "hessian_iters": 20,
            "pairs": None, "name": None, "progress": True, "device": None, "data_root": None,
            "threads": None}


class _Parser(argparse.ArgumentParser):
    """argparse, its complaints as one line naming the valid flags (exit 2, no usage block)."""

    def error(self, message):
        flags = sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})
        raise UserError(f"landscape: {message}; valid flags: {', '.join(flags)}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="autograd-lab landscape",
                description="Loss-landscape slices of a run (written to RUN_DIR/landscape/ and "
                            "its TensorBoard), or of a sweep's paired runs (--pairs).")
    p.add_argument("path", type=Path, metavar="RUN_DIR", help="a run directory (a sweep folder "
                   "with --pairs)")
    p.add_argument("--to", type=Path, metavar="OTHER_RUN_DIR", help="interpolate from this "
                   "run's final weights to another run's (default: initial -> final)")
    p.add_argument("--range", dest="alphas", type=float, nargs=2, metavar=("LO", "HI"),
                   default=DEFAULTS["alphas"], help="α range of a line (default -0.5 1.5)")
    p.add_argument("--points", type=int, default=51, help="points on a line (default 51; "
                   "α = 0, 0.5 and 1 are always added)")
    p.add_argument("--plane", action="store_true", help="a 2-D plane through the final "
                   "weights instead of a line")
    p.add_argument("--directions", choices=["random", "hessian"], default=None,
                   help="the plane's directions: filter-normalised random (default) or the "
                        "top-2 Hessian eigenvectors (implies --plane)")
    p.add_argument("--grid", type=int, default=25, help="points per side of a plane (25)")
    p.add_argument("--span", type=float, default=None, help="a plane's coordinates run from "
                   "-SPAN to SPAN, in weight norms (default 1 for random directions, 0.1 for "
                   "Hessian ones)")
    p.add_argument("--include-bias", action="store_true", help="random directions move "
                   "biases too (default: zero there, as Li et al.)")
    p.add_argument("--include-bn", action="store_true", help="random directions move "
                   "BatchNorm weights and biases too (default: zero there)")
    p.add_argument("--hessian-iters", type=int, default=20, help="Lanczos steps (default 20)")
    p.add_argument("--examples", type=int, default=2048, help="examples of each split, drawn "
                   "once (default 2048; all when the split is smaller)")
    p.add_argument("--batch-size", type=int, default=1024, help="evaluation batch (1024)")
    p.add_argument("--seed", type=int, default=0, help="the examples' draw and the random "
                   "directions (default 0)")
    p.add_argument("--pairs", metavar="KEY", help="RUN_DIR is a sweep: interpolate between the "
                   "runs of each seed that differ in KEY alone (e.g. train.zero_grad)")
    p.add_argument("--name", help="output name (default: interpolation, "
                   "interpolation_to_<run>, plane_random_seed<N>, plane_hessian)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if there)")
    p.add_argument("--data-root", default=None, help="where the run's data is, if it moved "
                   "(default: the run's data.root)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                   "torch's, fewer when other processes keep the cores busy)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    return p


def check_options(o: dict) -> None:
    """The numbers and combinations, in one line each (all of them at once)."""
    problems = []
    lo, hi = (float(v) for v in o["alphas"])
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        problems.append(f"--range {lo:g} {hi:g}: a span of {hi - lo:g}; give LO < HI "
                        f"(finite), e.g. --range -0.5 1.5")
    for flag, key, least in (("--points", "points", 2), ("--grid", "grid", 2),
                             ("--examples", "examples", 1), ("--batch-size", "batch_size", 1),
                             ("--hessian-iters", "hessian_iters", 2), ("--threads", "threads", 1)):
        if key == "threads" and o[key] is None:
            continue
        if not isinstance(o[key], int) or o[key] < least:
            problems.append(f"{flag} {o[key]}: fewer than {least}; give {least} or more")
    if not (isinstance(o["span"], (int, float)) and math.isfinite(o["span"]) and o["span"] > 0):
        problems.append(f"--span {o['span']}: a span of 0 or less; give a positive number "
                        f"(1: one weight norm)")
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
    if problems:
        raise UserError("\n".join(problems))


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


def compute(path, **options):
    """Check everything, then compute and write the slice(s). Returns sweep.landscape.Slice,
    or for `pairs` the pairs table (a DataFrame). See `autograd-lab landscape --help`."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise UserError(f"landscape: unknown option {', '.join(unknown)}; valid options: "
                        f"{', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    o["plane"] = o["plane"] or o["directions"] == "hessian"
    if o["span"] is None:
        o["span"] = 0.1 if o["directions"] == "hessian" else 1.0
    check_options(o)
    path = Path(path)
    common = {k: o[k] for k in ("examples", "batch_size", "seed", "progress", "device",
                                "data_root")}
    if o["pairs"] is None:
        config = check_run(path)
        if o["to"] is not None:
            check_same_model(path, config, Path(o["to"]), check_run(Path(o["to"]), "--to: "))
    elif not path.is_dir():
        raise UserError(f"{path}: no such folder; give a sweep folder with --pairs")
    from autograd_lab.sweep import landscape as slices  # torch: only once the input is good

    with slices.torch_threads(o["threads"], o["device"]):
        return _compute(slices, path, o, common)


def _compute(slices, path: Path, o: dict, common: dict):
    if o["pairs"] is not None:
        table, _ = slices.pairs(path, o["pairs"], alphas=tuple(o["alphas"]),
                                points=o["points"], **common)
        return table
    if o["plane"]:
        return slices.plane(path, directions=o["directions"], grid=o["grid"], span=o["span"],
                            include_bias=o["include_bias"], include_bn=o["include_bn"],
                            hessian_iters=o["hessian_iters"], name=o["name"], **common)
    return slices.line(path, o["to"], alphas=tuple(o["alphas"]), points=o["points"],
                       name=o["name"], **common)


def landscape(args: list[str]) -> int:
    """The command: parse, check, compute, say what was written."""
    opts = vars(_parser().parse_args(args))
    path = opts.pop("path")
    opts["directions"] = opts["directions"] or "random"
    result = compute(path, **opts)
    if opts["pairs"] is not None:
        for row in result.to_dict("records"):
            print(f"{row['key']}={row['from_value']} -> {row['to_value']} (seed {row['seed']}): "
                  f"train loss {row['loss_from']:.4g} -> mid {row['loss_mid']:.4g} -> "
                  f"{row['loss_to']:.4g}, barrier {row['barrier']:.4g}")
        print(f"written: {path / 'landscape'} (pairs.parquet and one slice per pair)")
        return 0
    f = result.frame
    if result.kind == "line":
        at = {a: f.loc[(f.alpha - a).abs().idxmin()] for a in (0.0, 1.0)}
        print(f"{result.name}: {len(f)} points; train loss {at[0.0].train_loss:.4g} at α=0, "
              f"{at[1.0].train_loss:.4g} at α=1, {f.train_loss.min():.4g} at best (α="
              f"{f.alpha[f.train_loss.idxmin()]:.3g}); barrier {result.meta['barrier']:.4g}")
    else:
        print(f"{result.name}: {len(f)} points; train loss at the final weights "
              f"{result.trajectory.train_loss.iloc[-1]:.4g}, {f.train_loss.min():.4g} to "
              f"{f.train_loss.max():.4g} on the plane")
    print("written: " + ", ".join(str(p) for p in result.files))
    return 0
