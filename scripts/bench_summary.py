"""What `autograd-lab summarize` costs at scale: N synthetic run directories (default 3,000, one
learning rate each), in the harness's run-directory format, then `autograd-lab summarize` on
them, timed, with its peak RSS (target: under 60 s and under 1 GB on a 2-core machine).

    python scripts/bench_summary.py [--runs 3000] [--steps 313] [--seeds 1] [--keep DIR]

Not a test (no timing assertions in the suite): it prints the numbers, the targets, the machine's
load and the PNGs' pixel sizes. `make_runs` is also what tests/test_summary_scale.py uses.

The run directories have what the harness writes and summarize reads: run.json (a SmallNet
record: config, choices, final metrics, time, memory) and metrics.parquet (long format: step,
epoch, name, value; train/loss and lr every step, val/* every epoch, cheap probes every 20
steps), plus .hydra/config.yaml and train.log, as a real sweep's job folder has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBES = [f"probes/{stat}/{group}" for stat in ("grad_norm", "weight_norm", "update_norm",
                                                 "update_ratio", "dist_init", "cos_prev")
          for group in ("conv", "fc", "all")]


def _record(lr: float, seed: int, steps: int, final: dict) -> dict:
    """A completed SmallNet run's run.json, as the harness writes it (the fields summarize
    reads, with a realistic config)."""
    return {
        "format_version": 1, "status": "completed", "error": None,
        "started": "2026-12-06T12:00:00+0000",
        "config": {"study": "lr_study", "seed": seed, "resume": True, "ckpt_path": None,
                   "threads": 1,
                   "train": {"zero_grad": True, "freeze": [], "freeze_bn_stats": True,
                             "detach_at": None},
                   "eval": {"grad_mode": "inference"}, "checkpoint": {"every_n_steps": 500},
                   "model": {"name": "smallnet", "activation": "relu", "weights_path": None},
                   "data": {"name": "synthetic", "root": "data", "batch_size": 32,
                            "train_size": 10000, "test_size": 2000},
                   "optim": {"name": "sgd", "lr": lr, "momentum": 0.9, "weight_decay": 0.0},
                   "probes": {"mode": "cheap", "every_n_steps": 20},
                   "trainer": {"max_epochs": 1, "max_steps": -1},
                   "scheduler": {"name": "none"}},
        "overrides": [f"optim.lr={lr}", f"seed={seed}"],
        "choices": {"experiment": "lr_study", "model": "smallnet", "data": "synthetic",
                    "optim": "sgd", "probes": "cheap", "profiler": "off", "variant": "none",
                    "scheduler": "none", "trainer": "default"},
        "params": {"trainable": 6118, "frozen": 0, "frozen_names": []},
        "stop_reason": "max_epochs: 1 epochs done", "device": "cpu",
        "final": final, "images_per_s": 9000.0 + 100 * seed, "train_seconds": 1.1,
        "val_seconds": 0.05, "seconds_per_step": 0.0035, "wall_seconds": 2.0,
        "memory": {"saved_for_backward_bytes": 921604, "param_bytes": 24472,
                   "grad_bytes": 24472, "optimizer_state_bytes": 24472, "val_saved_bytes": 0},
        "probes": {"mode": "cheap"}, "process_peak_rss_mib": 1050.0,
        "ended": "2026-12-06T12:00:02+0000"}


def _metrics(lr: float, seed: int, steps: int, rng):
    """metrics.parquet's frame: a loss that falls faster with a larger lr, and blows up (stays
    finite, large) past lr 0.5."""
    import numpy as np
    import pandas as pd

    k = np.arange(steps)
    rate = min(lr, 0.5) * 0.05
    loss = 0.3 + 2.0 * np.exp(-rate * k) + 0.05 * rng.standard_normal(steps)
    if lr > 0.5:
        loss = loss * np.exp(np.minimum(k * (lr - 0.5) * 0.05, 30))
    val_steps = [steps]
    parts = [("train/loss", k, loss), ("lr", k, np.full(steps, lr)),
             ("val/loss", val_steps, [loss[-1] * 1.02]),
             ("val/acc", val_steps, [max(0.0, 1 - loss[-1] / 2.5)]),
             ("time/val_seconds", val_steps, [0.05])]
    probe_steps = k[::20]
    for tag in PROBES:
        parts.append((tag, probe_steps, np.abs(rng.standard_normal(len(probe_steps)))))
    frame = pd.DataFrame({
        "step": np.concatenate([np.asarray(s, dtype=np.int64) for _, s, _ in parts]),
        "epoch": np.zeros(sum(len(s) for _, s, _ in parts), dtype=np.int64),
        "name": pd.array([t for t, s, _ in parts for _ in range(len(s))], dtype="string"),
        "value": np.concatenate([np.asarray(v, dtype=np.float64) for _, _, v in parts])})
    final = {"train_loss": float(loss[-1]), "best_train_loss": float(loss.min()),
             "val_loss": float(loss[-1] * 1.02), "val_acc": max(0.0, 1 - float(loss[-1]) / 2.5),
             "steps": steps}
    return frame, final


def make_runs(folder: Path, n: int, steps: int = 313, seeds: int = 1, seed: int = 0) -> list[Path]:
    """n run directories in `folder` (a sweep's job folders, named `optim.lr=X,seed=S` as a
    sweep names them): n // seeds learning rates on a log scale from 1e-4 to 1, `seeds` seeds
    each. Returns their paths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_lr = max(1, n // seeds)
    lrs = np.geomspace(1e-4, 1.0, n_lr)
    (folder / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    made = []
    for i in range(n):
        lr, s = float(f"{lrs[i // seeds % n_lr]:.6g}"), i % seeds
        run = folder / (f"optim.lr={lr},seed={s}" if seeds > 1 else f"optim.lr={lr}")
        (run / ".hydra").mkdir(parents=True, exist_ok=True)
        frame, final = _metrics(lr, s, steps, rng)
        record = _record(lr, s, steps, final)
        frame.to_parquet(run / "metrics.parquet", index=False)
        (run / "run.json").write_text(json.dumps(record, indent=2))
        (run / ".hydra" / "config.yaml").write_text(json.dumps(record["config"]))
        (run / "train.log").write_text("")
        made.append(run)
    return made


def _peak_rss_mib_of_children() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _png_sizes(summary: Path) -> dict:
    from PIL import Image

    sizes = {}
    for png in sorted(summary.glob("*.png")):
        with Image.open(png) as image:
            sizes[png.name] = image.size
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3000)
    p.add_argument("--steps", type=int, default=313, help="optimizer steps a run (313: one "
                   "epoch of 10,000 images at batch 32)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--keep", type=Path, default=None, help="make the runs here and keep them")
    args = p.parse_args()

    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench_summary_")) / "sweep"
    t0 = time.perf_counter()
    if not (folder / "multirun.yaml").exists():
        make_runs(folder, args.runs, args.steps, args.seeds)
    made = time.perf_counter() - t0
    load = os.getloadavg()
    exe = Path(sys.executable).parent / "autograd-lab"
    t0 = time.perf_counter()
    out = subprocess.run([str(exe), "summarize", str(folder)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"summarize failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    rss = _peak_rss_mib_of_children()
    summary = folder / "summary"
    bands = [d.name for d in summary.iterdir() if d.is_dir()]
    print(f"{args.runs} runs x {args.steps} steps ({args.seeds} seed(s) a learning rate), made in "
          f"{made:.1f} s in {folder}")
    print(f"load average before summarize: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} cores)")
    print(f"autograd-lab summarize: {wall:.1f} s wall (target < 60 s), peak RSS {rss:,.0f} MiB "
          f"(target < 1,024 MiB)")
    print(f"PNGs (width x height): {_png_sizes(summary)}; seed-band runs: {len(bands)}")
    print(f"summary.md: {(summary / 'summary.md').stat().st_size:,} bytes")
    if args.keep is None:
        import shutil

        shutil.rmtree(folder.parent)  # the temporary runs (about 80 MB for 3,000)


if __name__ == "__main__":
    main()
